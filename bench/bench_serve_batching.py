"""serve-batching: the raylm endpoint with dynamic batching on vs the same endpoint with `max_batch_size: 1`.

    python bench/bench_serve_batching.py
    python bench/bench_serve_batching.py --batch 16 --requests 320

16 concurrent clients, on `/v1/classify` (the real all-MiniLM-L6-v2 with a 2-label head) and on non-streaming
`/v1/completions` (the random-weight GPT-2 4x256 of bench_serve.py, greedy, max_tokens 16). Four applications on one
Serve instance (1 replica each, the same thread count): {classify, completions} x {max_batch_size 1, --batch}.
Interleaved A/B/B/A rounds; correctness first: both arms return the same labels / texts.
Classify's ceiling is measured too: the replica's own `_classify` (tokenize, forward, softmax) per request at
batch 1 over per request in a batch of --batch, in this process on the replica's thread budget, i.e. what batching
could gain if HTTP and queueing cost nothing. On CPU the encoder's forward is compute-bound, so this ceiling can lie
below the target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import CLASSIFY, COMPLETION, THREADS, causal_lm_dir, classifier_dir, deploy, load  # noqa: E402
from common import Result, finish, free_port, interleave, private_ray, ratios, spread  # noqa: E402

TARGET = 3.0
CLIENTS = 16
ROUTES = {"classify": ("/v1/classify", CLASSIFY, classifier_dir), "completions": ("/v1/completions", COMPLETION, causal_lm_dir)}


def classify_ceiling(model_dir: Path, batch: int, rounds: int = 3) -> dict:
    """Milliseconds per request of the replica's `_classify` at batch 1 and in batches of `batch` (medians of `rounds`
    timed windows, THREADS torch threads) and their ratio: batching's gain at zero per-request overhead."""
    import torch

    from raylm.serve.model import ModelServer

    old = torch.get_num_threads()
    server = ModelServer.func_or_class(str(model_dir), num_threads=THREADS, name="bench-ceiling")
    req = {**CLASSIFY, "return_all_scores": False}
    try:
        def per_request(n: int, reps: int) -> float:
            server._classify([req] * n)  # warm
            t = time.perf_counter()
            for _ in range(reps):
                server._classify([req] * n)
            return (time.perf_counter() - t) / (reps * n)

        one = statistics.median(per_request(1, 4 * batch) for _ in range(rounds))
        batched = statistics.median(per_request(batch, 4) for _ in range(rounds))
    finally:
        torch.set_num_threads(old)
    return {"batch_1_ms": one * 1e3, f"batch_{batch}_ms_per_request": batched * 1e3, "ceiling": one / batched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="max_batch_size of the batching arm")
    ap.add_argument("--wait", type=float, default=0.01, help="batch_wait_timeout_s of the batching arm")
    ap.add_argument("--requests", type=int, default=320, help="requests per measurement")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    import httpx

    res = Result("serve-batching", f">={TARGET} req/s (worst of classify, completions)", None, None, "", "")
    t0 = time.perf_counter()
    private_ray()
    ray_init_s = time.perf_counter() - t0
    ceiling = classify_ceiling(classifier_dir(), args.batch)
    port = free_port()
    urls, checks, start_s = {}, {}, {}
    for route, (path, body, model) in ROUTES.items():
        for arm, batch in (("A", 1), ("B", args.batch)):
            t0 = time.perf_counter()
            urls[route, arm] = deploy(f"{route}-b{batch}", model(), port, max_batch_size=batch,
                                      batch_wait_timeout_s=args.wait)
            start_s[f"{route}-{arm}"] = time.perf_counter() - t0
            out = httpx.post(urls[route, arm] + path, json=body, timeout=60).json()
            checks[route, arm] = ([r["label"] for r in out["results"]] if "results" in out
                                  else [c["text"] for c in out["choices"]])
            load(urls[route, arm], path, body, CLIENTS, 2 * CLIENTS)  # warm-up
    same = {route: checks[route, "A"] == checks[route, "B"] for route in ROUTES}

    def arm(name: str):
        return lambda: {route: load(urls[route, name], path, body, CLIENTS, args.requests)
                        for route, (path, body, _) in ROUTES.items()}

    runs = interleave({"A": arm("A"), "B": arm("B")}, args.rounds)
    lines, per = [], {}
    for route in ROUTES:
        a = [r[route]["req_s"] for r in runs["A"]]
        b = [r[route]["req_s"] for r in runs["B"]]
        rat = ratios(a, b)
        per[route] = {"ratio": spread(rat), "per_round_ratio": rat, "A_req_s": spread(a), "B_req_s": spread(b),
                      "same_output": same[route]}
        lines.append(f"serve-batching[{route}]: ratio {spread(rat)['median']:.2f} (target >={TARGET}) "
                     f"{'PASS' if same[route] and spread(rat)['median'] >= TARGET else 'MISS'}  "
                     f"A={statistics.median(a):.1f}req/s B={statistics.median(b):.1f}req/s  "
                     f"spread ±{spread(rat)['spread_pct']:.0f}%  same output {same[route]}"
                     + (f"; ceiling at zero HTTP cost {ceiling['ceiling']:.2f} (the replica's _classify per request: "
                        f"{ceiling['batch_1_ms']:.1f} ms alone, {ceiling[f'batch_{args.batch}_ms_per_request']:.1f} ms "
                        f"in a batch of {args.batch}; {THREADS} thread)" if route == "classify" else ""))
    worst = min(ROUTES, key=lambda r: per[r]["ratio"]["median"])
    res.ratio = per[worst]["ratio"]["median"]
    res.passed = all(same.values()) and res.ratio >= TARGET
    res.target = f">={TARGET} worst of classify, completions: {worst}"
    res.a = f"{per[worst]['A_req_s']['median']:.1f}req/s"
    res.b = f"{per[worst]['B_req_s']['median']:.1f}req/s"
    res.details = {"clients": CLIENTS, "max_batch_size": args.batch, "batch_wait_timeout_s": args.wait,
                   "routes": per, "classify_ceiling": ceiling, "ray_init_s": ray_init_s, "deploy_s": start_s, "runs": runs}
    lines.append(f"serve-batching: start-up: ray.init {ray_init_s:.1f}s; deploys "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in start_s.items()))
    finish(res, lines)


if __name__ == "__main__":
    main()
