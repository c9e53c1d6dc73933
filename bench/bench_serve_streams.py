"""serve-streams: streamed completions, 16 concurrent clients vs the same 16 requests one at a time, one replica.

    python bench/bench_serve_streams.py
    python bench/bench_serve_streams.py --clients 16 --max-tokens 64 --rounds 2

The model replica's continuous batching (raylm.serve.engine) puts every live sequence in one decode step, streamed
or not. Measured: total generated tokens/s over raw SSE (`stream: true`, greedy) from the random-weight GPT-2 4x256
of bench_serve.py (1 replica, 1 torch thread, max_batch_size = clients). Correctness first: every concurrent stream's
text equals its one-at-a-time text. Target: >= 3x tokens/s at 16 clients.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import causal_lm_dir, deploy  # noqa: E402
from common import Result, finish, free_port, interleave, private_ray, ratios, spread  # noqa: E402

TARGET = 3.0
WORDS = ["def", "The", "import", "return", "class", "for", "if", "with"]


def stream(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    import httpx

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, tokens = "", 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return text, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    private_ray()
    from ray import serve as ray_serve

    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = deploy("streams", causal_lm_dir(), port, max_batch_size=args.clients, max_new_tokens=args.max_tokens)
    prompts = [f"{WORDS[i % len(WORDS)]} {i}" for i in range(args.clients)]
    expected = [stream(url, p, args.max_tokens) for p in prompts]  # warm-up and the reference texts

    def one_at_a_time() -> dict:
        start = time.perf_counter()
        out = [stream(url, p, args.max_tokens) for p in prompts]
        assert out == expected, "one-at-a-time streams changed between runs"
        return {"tokens_per_s": sum(n for _, n in out) / (time.perf_counter() - start)}

    def concurrent() -> dict:
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            out = list(pool.map(lambda p: stream(url, p, args.max_tokens), prompts))
        assert out == expected, "a concurrent stream's text differs from its one-at-a-time text"
        return {"tokens_per_s": sum(n for _, n in out) / (time.perf_counter() - start)}

    runs = interleave({"A": one_at_a_time, "B": concurrent}, rounds=args.rounds)
    a = [r["tokens_per_s"] for r in runs["A"]]
    b = [r["tokens_per_s"] for r in runs["B"]]
    stats = json.loads(__import__("httpx").get(f"{url}/healthz", timeout=30).text)["replica"]["generation"]
    ratio = spread(ratios(a, b))["median"]  # concurrent / one at a time, per round
    res = Result(name="serve-streams", target=f">={TARGET:.2f}", ratio=ratio, passed=ratio >= TARGET,
                 a=f"{spread(a)['median']:.0f} tok/s one at a time",
                 b=f"{spread(b)['median']:.0f} tok/s {args.clients} concurrent",
                 details={"decode_steps_by_batch_size": stats["decode_steps_by_batch_size"],
                          "one_at_a_time": spread(a), "concurrent": spread(b)})
    finish(res, [f"  decode steps by batch size: {stats['decode_steps_by_batch_size']}"])
    ray_serve.shutdown()


if __name__ == "__main__":
    main()
