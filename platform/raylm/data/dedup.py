"""Deduplication on Ray Data: exact (normalized-text hash) and near (datasketch MinHash + LSH banding).

Both find duplicates with a `groupby` over a key, so documents that are duplicates of each other meet in the
same group whatever block they were read into. Near duplicates: each document's MinHash signature is cut into
`b` bands of `r` rows (datasketch's optimal split for the threshold); documents sharing a band hash are
candidates, kept as an edge when their estimated Jaccard similarity reaches the threshold. Clusters are the
connected components of those edges; each cluster keeps its smallest `doc_id` (deterministic).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import ray
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from raylm.config import Clean

_WORD = re.compile(r"\w+")
MAX_PAIRWISE = 64  # larger buckets (boilerplate) compare each member to the bucket's first document only


def shingles(text: str, size: int) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def lsh_params(cfg: Clean) -> tuple[int, int]:
    """(bands, rows) minimizing false positives + negatives at the threshold (datasketch's own choice)."""
    return _optimal_param(cfg.near_dup_threshold, cfg.num_perm, 0.5, 0.5)


def signature_bands(batch: pa.Table, cfg: Clean, bands: int, rows: int) -> pa.Table:
    """Ray Data map_batches: one row per (document, band) with the band's hash and the full signature."""
    out_ids, out_keys, out_sigs = [], [], []
    for doc_id, text in zip(batch["doc_id"].to_pylist(), batch["text"].to_pylist()):
        mh = MinHash(num_perm=cfg.num_perm, seed=1)
        mh.update_batch(list(shingles(text, cfg.shingle_size)))
        sig = mh.hashvalues.astype(np.uint64)
        for b in range(bands):
            band = sig[b * rows:(b + 1) * rows]
            out_ids.append(doc_id)
            out_keys.append(f"{b}:{hashlib.blake2b(band.tobytes(), digest_size=8).hexdigest()}")
            out_sigs.append(sig)
    return pa.table({"doc_id": pa.array(out_ids, pa.string()), "band_key": pa.array(out_keys, pa.string()),
                     "sig": pa.array([s.tolist() for s in out_sigs], pa.list_(pa.uint64()))})


def bucket_edges(group: pa.Table, threshold: float) -> pa.Table:
    """Ray Data map_groups over one band bucket: edges between members similar enough to be duplicates."""
    empty = pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())})
    if group.num_rows < 2:
        return empty
    order = sorted(range(group.num_rows), key=lambda i: group["doc_id"][i].as_py())
    ids = [group["doc_id"][i].as_py() for i in order]
    sigs = np.array([group["sig"][i].as_py() for i in order], dtype=np.uint64)
    a, b = [], []
    for i in range(len(ids)):
        others = range(i + 1, len(ids)) if len(ids) <= MAX_PAIRWISE or i == 0 else ()
        for j in others:
            if ids[i] != ids[j] and float(np.mean(sigs[i] == sigs[j])) >= threshold:
                a.append(ids[i])
                b.append(ids[j])
    return pa.table({"a": pa.array(a, pa.string()), "b": pa.array(b, pa.string())})


def exact_duplicates(ds: ray.data.Dataset) -> set[str]:
    """doc_ids whose normalized text equals that of a document with a smaller doc_id."""

    def later_members(group: pa.Table) -> pa.Table:
        ids = sorted(group["doc_id"].to_pylist())
        return pa.table({"doc_id": pa.array(ids[1:], pa.string())})

    dups = ds.select_columns(["doc_id", "exact_key"]).groupby("exact_key", num_partitions=4).map_groups(later_members, batch_format="pyarrow")
    return {r["doc_id"] for r in dups.take_all()}


def near_duplicates(ds: ray.data.Dataset, cfg: Clean) -> set[str]:
    """doc_ids that are near duplicates (Jaccard >= threshold, transitively) of a document with a smaller id."""
    bands, rows = lsh_params(cfg)
    banded = ds.select_columns(["doc_id", "text"]).map_batches(
        signature_bands, fn_kwargs={"cfg": cfg, "bands": bands, "rows": rows}, batch_format="pyarrow", batch_size=64)
    edges = banded.groupby("band_key", num_partitions=4).map_groups(bucket_edges, fn_kwargs={"threshold": cfg.near_dup_threshold},
                                                  batch_format="pyarrow")
    # union-find over the (few) edges: each component keeps its smallest doc_id
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in edges.take_all():
        ra, rb = find(e["a"]), find(e["b"])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x for x in parent if find(x) != x}
