"""prepare-scaling: `raylm prepare` wall time and driver peak RSS at 1x, 2x and 4x of a corpus slice.

    python bench/bench_prepare_scaling.py                 # 1x = a quarter of the corpus, 4x = all of it (>= 200 MB)
    python bench/bench_prepare_scaling.py --base-mb 5     # development

Each run is a fresh driver process (its own private Ray) calling `raylm.data.prepare` on a JSONL slice of the
corpus (bench/corpus.py) with the default cleaning and near dedup and the benchmark's pretrained BPE 8k tokenizer
(tokenizer training is not what scales here; `--train-tokenizer` uses the config default instead). The driver's
peak RSS is sampled from /proc/self/status every 50 ms while `prepare()` runs (VmRSS, and RssAnon: private
memory, which excludes the object store's shared pages); `ru_maxrss` is kept too, but it can be set at import time,
before prepare starts, and then hides prepare's growth. Wall time is the `prepare()` call (ray.init reported apart).
Scales run in alternating order (1 2 4, 4 2 1, ...). Targets: time(4x) <= 1.15 x 4 x time(1x); RSS(4x) <= 1.2 x RSS(1x).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from common import Result, finish, interleave, spread  # noqa: E402
from prepare_memory import peak_during  # noqa: E402

SCALES = (1, 2, 4)
TIME_TARGET, RSS_TARGET = 1.15, 1.2


def child(src: str, out: str, train_tok: bool) -> None:
    """One prepare run in this (fresh) process; writes its figures to <out>/bench-figures.json (stdout carries
    Ray's and prepare's own log lines)."""
    from bench_tokenize import bench_tokenizer  # noqa: F401 - builds/caches the tokenizer before timing
    from common import CACHE, private_ray

    from raylm.config import load_config
    from raylm.data import prepare

    tok = [] if train_tok else [f"data.tokenizer={{pretrained: {CACHE / 'tokenizer-bpe8k'}}}"]
    cfg = load_config(None, [f"output_dir={out}", f"data.sources=[{{path: {src}/*.jsonl, format: jsonl, text_field: text}}]",
                             *tok])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    private_ray()
    ray_init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    peak, manifest = peak_during(lambda: prepare(cfg))
    wall = time.perf_counter() - t0
    Path(out, "bench-figures.json").write_text(json.dumps({"wall_s": wall, "ray_init_s": ray_init_s, "rss_mb": peak["VmRSS"],
                      "rss_anon_mb": peak["RssAnon"], "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_ray_mb": rss0 / 1024, "documents_read": manifest["documents_read"],
                      "documents_kept": manifest["documents_kept"], "duplicates": manifest["duplicates"],
                      "tokens": sum(s["tokens"] for s in manifest["splits"].values())}))
    print(f"prepare-scaling child: {wall:.1f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--base-mb", type=float, default=None, help="MB of text at 1x (default: a quarter of the corpus)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train-tokenizer", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.train_tokenizer)

    from bench_tokenize import bench_tokenizer

    bench_tokenizer()
    if args.base_mb is None:
        total = sum(len(t.encode()) for t in corpus.docs()["text"].to_pylist()) / 1e6
        args.base_mb = int(total / 4)
    slices = {k: corpus.slice_dir(args.base_mb * k) for k in SCALES}
    res = Result("prepare-scaling", f"time<={TIME_TARGET}x linear, RSS(4x)<={RSS_TARGET}x RSS(1x)", None, None, "", "")

    def arm(k: int):
        def run() -> dict:
            with tempfile.TemporaryDirectory(prefix=f"raylm-bench-prep-{k}x-") as out:
                cmd = [sys.executable, __file__, "--child", str(slices[k]), out]
                cmd += ["--train-tokenizer"] if args.train_tokenizer else []
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    raise RuntimeError(f"prepare at {k}x failed:\n{p.stderr[-3000:]}")
                return json.loads(Path(out, "bench-figures.json").read_text())
        return run

    runs = interleave({f"{k}x": arm(k) for k in SCALES}, args.rounds)
    wall = {k: statistics.median(r["wall_s"] for r in runs[f"{k}x"]) for k in SCALES}
    rss = {k: statistics.median(r["rss_mb"] for r in runs[f"{k}x"]) for k in SCALES}
    time_ratio = wall[4] / (4 * wall[1])
    per_round = [r4["wall_s"] / (4 * r1["wall_s"]) for r1, r4 in zip(runs["1x"], runs["4x"])]
    rss_ratio = rss[4] / rss[1]
    anon = {k: statistics.median(r["rss_anon_mb"] for r in runs[f"{k}x"]) for k in SCALES}
    res.ratio = time_ratio
    res.passed = time_ratio <= TIME_TARGET and rss_ratio <= RSS_TARGET
    res.a = f"1x:{args.base_mb:g}MB,{wall[1]:.0f}s,RSS{rss[1]:.0f}MB"
    res.b = f"4x:{4 * args.base_mb:g}MB,{wall[4]:.0f}s,RSS{rss[4]:.0f}MB"
    res.details = {"base_mb": args.base_mb, "wall_s": wall, "rss_mb": rss, "rss_anon_mb": anon, "time_ratio_vs_linear": time_ratio,
                   "rss_ratio_4x_1x": rss_ratio, "per_round_time_ratio": per_round, "spread": spread(per_round),
                   "train_tokenizer": args.train_tokenizer, "runs": runs}
    finish(res, [f"prepare-scaling: wall 1x {wall[1]:.0f}s 2x {wall[2]:.0f}s 4x {wall[4]:.0f}s "
                 f"(2x/2·1x {wall[2] / (2 * wall[1]):.2f}, 4x/4·1x {time_ratio:.2f}); driver peak RSS 1x {rss[1]:.0f} MB "
                 f"2x {rss[2]:.0f} MB 4x {rss[4]:.0f} MB (4x/1x {rss_ratio:.2f}, target <={RSS_TARGET}); private (RssAnon) "
                 f"1x {anon[1]:.0f} MB 4x {anon[4]:.0f} MB (4x/1x {anon[4] / anon[1]:.2f}); "
                 f"docs read 4x {runs['4x'][0]['documents_read']:,}"])


if __name__ == "__main__":
    main()
