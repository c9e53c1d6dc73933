"""Readers: a registry from a source's format to a function building a Ray Dataset of raw documents.

Every reader yields the same columns: `doc_id` (unique, sorts in read order), `source`, `format`, `text`
(None when unreadable), `label` (str or None) and `reason` (None, or why the document is already dropped,
e.g. `undecodable`). Files are read as bytes with `ray.data.read_binary_files` and parsed in Ray tasks, so a
binary or invalid-UTF-8 file becomes a counted drop instead of a crash.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import ray

from raylm.config import ConfigError, Source

COLUMNS = ["doc_id", "source", "format", "text", "label", "reason"]
SCHEMA = pa.schema([(c, pa.string()) for c in COLUMNS])

Doc = tuple[str | None, str | None, str | None]  # (text, label, reason)


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def decode(data: bytes) -> str | None:
    """UTF-8 text, or None for binary (NUL bytes) or invalid UTF-8."""
    if b"\x00" in data[:65536]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def label_str(value) -> str | None:
    return None if value is None or value == "" else str(value)


# ------------------------------------------------------------------------- per-file parsers (bytes -> docs)
def parse_jsonl(data: bytes, src: Source) -> Iterator[Doc]:
    text = decode(data)
    if text is None:
        yield None, None, "undecodable"
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            yield None, None, "unparsable"
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(src.text_field), str):
            yield None, None, "no_text"
            continue
        yield obj[src.text_field], label_str(obj.get(src.label_field)) if src.label_field else None, None


def parse_txt(data: bytes, src: Source) -> Iterator[Doc]:
    text = decode(data)
    if text is None:
        yield None, None, "undecodable"
    elif src.split_lines:
        for line in text.splitlines():
            if line.strip():
                yield line, None, None
    else:
        yield text, None, None


def parse_html(data: bytes, src: Source) -> Iterator[Doc]:
    text = decode(data)
    yield (text, None, None) if text is not None else (None, None, "undecodable")


def _table_docs(table: pa.Table, src: Source) -> Iterator[Doc]:
    if src.text_field not in table.column_names:
        raise ConfigError("data.sources.text_field", f"column {src.text_field!r} not in {table.column_names}")
    texts = table[src.text_field].to_pylist()
    labels = table[src.label_field].to_pylist() if src.label_field and src.label_field in table.column_names else [None] * len(texts)
    for text, label in zip(texts, labels):
        yield (text, label_str(label), None) if isinstance(text, str) else (None, None, "no_text")


def parse_parquet(data: bytes, src: Source) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError):
        yield None, None, "undecodable"
        return
    yield from _table_docs(table, src)


def parse_csv(data: bytes, src: Source) -> Iterator[Doc]:
    text = decode(data)
    if text is None:
        yield None, None, "undecodable"
        return
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error:
        yield None, None, "undecodable"
        return
    if rows and src.text_field not in rows[0]:
        raise ConfigError("data.sources.text_field", f"column {src.text_field!r} not in {list(rows[0])}")
    for row in rows:
        text = row.get(src.text_field)
        yield (text, label_str(row.get(src.label_field)) if src.label_field else None, None) if text else (None, None, "no_text")


PARSERS: dict[str, Callable[[bytes, Source], Iterator[Doc]]] = {
    "jsonl": parse_jsonl, "txt": parse_txt, "html": parse_html, "parquet": parse_parquet, "csv": parse_csv,
}


# ------------------------------------------------------------------------------------------ readers
def expand_paths(pattern: str, key: str) -> list[str]:
    """A file, a directory (every non-hidden file below it) or a glob, as a sorted list of files."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    if not files:
        raise ConfigError(key, f"no files match {pattern!r}")
    return sorted(str(f.resolve()) for f in files)


def read_files(src: Source, index: int) -> ray.data.Dataset:
    paths = expand_paths(src.path, f"data.sources.{index}.path")
    parse = PARSERS[src.format]

    def parse_batch(batch: pa.Table) -> pa.Table:
        rows = []
        for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist()):
            for i, (text, label, reason) in enumerate(parse(data, src)):
                rows.append({"doc_id": f"{index:03d}|{path}|{i:09d}", "source": src.name, "format": src.format,
                             "text": text, "label": label, "reason": reason})
        return to_table(rows)

    # one file per read task keeps a huge file from sharing a block with everything else
    ds = ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=min(len(paths), 64))
    return ds.map_batches(parse_batch, batch_format="pyarrow", batch_size=8)


def read_builtin(src: Source, index: int) -> ray.data.Dataset:
    from raylm.data import pydocs

    names = pydocs.module_names()
    if src.max_docs:
        names = names[: src.max_docs]

    def build(batch: pa.Table) -> pa.Table:
        rows = []
        for name in batch["module"].to_pylist():
            text = pydocs.module_document(name)
            if text is not None:  # not importable on this platform: not part of the corpus
                rows.append({"doc_id": f"{index:03d}|python-docs|{name}", "source": src.name, "format": "txt",
                             "text": text, "label": None, "reason": None})
        return to_table(rows)

    # modules are imported inside Ray workers, in parallel, and never in the driver
    ds = ray.data.from_items([{"module": n} for n in names], override_num_blocks=max(1, min(8, len(names) // 16)))
    return ds.map_batches(build, batch_format="pyarrow", batch_size=16)


def read_hf_dataset(src: Source, index: int) -> ray.data.Dataset:
    import datasets

    key = f"data.sources.{index}.hf_dataset"
    path = Path(src.hf_dataset).expanduser()
    if not path.exists():
        raise ConfigError(key, f"not a local dataset directory (no hub access at run time): {src.hf_dataset}")
    try:
        hf = datasets.load_from_disk(str(path))
        if isinstance(hf, datasets.DatasetDict):
            if src.split not in hf:
                raise ConfigError(f"data.sources.{index}.split", f"no split {src.split!r}; have {sorted(hf)}")
            hf = hf[src.split]
    except FileNotFoundError:  # a directory of data files rather than a save_to_disk dir
        hf = datasets.load_dataset(str(path), split=src.split)
    table = hf.data.table if hasattr(hf.data, "table") else hf.data
    docs = _table_docs(table.combine_chunks() if hasattr(table, "combine_chunks") else table, src)
    rows = [{"doc_id": f"{index:03d}|{path}|{i:09d}", "source": src.name, "format": "hf_dataset", "text": t,
             "label": label, "reason": r} for i, (t, label, r) in enumerate(docs)]
    return ray.data.from_arrow(to_table(rows))


def read_source(src: Source, index: int) -> ray.data.Dataset:
    """The raw documents of one source (at most `max_docs`)."""
    if src.builtin:
        ds = read_builtin(src, index)
    elif src.hf_dataset:
        ds = read_hf_dataset(src, index)
    else:
        ds = read_files(src, index)
    return ds.limit(src.max_docs) if src.max_docs else ds
