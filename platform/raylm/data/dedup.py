"""Deduplication on Ray Data: exact (normalized-text hash) and near (datasketch MinHash + LSH banding).

Only (key, doc_id) pairs are shuffled. Every document emits its exact key and, for near dedup, one key per LSH
band (`b` bands of `r` rows, datasketch's own optimal split for the threshold). Pairs are grouped by a coarse
bucket of their key (bucket count sized from the data), and inside a bucket each key with two or more members
yields star edges member -> smallest member: documents sharing a key are candidates exactly as in datasketch's
`MinHashLSH` (no extra similarity filter). Clusters are the connected components of those edges, computed in
one Ray task over the edge list (never on the driver); each cluster keeps its smallest `doc_id`. The dropped
documents (`doc_id`, `reason` exact_duplicate | near_duplicate, `cluster_root`, `cluster_size`) are written to
Parquet, and stay in the object store as one table for the pipeline to apply (no bigger than what the
union-find task already holds); only counts and the cluster-size histogram come back to the driver.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from raylm.config import Clean
from raylm.data.shuffle import grouped

_WORD = re.compile(r"\w+")
EXACT_PREFIX = "x:"  # pair keys from the exact hash; band keys are "<band>:<hash>"
PAIRS_PER_BUCKET = 2_000_000  # (key, doc_id) pairs one map_groups call handles, about 200 MB


def shingles(text: str, size: int) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return [" ".join(words).encode()]
    return list({" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)})


def lsh_params(cfg: Clean) -> tuple[int, int]:
    """(bands, rows) minimizing false positives + negatives at the threshold (datasketch's own choice)."""
    return _optimal_param(cfg.near_dup_threshold, cfg.num_perm, 0.5, 0.5)


def signatures(texts: list[str], cfg: Clean) -> list[np.ndarray]:
    """datasketch MinHash values (seed 1) per text; `bulk` shares one permutation table across the batch."""
    return [m.hashvalues for m in MinHash.bulk([shingles(t, cfg.shingle_size) for t in texts],
                                               num_perm=cfg.num_perm, seed=1)]


def bucket_of(keys: list[str], buckets: int) -> pa.Array:
    return pa.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") % buckets
                     for k in keys], pa.int64())


def pair_keys(batch: pa.Table, cfg: Clean, near: bool, buckets: int) -> pa.Table:
    """Ray Data map_batches: one (bucket, key, doc_id) row per document and key (exact hash, LSH bands)."""
    ids, keys = [], []
    doc_ids = batch["doc_id"].to_pylist()
    ids += doc_ids
    keys += [EXACT_PREFIX + k for k in batch["exact_key"].to_pylist()]
    if near:
        bands, rows = lsh_params(cfg)
        for doc_id, sig in zip(doc_ids, signatures(batch["text"].to_pylist(), cfg)):
            for b in range(bands):
                ids.append(doc_id)
                keys.append(f"{b}:{hashlib.blake2b(sig[b * rows:(b + 1) * rows].tobytes(), digest_size=12).hexdigest()}")
    return pa.table({"bucket": bucket_of(keys, buckets), "key": pa.array(keys, pa.string()),
                     "doc_id": pa.array(ids, pa.string())})


def bucket_edges(group: pa.Table) -> pa.Table:
    """Ray Data map_groups over one coarse bucket: for each key with >= 2 documents, an edge from every member
    to the key's smallest member (vectorized in Arrow)."""
    agg = group.group_by("key").aggregate([("doc_id", "min"), ("doc_id", "count")])
    agg = agg.filter(pc.greater(agg["doc_id_count"], 1)).select(["key", "doc_id_min"])
    joined = group.select(["key", "doc_id"]).join(agg, "key", join_type="inner")
    joined = joined.filter(pc.not_equal(joined["doc_id"], joined["doc_id_min"]))
    return pa.table({"doc_id": joined["doc_id"], "root": joined["doc_id_min"],
                     "exact": pc.starts_with(joined["key"], EXACT_PREFIX)})


@ray.remote(num_returns=2)
def connected_components(edge_refs: list, out_path: str) -> tuple[dict, pa.Table]:
    """Union-find over every edge in one task; writes the dropped documents to `out_path` (Parquet) and returns
    counts with the cluster-size histogram (clusters of 2+ documents), and the dropped (doc_id, reason) table."""
    edges = [t for t in ray.get(edge_refs) if t.num_rows]
    parent: dict[str, str] = {}
    exact: set[str] = set()

    def find(x: str) -> str:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for t in edges:
        for a, b, is_exact in zip(t["doc_id"].to_pylist(), t["root"].to_pylist(), t["exact"].to_pylist()):
            ra, rb = find(a), find(b)
            if ra != rb:  # the smaller id becomes the root: each cluster keeps its smallest doc_id
                lo, hi = (ra, rb) if ra < rb else (rb, ra)
                parent[hi] = lo
                parent.setdefault(lo, lo)
            if is_exact:
                exact.add(a)
    roots = {x: find(x) for x in parent}
    sizes: dict[str, int] = {}
    for r in roots.values():
        sizes[r] = sizes.get(r, 0) + 1
    dropped = sorted(x for x, r in roots.items() if x != r)
    table = pa.table({
        "doc_id": pa.array(dropped, pa.string()),
        "reason": pa.array(["exact_duplicate" if x in exact else "near_duplicate" for x in dropped], pa.string()),
        "cluster_root": pa.array([roots[x] for x in dropped], pa.string()),
        "cluster_size": pa.array([sizes[roots[x]] for x in dropped], pa.int64()),
    })
    from raylm.storage import resolve

    fs, path = resolve(out_path)  # a local path or a URI: this task runs on any node
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    hist: dict[int, int] = {}
    for size in sizes.values():
        hist[size] = hist.get(size, 0) + 1
    n_exact = sum(1 for x in dropped if x in exact)
    return ({"exact": n_exact, "near": len(dropped) - n_exact, "clusters": len(sizes),
             "cluster_sizes": {str(k): v for k, v in sorted(hist.items())}}, table.select(["doc_id", "reason"]))


def find_duplicates(kept: ray.data.Dataset, cfg: Clean, n_docs: int, out_path: str | Path) -> tuple[dict, ray.ObjectRef]:
    """Exact (and, for `dedup: near`, near) duplicates among `kept` (columns doc_id, text, exact_key); the
    dropped documents land in `out_path`. Returns counts with the cluster-size histogram, and a reference to the
    dropped (doc_id, reason) table in the object store (sorted by doc_id; never fetched by the driver)."""
    near = cfg.dedup == "near"
    pairs_per_doc = 1 + (lsh_params(cfg)[0] if near else 0)
    buckets = max(1, -(-n_docs * pairs_per_doc // PAIRS_PER_BUCKET))
    # a whole block a call: a batch size keeps the read from fusing with this map (then it runs on its own share of
    # the CPU budget); per-call cost and driver bookkeeping do not scale with the document count
    pairs = kept.select_columns(["doc_id", "text", "exact_key"]).map_batches(
        pair_keys, fn_kwargs={"cfg": cfg, "near": near, "buckets": buckets}, batch_format="pyarrow", batch_size=None)
    edges = grouped(pairs, "bucket", buckets).map_groups(bucket_edges, batch_format="pyarrow")
    counts, drops = connected_components.remote(edges.to_arrow_refs(), str(out_path))
    return ray.get(counts), drops


def reference_duplicates(docs: list[tuple[str, str]], cfg: Clean) -> set[str]:
    """The same duplicate set from a plain single-process datasketch MinHash + MinHashLSH run (exact duplicates
    included: they share every band). For tests and benchmarks: `docs` is [(doc_id, cleaned text)]."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm)
    hashes = {}
    for doc_id, text in docs:
        m = MinHash(num_perm=cfg.num_perm, seed=1)
        m.update_batch(shingles(text, cfg.shingle_size))
        hashes[doc_id] = m
        lsh.insert(doc_id, m)
    parent: dict[str, str] = {d: d for d, _ in docs}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for doc_id, m in hashes.items():
        for other in lsh.query(m):
            ra, rb = find(doc_id), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {d for d in parent if find(d) != d}
