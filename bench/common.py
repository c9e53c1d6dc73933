"""Shared machinery of `make bench`: interleaved A/B rounds, median and spread, the one output line, results JSON.

Every benchmark builds a `Result` and calls `finish()`, which prints exactly
`<name>: ratio <B/A> (target <T>) <PASS|MISS>  A=<figure> B=<figure>` and writes bench/results/<name>.json with
the figures, per-round ratios, /proc/loadavg before and after, versions and the core count.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CACHE = BENCH / ".cache"
sys.path.insert(0, str(ROOT / "platform"))
from raylm.runtime import free_port  # noqa: E402,F401 - the bench scripts take it from here


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "ray", "deepspeed", "transformers", "tokenizers", "datasketch", "fastapi", "uvicorn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded as such
            out[mod] = "absent"
    return out


def interleave(arms: dict[str, Callable[[], dict]], rounds: int = 4) -> dict[str, list[dict]]:
    """Run every arm once per round, order reversed on odd rounds (A B .. B A): drift in machine load hits both
    sides alike. Each arm returns a dict of figures; returns arm -> per-round figures."""
    assert rounds >= 1
    names = list(arms)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(arms[n]())
            print(f"  round {r + 1}/{rounds} {n}: {fmt_figs(out[n][-1])}", flush=True)
    return out


def fmt_figs(figs: dict, prefix: str = "") -> str:
    parts = []
    for k, v in figs.items():
        if isinstance(v, dict):
            parts.append(fmt_figs(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            parts.append(f"{prefix}{k}={v:.4g}" if isinstance(v, float) else f"{prefix}{k}={v}")
    return " ".join(parts)


def spread(values: list[float]) -> dict:
    """Median, min, max and the relative half-range: what a reader needs to judge one ratio."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_pct": 100 * (max(values) - min(values)) / 2 / med if med else 0.0, "n": len(values)}


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-round B/A (each round's arms ran back to back)."""
    return [y / x if x else float("nan") for x, y in zip(a, b)]


def matmul_peak(threads: int | None = None, n: int = 1024, seconds: float = 2.0) -> float:
    """Measured fp32 FLOP/s of a square matmul on this machine (the MFU denominator; never hard-coded)."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(old)


@dataclass
class Result:
    """One benchmark line and its JSON record."""

    name: str
    target: str  # as printed, e.g. ">=0.90"
    ratio: float | None
    passed: bool | None  # None: no verdict (skipped)
    a: str  # the baseline's figure, as printed
    b: str
    details: dict = field(default_factory=dict)
    load_before: str = field(default_factory=loadavg)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "n/a"
        return f"{self.name}: ratio {ratio} ({'target ' + self.target}) {verdict}  A={self.a} B={self.b}"


def finish(res: Result, extra_lines: list[str] = ()) -> None:
    """Print the benchmark's line (plus any sub-lines) and write bench/results/<name>.json atomically."""
    record = {"name": res.name, "line": res.line(), "ratio": res.ratio, "target": res.target, "pass": res.passed,
              "A": res.a, "B": res.b, "loadavg_before": res.load_before, "loadavg_after": loadavg(),
              "cores": os.cpu_count(), "machine": platform.machine(), "versions": versions(),
              "argv": sys.argv, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "extra_lines": list(extra_lines), **res.details}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / f".{res.name}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, RESULTS / f"{res.name}.json")
    for line in extra_lines:
        print(line, flush=True)
    print(res.line(), flush=True)


def private_ray(num_cpus: int | None = None, **kw) -> None:
    """A private local Ray cluster for this benchmark (never joins another engineer's head); token auth stays on."""
    from raylm.runtime import LOCAL, ensure_ray

    # exactly as raylm starts one (its CPUs, runtime env, Serve's high-throughput mode)
    if num_cpus is not None:
        kw["num_cpus"] = num_cpus
    ensure_ray(LOCAL, log_to_driver=kw.pop("log_to_driver", False), **kw)
