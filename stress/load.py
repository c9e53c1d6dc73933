"""Promise 6, load held: 50 concurrent clients (half streaming, sampling at temperature 0.8) for 60 s against the
tiny GPT-2 on Ray Serve. Prints requests, failures, p50/p99 latency and replica RSS before/after; exit 1 on any
failed request or RSS growth beyond 10%.

    .venv/bin/python stress/load.py [--clients 50] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from common import replica_pids, rss_mib, serve_tiny_gpt2, start_ray


async def client(i: int, url: str, stop_at: float, latencies: list, failures: list, headers: dict) -> None:
    import httpx

    stream = i % 2 == 1
    body = {"prompt": f"The {i}", "max_tokens": 16, "temperature": 0.8, "stream": stream}
    async with httpx.AsyncClient(timeout=120) as http:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                if stream:
                    async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
                        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    ok = r.status_code == 200 and lines and lines[-1] == "data: [DONE]" and not any(
                        "error" in json.loads(line[6:]) for line in lines[:-1])
                else:
                    r = await http.post(f"{url}/v1/completions", json=body, headers=headers)
                    ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            except Exception as e:  # noqa: BLE001 - counted as a failure
                ok, r = False, e
            (latencies if ok else failures).append(time.perf_counter() - start if ok else repr(r)[:200])


async def load(url: str, clients: int, seconds: float) -> tuple[list, list]:
    latencies: list[float] = []
    failures: list[str] = []
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(client(i, url, stop_at, latencies, failures, {}) for i in range(clients)))
    return latencies, failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    start_ray()
    url = serve_tiny_gpt2("load", max_batch_size=16, max_new_tokens=64)
    asyncio.run(load(url, 4, 5))  # warm up
    pids = replica_pids()
    before = rss_mib(pids)
    latencies, failures = asyncio.run(load(url, args.clients, args.seconds))
    after = rss_mib(pids)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    growth = (after - before) / before
    print(f"load: {args.clients} clients x {args.seconds:.0f}s: {len(latencies) + len(failures)} requests, "
          f"{len(failures)} failed, p50 {q[49]:.3f}s p99 {q[98]:.3f}s, {len(latencies) / args.seconds:.1f} req/s; "
          f"replica RSS {before:.0f} -> {after:.0f} MiB ({growth:+.1%})")
    for f in failures[:5]:
        print("  failure:", f)
    return 1 if failures or growth > 0.10 else 0


if __name__ == "__main__":
    sys.exit(main())
