"""Tokenize, shuffle, pack and write. Each document gets a seeded 64-bit order key from its doc_id; its pack group
is that key modulo the number of groups (sized from the split's text, about `GROUP_CHARS` per group), so groups
are random, bounded subsets of the split. Ray Data map_batches tokenizes; a groupby over the pack group moves
the token ids once, and each group's documents are laid out by order key (a seeded global random order, mixed
across sources and labels), then LM documents are joined (EOS, or BERT-style `[CLS] doc [SEP]`) and cut into
`block_size` blocks; classification rows are truncated and padded. The blocks do not depend on Ray's block
layout, so the same config writes byte-identical shards. Shards are written with `write_parquet` under
deterministic names."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.datasource import FilenameProvider

from raylm.data.shuffle import grouped
from raylm.data.tokenizer import bert_style

GROUP_CHARS = 64 << 20  # text characters per pack group: bounds one map_groups call's memory (~4 bytes/token)
TOKENIZE_CHARS = 4 << 20  # text characters per tokenize task, on average


def order_keys(doc_ids: list[str], seed: int) -> np.ndarray:
    """Seeded 63-bit key per document: its place in the shuffled order."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:order:{d}".encode(), digest_size=8).digest(), "little") >> 1
                     for d in doc_ids], dtype=np.int64)


def num_groups(chars: int) -> int:
    return max(1, -(-chars // GROUP_CHARS))


def with_order(table: pa.Table, seed: int, groups: int) -> pa.Table:
    keys = order_keys(table["doc_id"].to_pylist(), seed)
    return table.append_column("order", pa.array(keys, pa.int64())).append_column("pack_group", pa.array(keys % groups, pa.int64()))


def tokenize_lm(batch: pa.Table, tokenizer, task: str, seed: int, groups: int) -> pa.Table:
    """One row per document: its token ids with the document separator(s) the packed layout uses."""
    tok = tokenizer  # the transformers tokenizer itself travels with the task: no shared filesystem needed
    backend = tok.backend_tokenizer
    texts = batch["text"].to_pylist()
    if bert_style(task):
        ids = [[tok.cls_token_id, *e.ids, tok.sep_token_id] for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        ids = [[*e.ids, eos] for e in backend.encode_batch(texts, add_special_tokens=False)]
    out = pa.table({"doc_id": batch["doc_id"], "ids": pa.array(ids, pa.list_(pa.int32()))})
    return with_order(out, seed, groups)


def pack_group(group: pa.Table, block_size: int) -> pa.Table:
    """Ray Data map_groups: one pack group's documents in order-key order, concatenated and cut into blocks;
    the last partial block of the group is dropped (no padding in LM shards)."""
    order = np.argsort(group["order"].to_numpy(), kind="stable")
    # whole-column Arrow take + flatten: no Python step per document or per block
    stream = pc.list_flatten(group["ids"].take(order)).to_numpy().astype(np.int32, copy=False)
    n = len(stream) // block_size
    offsets = pa.array(np.arange(0, (n + 1) * block_size, block_size, dtype=np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(stream[: n * block_size]))})


def tokenize_classification(batch: pa.Table, tokenizer, block_size: int, label_map: dict[str, int], seed: int,
                            groups: int) -> pa.Table:
    """One row per document, truncated and padded to `block_size`, with its label id."""
    enc = tokenizer(batch["text"].to_pylist(), truncation=True, max_length=block_size, padding="max_length")
    out = pa.table({
        "doc_id": batch["doc_id"],
        "input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32())),
        "attention_mask": pa.array(enc["attention_mask"], pa.list_(pa.int8())),
        "label": pa.array([label_map[x] for x in batch["label"].to_pylist()], pa.int64()),
    })
    return with_order(out, seed, groups)


def order_group(group: pa.Table) -> pa.Table:
    """Ray Data map_groups (classification): the group's rows in order-key order."""
    group = group.take(np.argsort(group["order"].to_numpy(), kind="stable"))
    return group.select(["input_ids", "attention_mask", "label"])


def docs_per_task(docs: int, chars: int) -> int:
    """Documents per tokenize task: about TOKENIZE_CHARS of text, from the split's counts."""
    return max(1, -(-docs * TOKENIZE_CHARS // max(1, chars)))


def shuffled_rows(docs: ray.data.Dataset, tokenize, kwargs: dict, groups: int, finish, finish_kwargs: dict,
                  per_task: int | None = None) -> ray.data.Dataset:
    """Tokenize `docs` (`per_task` documents a task), move each row to its pack group (the one shuffle of token
    ids) and lay each group out."""
    if per_task:  # streaming re-blocking: one large input block cannot leave one core tokenizing while others wait
        docs = docs.repartition(target_num_rows_per_block=per_task)
    rows = docs.map_batches(tokenize, fn_kwargs={**kwargs, "groups": groups}, batch_format="pyarrow", batch_size=256)
    return grouped(rows, "pack_group", groups).map_groups(finish, fn_kwargs=finish_kwargs, batch_format="pyarrow")


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
