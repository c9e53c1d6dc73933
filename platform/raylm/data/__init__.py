"""`raylm prepare`: raw text to tokenized Parquet shards with Ray Data.

read (readers.py) -> clean (clean.py) -> dedup exact/near (dedup.py) -> split documents by seed -> train or load
the tokenizer on the train split (tokenizer.py) -> tokenize, pack, write shards (pack.py) -> manifest.json.
Everything lands in a temporary directory renamed to `output_dir/data` at the end, so a crashed run never
leaves a half-written `data/` behind. See docs/CONTRACTS.md (`data/`) for the layout other stages read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import DataContext

from raylm.config import Config
from raylm.data.clean import PII_TYPES, clean_batch
from raylm.data.dedup import exact_duplicates, near_duplicates
from raylm.data.pack import pack_group, tokenize_classification, tokenize_lm, write_shards
from raylm.data.quality import quality_summary
from raylm.data.readers import read_source
from raylm.data.tokenizer import build_tokenizer, special_ids
from raylm.storage import resolve as resolve_storage, shard_dir, stage_io, write_json_atomic

__all__ = ["prepare", "assign_splits", "SPLITS"]
log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
# shard schemas by "is classification" (docs/CONTRACTS.md `data/`)
SHARD_SCHEMAS = {
    False: pa.schema([("input_ids", pa.list_(pa.int32()))]),
    True: pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())), ("label", pa.int64())]),
}


def assign_splits(doc_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """doc_id -> split. Documents are ranked by a seeded hash and cut by the fractions (rounded; a split with a
    positive fraction gets at least one document when there are enough), so the result depends only on the
    set of ids and the seed, never on read order."""
    ranked = sorted(doc_ids, key=lambda d: hashlib.blake2b(f"{seed}:{d}".encode(), digest_size=8).digest())
    n = len(ranked)
    n_val = round(n * fractions["val"]) or (1 if fractions["val"] > 0 and n >= 3 else 0)
    n_test = round(n * fractions["test"]) or (1 if fractions["test"] > 0 and n >= 3 else 0)
    n_train = n - n_val - n_test
    return {d: ("train" if i < n_train else "val" if i < n_train + n_val else "test") for i, d in enumerate(ranked)}


def pack_groups(split_of: dict[str, str], shards: int) -> dict[str, int]:
    """doc_id -> pack group: contiguous runs (in doc_id order) of each split, one run per output shard."""
    groups = {}
    for split in SPLITS:
        ids = sorted(d for d, s in split_of.items() if s == split)
        k = max(1, min(shards, len(ids)))
        groups.update({d: i * k // len(ids) for i, d in enumerate(ids)})
    return groups


def drop_ids(batch: pa.Table, ids: list[str]) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["doc_id"], value_set=pa.array(ids, pa.string()))))


def in_split(ds: ray.data.Dataset, split: str) -> ray.data.Dataset:
    return ds.map_batches(lambda t: t.filter(pc.equal(t["split"], split)), batch_format="pyarrow")


def annotate(batch: pa.Table, assignment: dict[str, tuple[str, int]]) -> pa.Table:
    split, group = zip(*(assignment[d] for d in batch["doc_id"].to_pylist())) if batch.num_rows else ((), ())
    return batch.append_column("split", pa.array(split, pa.string())).append_column("pack_group", pa.array(group, pa.int64()))


def require_label(batch: pa.Table) -> pa.Table:
    """Classification: a kept document without a label is dropped as `no_label`."""
    missing = pc.and_(pc.is_null(batch["reason"]), pc.is_null(batch["label"]))
    reason = pc.if_else(missing, pa.scalar("no_label"), batch["reason"])
    return batch.set_column(batch.column_names.index("reason"), "reason", reason)


def label_ids(labels: list[str]) -> dict[str, int]:
    """Ids by sorted label (numerically when every label is an integer)."""
    uniq = set(labels)
    key = int if all(lbl.lstrip("-").isdigit() for lbl in uniq) else str
    return {lbl: i for i, lbl in enumerate(sorted(uniq, key=key))}


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    import raylm

    return {"raylm": getattr(raylm, "__version__", "0"), "ray": ray.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "pyarrow": pa.__version__, "python": platform.python_version()}


@stage_io("prepare")  # remote output_dir: data/ is built in this node's mirror, then uploaded
def prepare(cfg: Config) -> dict:
    """Run the data stage for `cfg`; writes `output_dir/data/` and returns the manifest."""
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.default_hash_shuffle_parallelism)
    # rows keep their read order through every map/filter: same config + seed -> byte-identical shards
    ctx.execution_options.preserve_order = True
    # task-based sort shuffle with few partitions: the actor-based hash shuffle (200 partitions by default)
    # costs minutes of start-up on a small machine for a few MB of data
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.default_hash_shuffle_parallelism = 4
    try:
        return _prepare(cfg)
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.default_hash_shuffle_parallelism = saved


def _prepare(cfg: Config) -> dict:
    start = time.time()
    d, task, block = cfg.data, cfg.model.task, cfg.data.block_size
    final_dir = cfg.path("data")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    work = final_dir.with_name(f".data.tmp-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    try:
        # -- read + clean (one pass, materialized: everything after reads it)
        sources = [read_source(src, i) for i, src in enumerate(d.sources)]
        raw = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
        cleaned = raw.map_batches(clean_batch, fn_kwargs={"cfg": d.clean, "quality": d.quality}, batch_format="pyarrow", batch_size=16)
        if task == "classification":
            cleaned = cleaned.map_batches(require_label, batch_format="pyarrow")
        cleaned = cleaned.materialize()
        meta = cleaned.select_columns(["doc_id", "source", "reason", "label", *(f"pii_{t}" for t in PII_TYPES)]).to_arrow_refs()
        meta = pa.concat_tables(ray.get(meta)).to_pydict()
        kept_ids = [i for i, r in zip(meta["doc_id"], meta["reason"]) if r is None]
        if not kept_ids:
            raise RuntimeError(f"no documents left after cleaning (dropped: {dict(Counter(meta['reason']))})")
        kept = cleaned.map_batches(lambda t: t.filter(pc.is_null(t["reason"])), batch_format="pyarrow")

        # -- dedup: exact first (cheap), then near on the survivors
        exact, near = set(), set()
        if d.clean.dedup in ("exact", "near"):
            exact = exact_duplicates(kept)
            kept = kept.map_batches(drop_ids, fn_kwargs={"ids": sorted(exact)}, batch_format="pyarrow") if exact else kept
        if d.clean.dedup == "near":
            near = near_duplicates(kept, d.clean)
            kept = kept.map_batches(drop_ids, fn_kwargs={"ids": sorted(near)}, batch_format="pyarrow") if near else kept
        kept_ids = sorted(set(kept_ids) - exact - near)

        # -- split documents (before tokenizing or packing: no document straddles two splits)
        split_of = assign_splits(kept_ids, d.split.model_dump(), cfg.seed)
        group_of = pack_groups(split_of, d.shards_per_split)
        assignment = {doc: (split_of[doc], group_of[doc]) for doc in kept_ids}
        docs = kept.select_columns(["doc_id", "source", "text", "label"]).map_batches(
            annotate, fn_kwargs={"assignment": assignment}, batch_format="pyarrow").materialize()
        label_of = dict(zip(meta["doc_id"], meta["label"]))
        label_map = label_ids([label_of[i] for i in kept_ids]) if task == "classification" else None

        # -- tokenizer, on the train split only
        def train_texts():
            for b in in_split(docs, "train").iter_batches(batch_format="pyarrow", batch_size=256):
                yield from b["text"].to_pylist()

        tok = build_tokenizer(cfg, train_texts, work / "tokenizer")

        # -- tokenize, pack, write each split
        splits = {}
        for split in SPLITS:
            part = in_split(docs, split)
            n_docs = sum(1 for s in split_of.values() if s == split)
            if task == "classification":
                rows = part.map_batches(tokenize_classification, batch_format="pyarrow", batch_size=256, fn_kwargs={
                    "tokenizer": tok, "block_size": block, "label_map": label_map})
                rows = rows.select_columns(["input_ids", "attention_mask", "label", "n_tokens"]).materialize()
                tokens = int(rows.sum("n_tokens") or 0) if rows.count() else 0
                rows = rows.drop_columns(["n_tokens"])
            else:
                ids = part.map_batches(tokenize_lm, batch_format="pyarrow", batch_size=64,
                                       fn_kwargs={"tokenizer": tok, "task": task})
                rows = (ids.groupby("pack_group", num_partitions=4).map_groups(pack_group, fn_kwargs={"block_size": block}, batch_format="pyarrow")
                        .sort(["pack_group", "seq"]).select_columns(["input_ids"]).materialize())
                tokens = rows.count() * block
            n_rows = rows.count()
            out = shard_dir(cfg, work, split)  # the run's temp dir, or the object store itself
            if n_rows:
                shards = write_shards(rows, out, split, min(d.shards_per_split, n_rows))
            else:  # an empty split still has one (empty) shard with the schema, so readers need no special case
                fs, path = resolve_storage(out)
                fs.create_dir(path)
                pq.write_table(SHARD_SCHEMAS[task == "classification"].empty_table(), f"{path}/{split}-00000.parquet",
                               filesystem=fs)
                shards = [f"{split}-00000.parquet"]
            splits[split] = {"documents": n_docs, "tokens": tokens, "rows": n_rows, "shards": len(shards)}

        # -- per-document audit trail: which split each kept document went to
        pq.write_table(pa.table({"doc_id": kept_ids, "split": [split_of[i] for i in kept_ids]}), work / "documents.parquet")

        read_per_source = Counter(meta["source"])
        kept_set = set(kept_ids)
        kept_per_source = Counter(s for i, s in zip(meta["doc_id"], meta["source"]) if i in kept_set)
        manifest = {
            "task": task,
            "block_size": block,
            "vocab_size": len(tok),
            "special_tokens": special_ids(tok),
            "label_map": label_map,
            "splits": splits,
            "sources": [{"name": s.name, "format": s.format or ("builtin" if s.builtin else "hf_dataset"),
                         "documents_read": read_per_source.get(s.name, 0), "documents_kept": kept_per_source.get(s.name, 0)}
                        for s in d.sources],
            "documents_read": len(meta["doc_id"]),
            "documents_kept": len(kept_ids),
            "dropped": dict(sorted(Counter(r for r in meta["reason"] if r is not None).items())),
            "duplicates": {"exact": len(exact), "near": len(near)},
            "pii": {t: int(sum(meta[f"pii_{t}"])) for t in PII_TYPES},
            "quality": quality_summary(cleaned, d.quality),  # per rule: drops by source/language, examples
            "config": cfg.model_dump(mode="json"),
            "config_hash": cfg.config_hash(),
            "versions": versions(),
            "wall_time_s": round(time.time() - start, 2),
        }
        write_json_atomic(work / "manifest.json", manifest)
        # swap the finished directory in
        old = final_dir.with_name(f".data.old-{uuid.uuid4().hex[:8]}")
        if final_dir.exists():
            os.replace(final_dir, old)
        os.replace(work, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_split = ", ".join(f"{s} {v['tokens']:,}" for s, v in splits.items())
    print(f"raylm prepare: {manifest['documents_read']:,} docs read -> {manifest['documents_kept']:,} kept "
          f"({sum(manifest['dropped'].values()):,} dropped, {len(exact) + len(near):,} duplicates); "
          f"tokens {per_split}; {manifest['wall_time_s']:.1f}s -> {final_dir}", flush=True)
    return manifest
