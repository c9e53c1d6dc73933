"""`raylm prepare`: raw text to tokenized Parquet shards with Ray Data, streaming end to end.

read (readers.py) -> clean (clean.py) -> staged Parquet -> dedup exact/near over (key, doc_id) pairs (dedup.py)
-> apply drops, split each document by a seeded hash of its id -> staged Parquet, one directory per split and
one for the dropped -> train the tokenizer on a bounded seeded sample of the train split (tokenizer.py) or load
one -> tokenize, shuffle, pack, write shards (pack.py) -> manifest.json. The driver holds counts, never
per-document state: every count is totalled per block (shuffle.group_totals), and the dropped ids stay in the
object store. Every dropped document lands in `data/rejected/` with its reason. Everything lands in a temporary
directory renamed to `output_dir/data` at the end, so a crashed run never leaves a half-written `data/` behind.
See docs/CONTRACTS.md (`data/`) for the layout other stages read.
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
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import DataContext

from raylm.config import Config, ConfigError
from raylm.data.clean import PII_TYPES, clean_batch, scrub_pii
from raylm.data.dedup import find_duplicates
from raylm.data.pack import (SHARD_SCHEMAS, classification_group, group_threads, num_groups, pack_group, shuffled_rows,
                             write_shards)
from raylm.data.quality import quality_summary
from raylm.data.readers import read_source
from raylm.data.shuffle import group_totals
from raylm.data.tokenizer import build_tokenizer, special_ids
from raylm.storage import join, list_files, read_parquet, remove_dir, resolve as resolve_storage, stage_io, task_dir, write_json_atomic

__all__ = ["prepare", "split_of", "SPLITS", "EmptySplitError"]
log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
REJECTED_COLUMNS = ["doc_id", "source", "reason", "text"]  # + `language` when clean_batch adds it
DOC_COLUMNS = ["doc_id", "source", "text", "label"]
REJECTED = "rejected"  # the staged documents' partition of dropped documents, beside train/val/test


class EmptySplitError(ConfigError):
    """A split with a positive fraction got no documents (or no full block): the corpus is too small for it."""


def unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64


def split_of(doc_id: str, fractions: dict[str, float], seed: int) -> str:
    """A document's split from a seeded hash of its id alone: stable, streaming, independent of read order."""
    u = unit_hash(f"{seed}:split:{doc_id}")
    return "train" if u < fractions["train"] else "val" if u < fractions["train"] + fractions["val"] else "test"


def in_sample(batch: pa.Table, seed: int, fraction: float) -> pa.Table:
    """The tokenizer's sample: documents whose seeded hash falls under `fraction`."""
    keep = [unit_hash(f"{seed}:tokenizer:{d}") < fraction for d in batch["doc_id"].to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def where(column: str, value: str | None):
    """map_batches filter: rows whose `column` equals `value` (None: is null)."""
    def keep(t: pa.Table) -> pa.Table:
        return t.filter(pc.is_null(t[column]) if value is None else pc.equal(t[column], value))
    return keep


def keep_raw_text(batch: pa.Table, cfg, quality) -> pa.Table:
    """clean_batch, keeping for data/rejected/ the text of a document it drops: the text the quality rules checked,
    else the raw text (bounded by 10x max_chars, PII-scrubbed like kept text)."""
    out = clean_batch(batch, cfg, quality)
    dropped_early = pc.and_(pc.is_valid(out["reason"]), pc.is_null(out["text"])).to_pylist()
    raw = pc.utf8_slice_codeunits(batch["text"], 0, 10 * cfg.max_chars).to_pylist()
    text = [(scrub_pii(r)[0] if cfg.scrub_pii and r else r) if early else t
            for early, r, t in zip(dropped_early, raw, out["text"].to_pylist())]
    return out.set_column(out.column_names.index("text"), "text", pa.array(text, pa.string()))


def add_chars(batch: pa.Table) -> pa.Table:
    return batch.append_column("n_chars", pc.fill_null(pc.utf8_length(batch["text"]), 0).cast(pa.int64()))


def not_rejected(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.not_equal(batch["split"], REJECTED))


def mark_and_split(batch: pa.Table, drops, fractions: dict[str, float], seed: int) -> pa.Table:
    """Ray Data map_batches over every cleaned document: its dedup reason looked up in the dropped (doc_id,
    reason) table (an object-store reference, read zero-copy by each task; None: no duplicates), and its split;
    a dropped document's split is `rejected`."""
    reason = batch["reason"]
    if drops is not None:
        dropped = ray.get(drops)
        reason = pc.coalesce(reason, pc.take(dropped["reason"], pc.index_in(batch["doc_id"], value_set=dropped["doc_id"])))
    splits = [REJECTED if r is not None else split_of(d, fractions, seed)
              for d, r in zip(batch["doc_id"].to_pylist(), reason.to_pylist())]
    batch = batch.set_column(batch.column_names.index("reason"), "reason", reason)
    return batch.append_column("split", pa.array(splits, pa.string()))


class Progress:
    """One line per stage (rows/s, MB/s) and each stage's wall time for the manifest."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t = time.time()
        info: dict = {}
        yield info
        dt = time.time() - t
        self.stages[name] = round(dt, 2)
        rows, mb = info.get("rows"), info.get("bytes", 0) / 1e6
        rate = f": {rows:,} rows, {mb:,.1f} MB ({rows / max(dt, 1e-9):,.0f} rows/s, {mb / max(dt, 1e-9):,.2f} MB/s)" if rows is not None else ""
        print(f"raylm prepare: {name} {dt:.1f}s{rate}", flush=True)


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


@contextmanager
def prepare_context():
    """The Ray Data settings prepare runs under (the benchmarks enter it too), restored afterwards."""
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.default_hash_shuffle_parallelism)
    # rows keep their order through every map/filter: same config + seed -> byte-identical shards
    ctx.execution_options.preserve_order = True
    # task-based sort shuffle, partitions sized from the data: the actor-based hash shuffle (200 partitions by
    # default) costs minutes of start-up on a small machine
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.default_hash_shuffle_parallelism = 4
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.default_hash_shuffle_parallelism = saved


def cleaned_documents(d, task: str) -> ray.data.Dataset:
    """Every source's documents, read and cleaned in one streaming pass: each with its drop reason (null: kept),
    the text kept for data/rejected/, and `n_chars`."""
    clean = partial(keep_raw_text, cfg=d.clean, quality=d.quality)
    sources = [read_source(src, i, per_table=clean) for i, src in enumerate(d.sources)]  # cleaned in the read task
    cleaned = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
    if task == "classification":
        cleaned = cleaned.map_batches(require_label, batch_format="pyarrow")
    return cleaned.map_batches(add_chars, batch_format="pyarrow")


@stage_io("prepare")  # remote output_dir: data/ is built in this node's mirror, then uploaded
def prepare(cfg: Config) -> dict:
    """Run the data stage for `cfg`; writes `output_dir/data/` and returns the manifest."""
    with prepare_context():
        return _prepare(cfg)


def write_staged(ds: ray.data.Dataset, path: str | Path, partition_cols: list[str] | None = None) -> None:
    """Stream `ds` to Parquet files under `path` (a local path or a URI; added to what is there), in one
    `<column>=<value>/` directory per value of `partition_cols` when given."""
    fs, in_fs = resolve_storage(path)
    ds.write_parquet(in_fs, filesystem=fs, partition_cols=partition_cols)


def read_partition(path: str, value: str, columns: list[str] | None = None) -> ray.data.Dataset | None:
    """The staged documents of one split (or of `rejected`), for a light pass; None when no document landed there."""
    part = join(path, f"split={value}")
    return read_parquet(part, columns, light=True) if list_files(part, ".parquet") else None


def _prepare(cfg: Config) -> dict:
    start = time.time()
    d, task, block, seed = cfg.data, cfg.model.task, cfg.data.block_size, cfg.seed
    fractions = d.split.model_dump()
    final_dir = cfg.path("data")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    work = final_dir.with_name(f".data.tmp-{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    # intermediate Parquet: each expensive pass runs once, every later pass streams it. Ray tasks on any node
    # write these, so on a remote output_dir they live in the store (task_dir), not on this node
    stage_dir, rejected_dir = task_dir(cfg, work, ".stage"), task_dir(cfg, work, "rejected")
    stage = lambda name: join(stage_dir, name)
    fs, rejected_path = resolve_storage(rejected_dir)
    fs.create_dir(rejected_path, recursive=True)  # present even when nothing is dropped
    progress = Progress()
    try:
        # -- read + clean, one streaming pass to staged Parquet
        with progress.stage("read+clean") as info:
            write_staged(cleaned_documents(d, task), stage("cleaned"))
            staged = read_parquet(stage("cleaned"), per_file=True)
            extra = [c for c in ("language",) if c in staged.schema().names]
            totals = {"n": (None, "count"), "chars": ("n_chars", "sum"), **{t: (f"pii_{t}", "sum") for t in PII_TYPES}}
            # the counts read only their columns (projected into the Parquet read), not the text
            count_columns = ["source", "reason", "n_chars"] + [f"pii_{t}" for t in PII_TYPES]
            per = group_totals(read_parquet(stage("cleaned"), count_columns, light=True), ["source", "reason"], totals)
            info.update(rows=sum(g["n"] for g in per), bytes=sum(g["chars"] or 0 for g in per))
        read_per_source = {s.name: 0 for s in d.sources}
        dropped: dict[str, int] = {}
        for g in per:
            read_per_source[g["source"]] = read_per_source.get(g["source"], 0) + g["n"]
            if g["reason"]:
                dropped[g["reason"]] = dropped.get(g["reason"], 0) + g["n"]
        n_kept = sum(g["n"] for g in per if not g["reason"])
        kept_chars = sum(g["chars"] or 0 for g in per if not g["reason"])
        if not n_kept:
            raise RuntimeError(f"the corpus is empty: no documents left after cleaning (dropped by reason: "
                               f"{dict(sorted(dropped.items()))})")

        # -- dedup over (key, doc_id) pairs; drops written as Parquet, never listed on the driver
        dups, drops = {"exact": 0, "near": 0, "clusters": 0, "cluster_sizes": {}}, None
        kept = staged.map_batches(where("reason", None), batch_format="pyarrow")
        docs_cols = DOC_COLUMNS + extra + ["n_chars"]
        with progress.stage("dedup") as info:
            if d.clean.dedup != "none":
                dups, drops = find_duplicates(kept, d.clean, n_kept, join(stage("drops"), "drops.parquet"))
            info.update(rows=n_kept, bytes=kept_chars)

        # -- one streaming pass: apply the drops, split each kept document; staged in one directory per split
        with progress.stage("split") as info:
            marked = read_parquet(stage("cleaned"), docs_cols + ["reason"], light=True).map_batches(
                mark_and_split, batch_format="pyarrow",
                fn_kwargs={"drops": drops if dups["exact"] + dups["near"] else None, "fractions": fractions, "seed": seed})
            write_staged(marked, stage("docs"), partition_cols=["split"])
            if rejected := read_partition(stage("docs"), REJECTED, REJECTED_COLUMNS + extra):
                write_staged(rejected, rejected_dir)

            def staged_docs(columns: list[str]) -> ray.data.Dataset:  # the kept documents' `columns`, every split
                docs = read_parquet(stage("docs"), columns, light=True)
                return docs.map_batches(not_rejected, batch_format="pyarrow")

            # per-document audit trail: which split each kept document went to
            write_staged(staged_docs(["doc_id", "split"]), task_dir(cfg, work, "documents.parquet"))
            per_split = group_totals(staged_docs(["split", "source", "n_chars"]), ["split", "source"],
                                     {"n": (None, "count"), "chars": ("n_chars", "sum")})
            info.update(rows=n_kept, bytes=kept_chars)
        split_docs = {s: sum(g["n"] for g in per_split if g["split"] == s) for s in SPLITS}
        split_chars = {s: sum(g["chars"] or 0 for g in per_split if g["split"] == s) for s in SPLITS}
        kept_per_source = {}
        for g in per_split:
            kept_per_source[g["source"]] = kept_per_source.get(g["source"], 0) + g["n"]
        for s in SPLITS:  # found before any tokenizing: a split the config asks for must get documents
            if fractions[s] > 0 and not split_docs[s]:
                raise EmptySplitError(f"data.split.{s}", f"fraction {fractions[s]:g} but no documents landed in it "
                                      f"({sum(split_docs.values())} kept documents); add documents or set it to 0")
        label_map = None
        if task == "classification":
            labels = [r["label"] for r in group_totals(staged_docs(["label", "split"]), ["label"], {"n": (None, "count")})]
            label_map = label_ids(labels)

        # -- tokenizer: a bounded, seeded sample of the train split, streamed to the trainer
        sample = {"bytes": 0, "documents": 0}
        with progress.stage("tokenizer") as info:
            def train_texts():
                fraction = min(1.0, d.tokenizer.train.sample_bytes / max(1, split_chars["train"])) if d.tokenizer.train else 1.0
                part = read_partition(stage("docs"), "train", ["doc_id", "text"])
                if part is None:
                    return
                part = part.map_batches(in_sample, fn_kwargs={"seed": seed, "fraction": fraction}, batch_format="pyarrow")
                for b in part.select_columns(["text"]).iter_batches(batch_format="pyarrow", batch_size=256):
                    for text in b["text"].to_pylist():
                        sample["documents"] += 1
                        sample["bytes"] += len(text.encode())
                        yield text

            tok = build_tokenizer(cfg, train_texts, work / "tokenizer")
            info.update(rows=sample["documents"], bytes=sample["bytes"])

        # -- tokenize, shuffle, pack, write, one split after another (the three pipelines side by side in threads
        # took 50 s against 40 s: each Ray Data executor budgets the whole cluster for itself)
        splits = {}
        for split in SPLITS:
            with progress.stage(f"tokenize+pack {split}") as info:
                groups = num_groups(split_chars[split])
                splits[split] = tokenize_split(cfg, tok, label_map, stage("docs"), work, split, groups, split_docs[split],
                                               threads=group_threads(groups))
                info.update(rows=split_docs[split], bytes=split_chars[split])

        manifest = {
            "task": task,
            "block_size": block,
            "vocab_size": len(tok),
            "special_tokens": special_ids(tok),
            "label_map": label_map,
            "splits": splits,
            # a source's name as written in the config: `${ENV}` references stay references
            "sources": [{"name": shown.get("path") or s.name, "format": s.format or ("builtin" if s.builtin else "hf_dataset"),
                         "documents_read": read_per_source.get(s.name, 0), "documents_kept": kept_per_source.get(s.name, 0)}
                        for s, shown in zip(d.sources, cfg.public_dump()["data"]["sources"])],
            "documents_read": sum(read_per_source.values()),
            "documents_kept": sum(split_docs.values()),
            "dropped": dict(sorted({**dropped, **{f"{k}_duplicate": v for k, v in (("exact", dups["exact"]), ("near", dups["near"])) if v}}.items())),
            "duplicates": {"exact": dups["exact"], "near": dups["near"], "clusters": dups["clusters"],
                           "cluster_sizes": dups["cluster_sizes"]},
            "pii": {t: int(sum(g[t] or 0 for g in per)) for t in PII_TYPES},
            "quality": quality_summary(staged, d.quality),  # per rule: drops by source/language, examples
            "tokenizer_sample": sample,
            "stages_s": progress.stages,
            "config": cfg.public_dump(),  # ${ENV} values stay references, never their values
            "config_hash": cfg.config_hash(),
            "versions": versions(),
            "wall_time_s": round(time.time() - start, 2),
        }
        remove_dir(stage_dir)
        write_json_atomic(work / "manifest.json", manifest)
        # swap the finished directory in
        old = final_dir.with_name(f".data.old-{uuid.uuid4().hex[:8]}")
        if final_dir.exists():
            os.replace(final_dir, old)
        os.replace(work, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        remove_dir(stage_dir)  # in the store on a remote output_dir: not under work/
        shutil.rmtree(work, ignore_errors=True)

    per_split_tokens = ", ".join(f"{s} {v['tokens']:,}" for s, v in splits.items())
    print(f"raylm prepare: {manifest['documents_read']:,} docs read -> {manifest['documents_kept']:,} kept "
          f"({sum(manifest['dropped'].values()):,} dropped, {dups['exact'] + dups['near']:,} duplicates); "
          f"tokens {per_split_tokens}; {manifest['wall_time_s']:.1f}s -> {final_dir}", flush=True)
    return manifest


def tokenize_split(cfg: Config, tok, label_map: dict | None, staged: str, work: Path, split: str, groups: int,
                   documents: int, threads: int) -> dict:
    """One split's documents shuffled into `groups` pack groups, tokenized, laid out and written as its shards;
    returns the split's manifest entry. An empty split still gets one (empty) shard with the schema."""
    task, block, d = cfg.model.task, cfg.data.block_size, cfg.data
    part = read_partition(staged, split, ["doc_id", "text", "label"])
    if task == "classification":
        layout, layout_kwargs = classification_group, {"tokenizer": tok, "block_size": block, "label_map": label_map}
    else:
        layout, layout_kwargs = pack_group, {"tokenizer": tok, "task": task, "block_size": block, "threads": threads}
    out = task_dir(cfg, work, split)  # the run's temp dir, or the object store itself
    shards = [] if part is None else write_shards(shuffled_rows(part, cfg.seed, groups, layout, layout_kwargs),
                                                  out, split, d.shards_per_split)
    fs, path = resolve_storage(out)
    n_rows = 0 if not shards else sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in list_files(out, ".parquet"))
    if getattr(d.split, split) > 0 and not n_rows:
        raise EmptySplitError(f"data.split.{split}", f"{documents} documents but not one block of "
                              f"{block} tokens; add documents, lower data.block_size, or set it to 0")
    if not shards:
        fs.create_dir(path)
        pq.write_table(SHARD_SCHEMAS[task == "classification"].empty_table(), f"{path}/{split}-00000.parquet",
                       filesystem=fs)
        shards = [f"{split}-00000.parquet"]
    if task == "classification":
        tokens = int(read_parquet(out, ["attention_mask"]).map_batches(
            _mask_tokens, batch_format="pyarrow").sum("n") or 0) if n_rows else 0
    else:
        tokens = n_rows * block
    return {"documents": documents, "tokens": tokens, "rows": n_rows, "shards": len(shards)}


def _mask_tokens(t: pa.Table) -> pa.Table:
    return pa.table({"n": [int(pc.sum(pc.list_flatten(t["attention_mask"])).as_py() or 0)]})
