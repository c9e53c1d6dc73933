"""Promise 7, a crashed replica recovers: under constant load (clients retry up to 3 times), SIGKILL the model
replica's process; Serve replaces it. Prints the time until the endpoint answers again and until /healthz is ok,
and the share of requests that succeeded; exit 1 when recovery takes over 30 s, success < 99% or a request hangs.

    .venv/bin/python stress/replica_kill.py [--clients 8] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from common import replica_pids, serve_tiny_gpt2, start_ray, wait_until

REQUEST_TIMEOUT_S = 60  # a request slower than this counts as hung


def main() -> int:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    start_ray()
    url = serve_tiny_gpt2("kill", request_timeout_s=30)
    body = {"prompt": "The", "max_tokens": 8, "temperature": 0.8}
    stop = time.perf_counter() + args.seconds
    stats = {"ok": 0, "failed": 0, "retried": 0, "hung": 0}
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            while time.perf_counter() < stop:
                for attempt in range(4):
                    try:
                        if http.post(f"{url}/v1/completions", json=body).status_code == 200:
                            outcome = "ok"
                            break
                    except httpx.TimeoutException:
                        with lock:
                            stats["hung"] += 1
                    except httpx.HTTPError:
                        pass
                    outcome = "failed"
                    with lock:
                        stats["retried"] += attempt < 3
                    time.sleep(0.5 * 2 ** attempt)
                with lock:
                    stats[outcome] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.seconds / 3)
    victims = replica_pids()
    killed_at = time.perf_counter()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    answers = wait_until(lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 200, 120)
    healthy = wait_until(lambda: httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
                         and set(replica_pids()) - set(victims), 120)
    healthy_after = None if healthy is None else time.perf_counter() - killed_at
    for t in threads:
        t.join()
    total = stats["ok"] + stats["failed"]
    share = stats["ok"] / max(total, 1)
    fmt = lambda s: "never (120 s)" if s is None else f"{s:.1f}s"  # noqa: E731
    print(f"replica kill: killed {len(victims)} replica(s) under {args.clients} clients; endpoint answered again "
          f"after {fmt(answers)}, /healthz ok with a new replica after {fmt(healthy_after)}; "
          f"{stats['ok']}/{total} requests succeeded ({share:.2%}) with {stats['retried']} retries, "
          f"{stats['hung']} hung")
    return 0 if answers is not None and answers < 30 and share >= 0.99 and not stats["hung"] else 1


if __name__ == "__main__":
    sys.exit(main())
