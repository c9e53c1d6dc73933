"""Readers: a registry from a source's format to a function building a Ray Dataset of raw documents.

Every reader yields the same columns: `doc_id` (unique, sorts in read order), `source`, `format`, `text`
(None when unreadable), `label` (str or None) and `reason` (None, or why the document is already dropped,
e.g. `undecodable`). Files are streamed by Ray tasks in bounded chunks (a large line-based file as several
byte ranges) rather than Ray's native JSON/CSV readers, because a bad record must become one counted drop with
a stable id (`<source index>|<path>|<offset>`) instead of failing its whole file; a binary or invalid-UTF-8
record is dropped as `undecodable`.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import ray

from raylm.config import ConfigError, Source
from raylm.runtime import cluster_cpus

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


# ------------------------------------------------------------------------- streaming per-file parsers
# Each parser reads one byte range of one file and yields (position, text, label, reason); the position (a byte
# offset or a record number) makes the doc_id, so ids are stable and sort in read order. Nothing holds more than
# one record (or one whole-file document) in memory, so a 10 GB JSONL file streams through a task.
Item = tuple[int, str | None, str | None, str | None]
PerTable = Callable[[pa.Table], pa.Table]
CHUNK_BYTES = 64 << 20  # line-based files are read in ranges of at most this many bytes, in parallel ...
MIN_CHUNK_BYTES = 1 << 20  # ... and of at least this many, sized to give every CPU of the cluster several ranges
RANGES_PER_CPU = 8
BATCH_DOCS = 512  # documents per emitted table
BATCH_CHARS = 16 << 20  # ... or this many characters, whichever comes first


def is_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(65536)


def lines_in_range(path: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for every line that starts in [start, end); lines split on b"\\n" only, so U+2028 and other
    Unicode line separators inside a record stay in it."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line straddling `start` belongs to the previous range
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                return
            yield pos, (line[3:] if pos == 0 and line.startswith(b"\xef\xbb\xbf") else line)
            pos += len(line)


def parse_jsonl(path: str, start: int, end: int, src: Source) -> Iterator[Item]:
    for pos, line in lines_in_range(path, start, end):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            yield pos, None, None, "undecodable"
            continue
        except json.JSONDecodeError:
            yield pos, None, None, "unparsable"
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(src.text_field), str):
            yield pos, None, None, "no_text"
            continue
        yield pos, obj[src.text_field], label_str(obj.get(src.label_field)) if src.label_field else None, None


def parse_txt(path: str, start: int, end: int, src: Source) -> Iterator[Item]:
    if not src.split_lines:
        yield from parse_whole(path, start, end, src)
        return
    for pos, line in lines_in_range(path, start, end):
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield pos, None, None, "undecodable"
            continue
        if text.strip():
            yield pos, text, None, None


def parse_whole(path: str, start: int, end: int, src: Source) -> Iterator[Item]:
    """One document per file (txt, html)."""
    with open(path, "rb") as f:
        text = decode(f.read())
    yield (0, text, None, None) if text is not None else (0, None, None, "undecodable")


def parse_csv(path: str, start: int, end: int, src: Source) -> Iterator[Item]:
    # a record may hold a field of any length: only clean's max_chars decides (the default limit is 131072)
    csv.field_size_limit(2**31 - 1)
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        i = 0
        try:
            for i, row in enumerate(reader):
                if i == 0 and src.text_field not in row:
                    raise ConfigError("data.sources.text_field", f"column {src.text_field!r} not in {list(row)}")
                text = row.get(src.text_field)
                yield (i, text, label_str(row.get(src.label_field)) if src.label_field else None, None) if text else (i, None, None, "no_text")
        except (csv.Error, UnicodeDecodeError):
            yield i + 1, None, None, "undecodable"  # the rest of the file cannot be read


def parse_parquet(path: str, start: int, end: int, src: Source) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError):
        yield 0, None, None, "undecodable"
        return
    names = pf.schema_arrow.names
    if src.text_field not in names:
        raise ConfigError("data.sources.text_field", f"column {src.text_field!r} not in {names}")
    columns = [src.text_field] + ([src.label_field] if src.label_field and src.label_field in names else [])
    i = 0
    for batch in pf.iter_batches(batch_size=BATCH_DOCS, columns=columns):
        texts = batch.column(src.text_field).to_pylist()
        labels = batch.column(src.label_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, label in zip(texts, labels):
            yield (i, text, label_str(label), None) if isinstance(text, str) else (i, None, None, "no_text")
            i += 1


PARSERS: dict[str, Callable[[str, int, int, Source], Iterator[Item]]] = {
    "jsonl": parse_jsonl, "txt": parse_txt, "html": parse_whole, "parquet": parse_parquet, "csv": parse_csv,
}
BINARY_FORMATS = {"parquet"}  # NUL bytes are normal there; in the text formats they mark an undecodable file
SPLITTABLE = {"jsonl", "txt"}  # line-based: a large file is read as several byte ranges (txt only with split_lines)


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


def chunk_bytes(total_bytes: int, cpus: int) -> int:
    """Range size for `total_bytes` of line-based files: RANGES_PER_CPU ranges per CPU, within [MIN, CHUNK_BYTES]
    (one read task per range: a corpus of one or two files still uses every core)."""
    return max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, total_bytes // (RANGES_PER_CPU * max(1, cpus))))


def file_ranges(paths: list[str], splittable: bool, cpus: int = 1) -> list[dict]:
    """One {path, start, end} per read task; a line-based file is cut into ranges (a range's reader starts at the
    first line that begins inside it)."""
    sizes = {path: os.path.getsize(path) for path in paths}
    chunk = chunk_bytes(sum(sizes.values()), cpus)
    out = []
    for path, size in sizes.items():
        cuts = list(range(0, size, chunk)) if splittable and size > chunk else [0]
        out += [{"path": path, "start": s, "end": (cuts[i + 1] if i + 1 < len(cuts) else max(size, 1))} for i, s in enumerate(cuts)]
    return out


def read_items(path: str, start: int, end: int, src: Source) -> Iterator[Item]:
    """The documents of one byte range of one file; a text file with NUL bytes is one `undecodable` drop."""
    if src.format not in BINARY_FORMATS and is_binary(path):
        return iter([(0, None, None, "undecodable")])
    return PARSERS[src.format](path, start, end, src)


def read_files(src: Source, index: int, per_table: PerTable) -> ray.data.Dataset:
    paths = expand_paths(src.path, f"data.sources.{index}.path")
    ranges = file_ranges(paths, src.format in SPLITTABLE and (src.format != "txt" or src.split_lines), cluster_cpus())

    @per_table_in_task(per_table)
    def read_ranges(batch: pa.Table) -> Iterator[pa.Table]:
        rows: list[dict] = []
        chars = 0
        for path, start, end in zip(batch["path"].to_pylist(), batch["start"].to_pylist(), batch["end"].to_pylist()):
            items = read_items(path, start, end, src)
            for pos, text, label, reason in items:
                rows.append({"doc_id": f"{index:03d}|{path}|{pos:012d}", "source": src.name, "format": src.format,
                             "text": text, "label": label, "reason": reason})
                chars += len(text) if text else 0
                if len(rows) >= BATCH_DOCS or chars >= BATCH_CHARS:
                    yield to_table(rows)
                    rows, chars = [], 0
        if rows:
            yield to_table(rows)

    # one range per read task: a huge file never shares a task with everything else
    ds = ray.data.from_items(ranges, override_num_blocks=max(1, min(len(ranges), 256)))
    return ds.map_batches(read_ranges, batch_format="pyarrow", batch_size=1)


def read_builtin(src: Source, index: int) -> ray.data.Dataset:
    """The python-docs corpus, rendered once per Python version in a clean subprocess and cached (small: a few MB)."""
    from raylm.data import pydocs

    table = pydocs.corpus()
    if src.max_docs:
        table = table.slice(0, src.max_docs)
    n = table.num_rows
    docs = pa.table({"doc_id": pa.array([f"{index:03d}|python-docs|{m}" for m in table["module"].to_pylist()], pa.string()),
                     "source": pa.array([src.name] * n, pa.string()), "format": pa.array(["txt"] * n, pa.string()),
                     "text": table["text"], "label": pa.nulls(n, pa.string()), "reason": pa.nulls(n, pa.string())})
    return ray.data.from_arrow(docs).repartition(max(1, min(8, n // 16)))


def _table_docs(table: pa.Table, src: Source) -> Iterator[Doc]:
    if src.text_field not in table.column_names:
        raise ConfigError("data.sources.text_field", f"column {src.text_field!r} not in {table.column_names}")
    texts = table[src.text_field].to_pylist()
    labels = table[src.label_field].to_pylist() if src.label_field and src.label_field in table.column_names else [None] * len(texts)
    for text, label in zip(texts, labels):
        yield (text, label_str(label), None) if isinstance(text, str) else (None, None, "no_text")


def hf_arrow_docs(path: str, file_no: int, src: Source, index: int) -> Iterator[pa.Table]:
    """The documents of one Arrow file of a `save_to_disk` dataset, streamed batch by batch (memory-mapped)."""
    with pa.memory_map(path) as f:
        row = 0
        for batch in pa.ipc.open_stream(f):
            docs = list(_table_docs(pa.Table.from_batches([batch]), src))
            yield to_table([{"doc_id": f"{index:03d}|{path}|{file_no:05d}:{row + i:012d}", "source": src.name,
                             "format": "hf_dataset", "text": t, "label": label, "reason": r}
                            for i, (t, label, r) in enumerate(docs)])
            row += len(docs)


def read_hf_dataset(src: Source, index: int, per_table: PerTable) -> ray.data.Dataset:
    """A local Hugging Face dataset. A `save_to_disk` directory is read by Ray tasks, one per Arrow file (the driver
    only lists the files); a directory of data files goes through `datasets.load_dataset` and its node-local cache
    on the driver, so a large corpus should be given as files (`path:` + `format:`) instead."""
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
    if src.text_field not in hf.column_names:
        raise ConfigError("data.sources.text_field", f"column {src.text_field!r} not in {hf.column_names}")
    files = [f["filename"] for f in hf.cache_files]
    if hf._indices is None and files and all(Path(f).resolve().is_relative_to(path.resolve()) for f in files):
        @per_table_in_task(per_table)
        def read_arrow_files(batch: pa.Table) -> Iterator[pa.Table]:
            for file, file_no in zip(batch["path"].to_pylist(), batch["file_no"].to_pylist()):
                yield from hf_arrow_docs(file, file_no, src, index)

        units = [{"path": f, "file_no": i} for i, f in enumerate(files)]
        return ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 256))).map_batches(
            read_arrow_files, batch_format="pyarrow", batch_size=1)
    table = hf.data.table if hasattr(hf.data, "table") else hf.data
    docs = _table_docs(table.combine_chunks() if hasattr(table, "combine_chunks") else table, src)
    rows = [{"doc_id": f"{index:03d}|{path}|{i:09d}", "source": src.name, "format": "hf_dataset", "text": t,
             "label": label, "reason": r} for i, (t, label, r) in enumerate(docs)]
    return ray.data.from_arrow(to_table(rows)).map_batches(per_table, batch_format="pyarrow", batch_size=BATCH_DOCS)


def read_source(src: Source, index: int, per_table: PerTable = lambda t: t) -> ray.data.Dataset:
    """The documents of one source (at most `max_docs`), each table of them passed through `per_table` (which keeps
    its rows) in the task that read it."""
    if src.builtin:
        ds = read_builtin(src, index).map_batches(per_table, batch_format="pyarrow", batch_size=BATCH_DOCS)
    elif src.hf_dataset:
        ds = read_hf_dataset(src, index, per_table)
    else:
        ds = read_files(src, index, per_table)
    return ds.limit(src.max_docs) if src.max_docs else ds


def per_table_in_task(per_table: PerTable):
    """Wraps a read function (file units in, document tables out) to pass each table it yields (at most BATCH_DOCS
    documents or BATCH_CHARS characters) through `per_table`. Not a map_batches(batch_size=...) after the read: Ray
    fuses the two and bundles that many of the read's inputs (file ranges) into one task, so at 256 every range of
    a corpus was read and processed by one task on one core."""
    def wrap(read: Callable[[pa.Table], Iterator[pa.Table]]) -> Callable[[pa.Table], Iterator[pa.Table]]:
        @functools.wraps(read)
        def read_then(batch: pa.Table) -> Iterator[pa.Table]:
            for table in read(batch):
                yield per_table(table)
        return read_then
    return wrap
