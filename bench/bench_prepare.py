"""prepare: the whole `raylm prepare` on Ray Data (both cores) vs the same steps as a plain single-process loop.

    python bench/bench_prepare.py              # the whole corpus as JSONL (>= 200 MB of text, bench/corpus.py)
    python bench/bench_prepare.py --mb 20      # a slice, for development

Throughput is MB of raw input (the JSONL files) per second. Both arms take the same config (the defaults: HTML
stripping, ftfy, NFKC, length limits, exact + near dedup at 0.8 with 128 permutations, seeded 70/15/15 split,
block 256, 4 shards per split) and the benchmark's pretrained BPE 8k tokenizer (tokenizer training is a bounded
sample, not what this compares), and write the same files: shards, `rejected/`, the per-document split list.
A: one Python process, no Ray: raylm's JSONL parser and `clean_batch` (selectolax, ftfy, unicodedata) over
batches of the file, datasketch MinHash + LSH with exact keys (`bench_dedup.plain_dedup`), the seeded split,
`tokenizers` `encode_batch_fast` (its own threads; the call prepare makes), a seeded shuffle, packing, pyarrow writes.
B: `raylm.data.prepare(cfg)` on a private Ray (ray.init and one untimed warm-up prepare of a small slice,
which spawns and imports the workers, are start-up, reported apart).
Correctness first: documents read, dropped by reason, the duplicate count and per split the documents are equal;
packed tokens agree within one block per pack group.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from common import CACHE, Result, finish, interleave, private_ray, ratios, spread  # noqa: E402

TARGET = 1.5
WARMUP_MB = 2


def config(src: Path, out: str):
    from raylm.config import load_config

    return load_config(None, [f"output_dir={out}", f"data.sources=[{{path: {src}/*.jsonl, format: jsonl, text_field: text}}]",
                              f"data.tokenizer={{pretrained: {CACHE / 'tokenizer-bpe8k'}}}"])


def plain_prepare(cfg, out: Path) -> dict:
    """The steps of `raylm prepare` (causal LM, one JSONL source, no quality preset) as one plain loop."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_dedup import plain_dedup
    from transformers import AutoTokenizer

    from raylm.data import SPLITS, split_of
    from raylm.data.clean import clean_batch
    from raylm.data.readers import expand_paths, parse_jsonl, to_table

    d, src = cfg.data, cfg.data.sources[0]
    out.mkdir(parents=True, exist_ok=True)
    stages, t0 = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        stages[name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    kept_ids, kept_texts, kept_keys, dropped = [], [], [], {}
    rejected: list[pa.Table] = []
    for path in expand_paths(src.path, "data.sources.0.path"):
        rows = [{"doc_id": f"000|{path}|{pos:012d}", "source": src.name, "format": src.format, "text": text,
                 "label": label, "reason": reason} for pos, text, label, reason in parse_jsonl(path, 0, os.path.getsize(path), src)]
        for i in range(0, len(rows), 256):
            t = clean_batch(to_table(rows[i:i + 256]), d.clean, d.quality)
            reasons = t["reason"].to_pylist()
            for doc_id, text, key, reason in zip(t["doc_id"].to_pylist(), t["text"].to_pylist(), t["exact_key"].to_pylist(), reasons):
                if reason is None:
                    kept_ids.append(doc_id), kept_texts.append(text), kept_keys.append(key)
                else:
                    dropped[reason] = dropped.get(reason, 0) + 1
            mask = pa.array([r is not None for r in reasons])
            rejected.append(t.filter(mask).select(["doc_id", "source", "reason", "text"]))
    read = len(kept_ids) + sum(dropped.values())
    lap("read+clean")
    dups = plain_dedup(kept_ids, kept_texts, verify=False, exact_keys=kept_keys) if d.clean.dedup != "none" else set()
    lap("dedup")
    fractions = d.split.model_dump()
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for doc_id, text in zip(kept_ids, kept_texts):
        if doc_id in dups:
            continue
        by_split[split_of(doc_id, fractions, cfg.seed)].append((doc_id, text))
    dup_ids = sorted(dups)
    rejected.append(pa.table({"doc_id": dup_ids, "source": [src.name] * len(dup_ids), "reason": ["duplicate"] * len(dup_ids),
                              "text": pa.nulls(len(dup_ids), pa.string())}))
    pq.write_table(pa.concat_tables(rejected), out / "rejected.parquet")
    pq.write_table(pa.table({"doc_id": [x for s in SPLITS for x, _ in by_split[s]],
                             "split": [s for s in SPLITS for _ in by_split[s]]}), out / "documents.parquet")
    lap("split+rejected")
    tok = AutoTokenizer.from_pretrained(d.tokenizer.pretrained)
    backend, eos, block = tok.backend_tokenizer, tok.eos_token_id, d.block_size
    rng = np.random.default_rng(cfg.seed)
    splits = {}
    for s in SPLITS:
        docs = [by_split[s][i] for i in rng.permutation(len(by_split[s]))]  # a seeded global order
        stream = np.fromiter((i for e in backend.encode_batch_fast([t for _, t in docs], add_special_tokens=False)
                              for i in (*e.ids, eos)), dtype=np.int32)
        n = len(stream) // block
        rows = stream[: n * block].reshape(n, block)
        for k, part in enumerate(np.array_split(rows, d.shards_per_split)):
            pq.write_table(pa.table({"input_ids": pa.array(list(part), pa.list_(pa.int32()))}), out / f"{s}-{k:05d}.parquet")
        splits[s] = {"documents": len(docs), "tokens": n * block}
        lap(f"tokenize+pack {s}")
    return {"documents_read": read, "dropped": dict(sorted(dropped.items())), "duplicates": len(dups), "splits": splits,
            "stages_s": stages}


def summary(manifest: dict) -> dict:
    dropped = {k: v for k, v in manifest["dropped"].items() if not k.endswith("_duplicate")}
    return {"documents_read": manifest["documents_read"], "dropped": dict(sorted(dropped.items())),
            "duplicates": manifest["duplicates"]["exact"] + manifest["duplicates"]["near"],
            "splits": {s: {"documents": v["documents"], "tokens": v["tokens"]} for s, v in manifest["splits"].items()}}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=None, help="first MB of the corpus (default: all of it)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    from bench_tokenize import bench_tokenizer

    from raylm.data import prepare
    from raylm.data.pack import GROUP_CHARS

    bench_tokenizer()  # the cached BPE 8k both arms load
    if args.mb is None:
        args.mb = sum(len(t.encode()) for t in corpus.docs()["text"].to_pylist()) / 1e6
    src = corpus.slice_dir(args.mb)
    raw_mb = sum(p.stat().st_size for p in src.glob("*.jsonl")) / 1e6
    res = Result("prepare", f">={TARGET}", None, None, "", "")
    t0 = time.perf_counter()
    private_ray()
    ray_init_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="raylm-bench-prepare-") as tmp:
        t0 = time.perf_counter()
        prepare(config(corpus.slice_dir(WARMUP_MB), f"{tmp}/warmup"))  # untimed: spawns and imports the workers
        warmup_s = time.perf_counter() - t0
        plain_prepare(config(corpus.slice_dir(WARMUP_MB), f"{tmp}/warmup-a"), Path(tmp, "warmup-a"))  # imports
        found: dict[str, dict] = {}

        def plain() -> dict:
            out = Path(tmp, f"a-{len(found)}")
            t0 = time.perf_counter()
            found["A"] = plain_prepare(config(src, str(out)), out)
            found["A_stages"] = found["A"].pop("stages_s")
            s = time.perf_counter() - t0
            remove_output(out)
            return {"s": s, "MB/s": raw_mb / s}

        def raylm() -> dict:
            out = Path(tmp, f"b-{len(found)}")
            t0 = time.perf_counter()
            manifest = prepare(config(src, str(out)))
            s = time.perf_counter() - t0
            found["B"] = summary(manifest)
            found["B_stages"] = manifest["stages_s"]
            remove_output(out)
            return {"s": s, "MB/s": raw_mb / s}

        runs = interleave({"A": plain, "B": raylm}, args.rounds)
    a, b = found["A"], found["B"]
    same_docs = {k: a[k] for k in ("documents_read", "dropped", "duplicates")} == {k: b[k] for k in ("documents_read", "dropped", "duplicates")}
    same_docs &= all(a["splits"][s]["documents"] == b["splits"][s]["documents"] for s in a["splits"])
    # raylm packs each pack group (~GROUP_CHARS of text) on its own and drops each group's last partial block
    max_groups = max(1, int(raw_mb * 1e6 // GROUP_CHARS) + 1)
    tokens_close = all(abs(a["splits"][s]["tokens"] - b["splits"][s]["tokens"]) <= max_groups * 256 for s in a["splits"])
    # what B could reach with zero overhead: A's single-process stages split across the cores, A's tokenize+pack as
    # is (encode_batch_fast already runs on every core there)
    cores = os.cpu_count() or 1
    a_tokenize = sum(v for k, v in found["A_stages"].items() if k.startswith("tokenize"))
    a_total = sum(found["A_stages"].values())
    ceiling = a_total / ((a_total - a_tokenize) / cores + a_tokenize)
    a_mbs, b_mbs = [r["MB/s"] for r in runs["A"]], [r["MB/s"] for r in runs["B"]]
    rat = ratios(a_mbs, b_mbs)
    med = spread(rat)["median"]
    res.ratio, res.passed = med, same_docs and tokens_close and med >= TARGET
    res.a, res.b = f"{spread(a_mbs)['median']:.2f}MB/s", f"{spread(b_mbs)['median']:.2f}MB/s"
    res.details = {"raw_input_mb": raw_mb, "corpus_text_mb": args.mb, "same_documents": same_docs,
                   "tokens_within_one_block_per_group": tokens_close, "A_result": a, "B_result": b,
                   "A_stages_s": found["A_stages"], "B_stages_s": found["B_stages"], "zero_overhead_ceiling": ceiling,
                   "ray_init_s": ray_init_s, "warmup_s": warmup_s,
                   "A_MB_s": spread(a_mbs), "B_MB_s": spread(b_mbs), "ratio": spread(rat), "per_round_ratio": rat,
                   "runs": runs}
    finish(res, [f"prepare: {raw_mb:.0f} MB of JSONL, {a['documents_read']:,} docs; same documents {same_docs}, "
                 f"tokens close {tokens_close} (A {sum(v['tokens'] for v in a['splits'].values()):,}, "
                 f"B {sum(v['tokens'] for v in b['splits'].values()):,}); spread ±{spread(rat)['spread_pct']:.0f}%; "
                 f"ceiling at zero overhead {ceiling:.2f} (A's stages on {cores} cores, its tokenize+pack as is); "
                 f"start-up: ray.init {ray_init_s:.1f}s, warm-up prepare ({WARMUP_MB} MB) {warmup_s:.1f}s; "
                 f"A stages {found['A_stages']}; B stages {found['B_stages']}"])


def remove_output(out: Path) -> None:
    """Each run's output is removed before the next: disk, not page cache, holds the corpus."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
