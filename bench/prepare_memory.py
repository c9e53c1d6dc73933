"""Driver memory of `raylm prepare` does not grow with the number of documents (issue 11).

Runs prepare on N tiny JSONL documents for each N (default 20k then 80k), each in a fresh driver process with its
own local Ray (one process for both would carry the first run's allocations into the second), sampling the
driver's memory every 50 ms, and prints the peaks per run and the growth. Pass: private (anonymous) memory grows
< 50 MB. VmRSS is printed too; it also counts pages of Ray's shared-memory object store the driver has mapped.
The tokenizer trains on the driver from a sample bounded by `data.tokenizer.train.sample_bytes` (256 MB by
default, more than either corpus here): the runs cap it at 1 MiB so that both train on the same amount of text
and the growth measured is the corpus's, not the sample's (each doc's "doc <i>" is a new word for the trainer).

    /tmp/heavy .venv/bin/python bench/prepare_memory.py [20000 80000]
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssShmem")


def memory_mb() -> dict[str, float]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in lines if ln.split(":")[0] in FIELDS}


def peak_during(fn) -> tuple[dict[str, float], object]:
    peak, done = memory_mb(), threading.Event()

    def sample():
        while not done.is_set():
            peak.update({k: max(peak[k], v) for k, v in memory_mb().items()})
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return peak, out


def one_run(n: int) -> dict:
    """prepare() on n tiny documents in this process: its peaks, documents kept and wall time."""
    from raylm.config import load_config
    from raylm.data import prepare
    from raylm.runtime import ensure_ray

    ensure_ray("local")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"docs{n}.jsonl"
        with src.open("w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"doc {i} " + " ".join(rng.choices(words, k=12))}) + "\n")
        cfg = load_config(None, [f"output_dir={tmp}/out{n}", f"data.sources=[{{path: {src}}}]", "data.clean.min_chars=10",
                                 "data.tokenizer={train: {type: bpe, vocab_size: 300, sample_bytes: 1048576}}",
                                 "data.block_size=32"])
        t = time.time()
        peak, m = peak_during(lambda: prepare(cfg))
    return {"n": n, "kept": m["documents_kept"], "s": time.time() - t, "peak_mb": peak}


def main(counts: list[int]) -> int:
    runs = []
    for n in counts:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        r = json.loads(line)
        runs.append(r)
        print(f"prepare-memory: {n:,} docs ({r['kept']:,} kept) in {r['s']:.1f}s, driver peak "
              + ", ".join(f"{k} {v:,.0f} MB" for k, v in r["peak_mb"].items()), flush=True)
    growth = {k: runs[-1]["peak_mb"][k] - runs[0]["peak_mb"][k] for k in FIELDS}
    ok = growth["RssAnon"] < 50
    print(f"prepare-memory: driver growth {counts[0]:,} -> {counts[-1]:,} docs: "
          + ", ".join(f"{k} {v:+,.0f} MB" for k, v in growth.items()) + f" ({'PASS' if ok else 'FAIL'}: RssAnon < 50 MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one_run(int(sys.argv[2]))))
    else:
        sys.exit(main([int(a) for a in sys.argv[1:]] or [20_000, 80_000]))
