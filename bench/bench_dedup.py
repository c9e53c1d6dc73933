"""dedup: raylm's near dedup on Ray Data (both cores) vs a plain single-process datasketch MinHash + LSH loop.

    python bench/bench_dedup.py            # the whole corpus (bench/corpus.py)
    python bench/bench_dedup.py --mb 10    # a slice, for development

Same definition on both sides: 5-word shingles of lower-cased `\\w+` words, 128 permutations (seed 1), LSH at
Jaccard 0.8 with datasketch's own (bands, rows); a candidate pair is a duplicate when its estimated Jaccard reaches
0.8 (with raylm's streaming `find_duplicates`: every LSH candidate pair, as datasketch's MinHashLSH returns
them, no extra filter); duplicates are the members of each connected component except its smallest doc_id.
A: one process, `MinHash.update_batch` per document, `MinHashLSH` insert + query. B: `raylm.data.dedup.
near_duplicates` on a dataset already in Ray's object store (Ray start-up and the put are reported apart).
Correctness first: the duplicate sets must be identical.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from common import Result, finish, interleave, private_ray, ratios, spread  # noqa: E402

TARGET = 1.5
WORD = re.compile(r"\w+")
SHINGLE, NUM_PERM, THRESHOLD = 5, 128, 0.8


def plain_dedup(doc_ids: list[str], texts: list[str], verify: bool, exact_keys: list[str] | None = None) -> set[str]:
    """Connected components of LSH candidate pairs (with `verify`, only pairs whose estimated Jaccard reaches the
    threshold) and, given `exact_keys`, of documents with equal keys; every member but the smallest doc_id is a
    duplicate."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    sigs = {}
    for doc_id, text in zip(doc_ids, texts):
        words = WORD.findall(text.lower())
        grams = ({" ".join(words[i:i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)}
                 if len(words) > SHINGLE else {" ".join(words).encode()})
        mh = MinHash(num_perm=NUM_PERM, seed=1)
        mh.update_batch(list(grams))
        sigs[doc_id] = mh
        lsh.insert(doc_id, mh, check_duplication=False)
    parent = {d: d for d in doc_ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first: dict[str, str] = {}
    for doc_id, key in zip(doc_ids, exact_keys or ()):
        ra, rb = find(doc_id), find(first.setdefault(key, doc_id))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for doc_id in doc_ids:
        mh = sigs[doc_id]
        for other in lsh.query(mh):
            if other > doc_id and (not verify or float(np.mean(mh.hashvalues == sigs[other].hashvalues)) >= THRESHOLD):
                ra, rb = find(doc_id), find(other)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return {d for d in doc_ids if find(d) != d}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=None, help="first MB of the corpus (default: all of it)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    import ray

    from raylm.config import Clean
    from raylm.data import dedup, prepare_context

    res = Result("dedup", f">={TARGET}", None, None, "", "")
    table = corpus.docs(args.mb)
    doc_ids, texts = table["doc_id"].to_pylist(), table["text"].to_pylist()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    t0 = time.perf_counter()
    private_ray()
    ray_init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    streaming = hasattr(dedup, "find_duplicates")  # issue 11's dedup: exact + near in one pass, no Jaccard filter
    if streaming:  # the clean stage's exact_key column, which find_duplicates expects (not timed: cleaning's work)
        import pyarrow as pa

        from raylm.data.clean import exact_key

        table = table.append_column("exact_key", pa.array([exact_key(t) for t in texts], pa.string()))
    ds = ray.data.from_arrow(table).repartition(max(8, len(texts) // 2000)).materialize()
    put_s = time.perf_counter() - t0
    clean = Clean(dedup="near", near_dup_threshold=THRESHOLD, num_perm=NUM_PERM, shingle_size=SHINGLE)
    found: dict[str, set] = {}

    def plain() -> dict:
        t0 = time.perf_counter()
        found["A"] = plain_dedup(doc_ids, texts, verify=not streaming)
        return {"s": time.perf_counter() - t0, "duplicates": len(found["A"])}

    def raylm() -> dict:
        import tempfile

        import pyarrow.parquet as pq

        t0 = time.perf_counter()
        if streaming:  # under the Ray Data settings `raylm prepare` runs with (order kept, sort shuffle)
            with tempfile.TemporaryDirectory(prefix="raylm-bench-dedup-") as tmp, prepare_context():
                dedup.find_duplicates(ds, clean, len(texts), Path(tmp) / "drops.parquet")
                found["B"] = set(pq.read_table(Path(tmp) / "drops.parquet")["doc_id"].to_pylist())
        else:
            found["B"] = dedup.near_duplicates(ds, clean)
        return {"s": time.perf_counter() - t0, "duplicates": len(found["B"])}

    t0 = time.perf_counter()
    raylm()  # untimed warm-up: the first pass spawns and imports Ray's workers (start-up, reported apart)
    warmup_s = time.perf_counter() - t0
    runs = interleave({"A": plain, "B": raylm}, args.rounds)
    same = found["A"] == found["B"]
    a_dps = [len(texts) / r["s"] for r in runs["A"]]
    b_dps = [len(texts) / r["s"] for r in runs["B"]]
    rat = ratios(a_dps, b_dps)
    med = spread(rat)["median"]
    res.ratio, res.passed = med, same and med >= TARGET
    res.a, res.b = f"{spread(a_dps)['median']:,.0f}docs/s", f"{spread(b_dps)['median']:,.0f}docs/s"
    only_a, only_b = sorted(found["A"] - found["B"]), sorted(found["B"] - found["A"])
    res.details = {"semantics": "LSH candidates, no Jaccard filter (find_duplicates)" if streaming else
                   "LSH candidates verified at the threshold (near_duplicates)", "corpus_mb": mb, "documents": len(texts), "duplicates_A": len(found["A"]),
                   "duplicates_B": len(found["B"]), "identical_duplicate_set": same,
                   "only_A_sample": only_a[:20], "only_B_sample": only_b[:20], "only_A": len(only_a),
                   "only_B": len(only_b), "ray_init_s": ray_init_s, "put_s": put_s, "warmup_s": warmup_s, "A_docs_s": spread(a_dps),
                   "B_docs_s": spread(b_dps), "ratio": spread(rat), "per_round_ratio": rat, "runs": runs}
    finish(res, [f"dedup: {mb:.0f} MB, {len(texts):,} docs; duplicates A {len(found['A']):,} B {len(found['B']):,} "
                 f"identical {same} (only A {len(only_a)}, only B {len(only_b)}); spread ±{spread(rat)['spread_pct']:.0f}%; "
                 f"start-up: ray.init {ray_init_s:.1f}s, put {put_s:.1f}s, B warm-up pass {warmup_s:.1f}s"])


if __name__ == "__main__":
    main()
