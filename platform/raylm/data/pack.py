"""Tokenize, pack and write: Ray Data map_batches tokenizes; LM documents are joined (EOS, or BERT-style
`[CLS] doc [SEP]`) and cut into `block_size` blocks inside fixed pack groups (contiguous runs of the split's
documents in doc_id order), so the blocks do not depend on Ray's block layout; classification rows are truncated
and padded. Shards are written with `write_parquet` under deterministic names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FilenameProvider

from raylm.data.tokenizer import bert_style


def tokenize_lm(batch: pa.Table, tokenizer, task: str) -> pa.Table:
    """One row per document: its token ids with the document separator(s) the packed layout uses."""
    tok = tokenizer  # the transformers tokenizer itself travels with the task: no shared filesystem needed
    backend = tok.backend_tokenizer
    texts = batch["text"].to_pylist()
    if bert_style(task):
        encs = backend.encode_batch(texts, add_special_tokens=False)
        ids = [[tok.cls_token_id, *e.ids, tok.sep_token_id] for e in encs]
    else:
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        ids = [[*e.ids, eos] for e in backend.encode_batch(texts, add_special_tokens=False)]
    return pa.table({"doc_id": batch["doc_id"], "pack_group": batch["pack_group"],
                     "ids": pa.array(ids, pa.list_(pa.int32()))})


def pack_group(group: pa.Table, block_size: int) -> pa.Table:
    """Ray Data map_groups: one pack group's documents (in doc_id order) concatenated and cut into blocks;
    the last partial block of the group is dropped (no padding in LM shards)."""
    order = np.argsort(np.array(group["doc_id"].to_pylist(), dtype=object), kind="stable")
    ids = group["ids"]
    stream = np.concatenate([np.asarray(ids[int(i)].values, dtype=np.int32) for i in order]) if len(order) else np.zeros(0, np.int32)
    n = len(stream) // block_size
    blocks = stream[: n * block_size].reshape(n, block_size)
    gid = group["pack_group"][0].as_py() if group.num_rows else 0
    return pa.table({
        "pack_group": pa.array([gid] * n, pa.int64()), "seq": pa.array(range(n), pa.int64()),
        "input_ids": pa.array(list(blocks), pa.list_(pa.int32())),
    })


def tokenize_classification(batch: pa.Table, tokenizer, block_size: int, label_map: dict[str, int]) -> pa.Table:
    """One row per document, truncated and padded to `block_size`, with its label id."""
    enc = tokenizer(batch["text"].to_pylist(), truncation=True, max_length=block_size, padding="max_length")
    return pa.table({
        "doc_id": batch["doc_id"],
        "input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32())),
        "attention_mask": pa.array(enc["attention_mask"], pa.list_(pa.int8())),
        "label": pa.array([label_map[x] for x in batch["label"].to_pylist()], pa.int64()),
        "n_tokens": pa.array([sum(m) for m in enc["attention_mask"]], pa.int64()),
    })


class ShardNames(FilenameProvider):
    """`<split>-00000.parquet`, ...: stable names instead of Ray's per-write uuid."""

    def __init__(self, split: str):
        super().__init__()
        self.split = split

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.split}-{task_index:05d}.parquet"

    def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
        return f"{self.split}-{task_index:05d}-{block_index:03d}.parquet"


def write_shards(ds: ray.data.Dataset, out_dir: str | Path, split: str, shards: int) -> list[str]:
    """Write `ds` (already in its final row order) as up to `shards` Parquet files in `out_dir` (a local path or
    an object-store URI); returns their names."""
    from ray.data import SaveMode

    from raylm.storage import list_files, resolve

    fs, path = resolve(out_dir)
    # OVERWRITE: stable names carry no write uuid (Ray refuses that in APPEND mode); out_dir is fresh anyway
    ds.repartition(shards).write_parquet(path, filesystem=fs, filename_provider=ShardNames(split), mode=SaveMode.OVERWRITE)
    return [p.rsplit("/", 1)[-1] for p in list_files(out_dir, ".parquet")]
