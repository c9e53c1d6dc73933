"""Latency and throughput of /v1/completions (max_tokens 16) at 1 and 16 concurrent clients on Ray Serve.

Baseline, measured in the same run: direct in-process `model.generate` on the same model (no HTTP, no Serve).
Prints p50/p95 latency, requests/s, and Serve's ratio to the baseline. Usage: python bench/bench_serve.py [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PROMPT, MAX_TOKENS = "def add", 16


def tiny_model(out: Path) -> Path:
    """The test suite's tiny GPT-2 (2 layers, d 64, BPE 300) when no model is given."""
    from test_serve import save_tiny_gpt2

    return save_tiny_gpt2(out)


def measure(call, clients: int, requests: int) -> dict:
    lat: list[float] = []

    def one(_):
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(lat, n=20)
    return {"p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * q[18], "req_s": requests / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.config import validate_config
    from raylm.runtime import ensure_ray
    from raylm.serve import serve

    model_dir = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp()))
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(PROMPT, return_tensors="pt")

    def direct():
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                           pad_token_id=tok.eos_token_id)

    ensure_ray(None)
    cfg = validate_config({"name": "bench", "output_dir": tempfile.mkdtemp(),
                           "serve": {"port": 8123, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}})
    url = serve(cfg, model_dir=model_dir, blocking=False)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=32))

    def http():
        client.post(f"{url}/v1/completions", json=body).raise_for_status()

    for _ in range(4):
        direct(), http()  # warm-up
    base = measure(direct, 1, args.requests)
    print(f"baseline in-process model.generate, 1 client: p50 {base['p50_ms']:.1f} ms  p95 {base['p95_ms']:.1f} ms  "
          f"{base['req_s']:.1f} req/s")
    for clients in (1, 16):
        r = measure(http, clients, args.requests)
        print(f"serve /v1/completions, {clients:2d} clients: p50 {r['p50_ms']:.1f} ms  p95 {r['p95_ms']:.1f} ms  "
              f"{r['req_s']:.1f} req/s  ratio vs baseline req/s {r['req_s'] / base['req_s']:.2f}x")


if __name__ == "__main__":
    main()
