"""Output storage: the one home of how raylm writes and reads a run's files.

`output_dir` (and `--model`) may be a local path or any URI `pyarrow.fs` resolves (`s3://bucket/prefix`,
`gs://bucket/prefix`, `file:///abs`). Every write here is atomic: local files go to a temp name then rename;
an object store PUT is atomic per object, and directories are uploaded first with their marker written last.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` (local path or URI) so a reader sees the old file or the new one, never half."""
    if is_uri(path):
        fs, p = resolve(str(path))
        with fs.open_output_stream(p) as f:  # one PUT: the object appears whole or not at all
            f.write(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any) -> None:
    """JSON with 2-space indent and a trailing newline; non-JSON values (Paths, numpy scalars) as str."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` strings (s3, gs, file, ...); Paths and plain strings are local."""
    return isinstance(path, str) and "://" in path


def resolve(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI or local path."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    return pafs.FileSystem.from_uri(uri)
