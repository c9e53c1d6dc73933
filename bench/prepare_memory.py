"""Driver memory of `raylm prepare` does not grow with the number of documents (issue 11).

Runs prepare in this process on N tiny JSONL documents for each N (default 20k then 80k), sampling the driver's
RSS every 50 ms, and prints the peak per run and the growth. Pass: growth < 50 MB.

    /tmp/heavy .venv/bin/python bench/prepare_memory.py [20000 80000]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_during(fn) -> tuple[float, object]:
    peak, done = [rss_mb()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return peak[0], out


def main(counts: list[int]) -> int:
    from raylm.config import load_config
    from raylm.data import prepare
    from raylm.runtime import ensure_ray

    ensure_ray("local")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            src = Path(tmp) / f"docs{n}.jsonl"
            with src.open("w") as f:
                for i in range(n):
                    f.write(json.dumps({"text": f"doc {i} " + " ".join(rng.choices(words, k=12))}) + "\n")
            cfg = load_config(None, [f"output_dir={tmp}/out{n}", f"data.sources=[{{path: {src}}}]", "data.clean.min_chars=10",
                                     "data.tokenizer={train: {type: bpe, vocab_size: 300}}", "data.block_size=32"])
            t = time.time()
            peak, m = peak_during(lambda: prepare(cfg))
            peaks.append(peak)
            print(f"prepare-memory: {n:,} docs ({m['documents_kept']:,} kept) in {time.time() - t:.1f}s, "
                  f"driver peak RSS {peak:,.0f} MB", flush=True)
    growth = peaks[-1] - peaks[0]
    print(f"prepare-memory: driver RSS growth {counts[0]:,} -> {counts[-1]:,} docs: {growth:+,.0f} MB "
          f"({'PASS' if growth < 50 else 'FAIL'}: < 50 MB)")
    return 0 if growth < 50 else 1


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [20_000, 80_000]))
