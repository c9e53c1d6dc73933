"""Shuffle, tokenize, pack and write. Each document gets a seeded 64-bit order key from its doc_id; its pack group
is that key modulo the number of groups (sized from the split's text, about `GROUP_CHARS` per group), so groups
are random, bounded subsets of the split. One sort with a partition per group moves each document's text to its
group (the one shuffle); each group is then tokenized and laid out in one task: its documents in order-key order
(a seeded global random order, mixed across sources and labels), LM documents joined (EOS, or BERT-style
`[CLS] doc [SEP]`) and cut into `block_size` blocks; classification rows truncated and padded. The blocks do
not depend on Ray's block layout, so the same config writes byte-identical shards. Shards are written with
`write_parquet` under deterministic names.

Tokenizing after the shuffle, not before it: a streaming tokenize op shares Ray Data's CPU budget with the
ops around it and ran 1-2 tasks at a time on 2 cores (bench tokenize 0.46-0.65 of bare `encode_batch`); a group
task runs after the shuffle with the whole budget, on `threads` tokenizer threads when there are fewer groups
than CPUs."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.datasource import FilenameProvider

from raylm.data.tokenizer import bert_style

GROUP_CHARS = 64 << 20  # text characters per pack group: bounds one group task's memory (text + 4 bytes/token)
# shard schemas by "is classification" (docs/CONTRACTS.md `data/`)
SHARD_SCHEMAS = {
    False: pa.schema([("input_ids", pa.list_(pa.int32()))]),
    True: pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())), ("label", pa.int64())]),
}
ENCODE_DOCS = 256  # documents per encode call: bounds the tokenizer's Encoding objects alive at once


def order_keys(doc_ids: list[str], seed: int) -> np.ndarray:
    """Seeded 63-bit key per document: its place in the shuffled order."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:order:{d}".encode(), digest_size=8).digest(), "little") >> 1
                     for d in doc_ids], dtype=np.int64)


def num_groups(chars: int) -> int:
    return max(1, -(-chars // GROUP_CHARS))


def with_order(table: pa.Table, seed: int, groups: int) -> pa.Table:
    keys = order_keys(table["doc_id"].to_pylist(), seed)
    return table.append_column("order", pa.array(keys, pa.int64())).append_column("pack_group", pa.array(keys % groups, pa.int64()))


def in_order(group: pa.Table) -> pa.Table:
    return group.take(np.argsort(group["order"].to_numpy(), kind="stable"))


def on_threads(fn, texts: list[str], threads: int) -> list:
    """`fn` over consecutive chunks of ENCODE_DOCS texts, in order, on `threads` threads (the Rust tokenizer
    releases the GIL)."""
    chunks = [texts[i:i + ENCODE_DOCS] for i in range(0, len(texts), ENCODE_DOCS)]
    if threads <= 1 or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, chunks))


def pack_group(group: pa.Table, tokenizer, task: str, block_size: int, threads: int = 1) -> pa.Table:
    """One pack group: its documents in order-key order, tokenized with the document separator(s), concatenated
    and cut into blocks; the last partial block of the group is dropped (no padding in LM shards)."""
    backend = tokenizer.backend_tokenizer  # the transformers tokenizer travels with the task: no shared filesystem
    if bert_style(task):
        head, tail = [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    else:
        head, tail = [], [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id]

    def ids(texts: list[str]) -> np.ndarray:
        # encode_batch without character offsets (never read here): the same ids, 1.3-1.5x faster (bench tokenize)
        rows = [[*head, *e.ids, *tail] for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return pa.array(rows, pa.list_(pa.int32())).flatten().to_numpy()

    parts = on_threads(ids, in_order(group)["text"].to_pylist(), threads)
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = len(stream) // block_size
    offsets = pa.array(np.arange(0, (n + 1) * block_size, block_size, dtype=np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(stream[: n * block_size]))})


def classification_group(group: pa.Table, tokenizer, block_size: int, label_map: dict[str, int]) -> pa.Table:
    """One group of a classification split: its rows in order-key order, truncated and padded to `block_size`,
    with label ids (one thread: the transformers call sets truncation state on the shared Rust tokenizer)."""
    group = in_order(group)

    def rows(texts: list[str]) -> pa.Table:
        enc = tokenizer(texts, truncation=True, max_length=block_size, padding="max_length")
        return pa.table({"input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32())),
                         "attention_mask": pa.array(enc["attention_mask"], pa.list_(pa.int8()))})

    parts = on_threads(rows, group["text"].to_pylist(), threads=1)
    if not parts:
        return SHARD_SCHEMAS[True].empty_table()
    return pa.concat_tables(parts).append_column("label", pa.array([label_map[x] for x in group["label"].to_pylist()], pa.int64()))


def each_group(block: pa.Table, layout, layout_kwargs: dict) -> pa.Table:
    """map_batches over whole shuffled blocks: `layout` on each pack group in the block (one, unless empty)."""
    if not block.num_rows:
        return layout(block, **layout_kwargs)
    column = block["pack_group"]
    return pa.concat_tables([layout(block.filter(pc.equal(column, k)), **layout_kwargs)
                             for k in np.unique(column.to_numpy())])


def group_threads(groups: int) -> int:
    """Tokenizer threads per group task: the cluster's cores shared among the groups, at most one node's cores,
    so the stage never runs more threads than the cluster has cores (on 2 cores, 2 groups of 2 threads each ran
    the bench's train split in 35.3 s against the plain arm's 27.5 s; 4 threads in one group task took a 23 MB
    split 5.84 s against 5.40 s with 2)."""
    from raylm.data.shuffle import node_cores

    cores = node_cores()
    return max(1, min(sum(cores) // groups, max(cores)))


def shuffled_rows(docs: ray.data.Dataset, seed: int, groups: int, layout, layout_kwargs: dict) -> ray.data.Dataset:
    """Give each document its order key and pack group, move its text to its group (a sort with one partition per
    group: two groups never share a task) and lay each group out with `layout`."""
    keyed = docs.map_batches(with_order, fn_kwargs={"seed": seed, "groups": groups}, batch_format="pyarrow")
    by_group = keyed.sort("pack_group", boundaries=list(range(1, groups))) if groups > 1 else keyed.repartition(1)
    return by_group.map_batches(each_group, fn_kwargs={"layout": layout, "layout_kwargs": layout_kwargs},
                                batch_size=None, batch_format="pyarrow")


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
