"""Output storage: the one home of how raylm writes and reads a run's files.

`output_dir` (and `--model`) may be a local path or any URI `pyarrow.fs` resolves: `s3://bucket/prefix`,
`gs://bucket/prefix`, `file:///abs/path`. S3 options ride in the URI query (`?endpoint_override=host:port&scheme=http`)
or in the AWS SDK's environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...); credentials never go in a config.

How a run uses a remote `output_dir`:
- Ray itself reads and writes the store: Ray Train/Tune storage (`storage_path` + `storage_filesystem`) and Ray Data
  reads of the shards (`filesystem=`), so workers on any node reach the same files.
- Everything else works in a node-local mirror (`Config.path`, under `cache_root()`), synced at stage boundaries:
  `pull` before a stage, `push` after it (`stage_io`), and small JSON files go straight to the store.
- Atomic writes: a local file is written to a temp name and renamed; an object PUT is atomic per object; a directory
  is uploaded file by file with its `MARKER` (names, sizes, sha256) written LAST, its old marker deleted FIRST,
  so a reader sees a complete directory or none. Downloads are verified against the marker.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

MARKER = ".raylm-files.json"  # written last into every uploaded directory: what a complete copy holds
CACHE_ENV = "RAYLM_CACHE_DIR"  # node-local root of mirrors and model caches (default ~/.cache/raylm)
CHUNK = 1 << 20
# Parquet bytes per read task of a light pass: Ray Data's 128 MiB target block over text's ~4x in-memory ratio, so
# Ray never splits the task's output (a split read is not fused with the map after it)
LIGHT_TASK_BYTES = 32 << 20


# ------------------------------------------------------------------------------------------ locations
def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` strings other than file:// (s3, gs, hdfs, ...); Paths and plain strings are local."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_path(path: str | os.PathLike) -> Path:
    """A local path (a `file://` URI or a plain path) as an absolute Path."""
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser().absolute()


def resolve(uri: str | os.PathLike):
    """(pyarrow FileSystem, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(local_path(uri))
    return pafs.FileSystem.from_uri(str(uri))


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None, shuffle=None, per_file: bool = False,
                 light: bool = False):
    """A Ray Dataset over the Parquet files under `path` (a local path or a URI), read by Ray tasks on any node;
    `shuffle` is read_parquet's (a `FileShuffleConfig`: a seeded file order).

    `per_file`: one read task per file, as prepare's heavy staged pass (dedup's MinHash) wants. By default Ray
    splits a read into ~200 blocks, and a split read cannot be fused with the map after it: the map then runs as its
    own op on its share of the CPU budget (the 50 MB bench slice's dedup pass: 7.3 s split, 5.1 s fused).

    `light`: whole files too, grouped into as few tasks as fill the cluster's CPUs or hold LIGHT_TASK_BYTES each,
    for a pass that does little per row (a filter, a hash, a copy, a count): one task per file made each such pass
    over the ~150 small files prepare stages pay a task's fixed cost per file (bench prepare, 218 MB: split
    7.9 -> 2.9 s, tokenize+pack 51.6 -> 45.9 s).

    Every raylm read (prepare's staged passes, the trainer's shards, evaluate's test split) goes through Ray Data's
    file-based Parquet datasource: Ray 2.60's default DataSourceV2 starts a pool of 32 `FooterReader` actors, each a
    new worker process, for every read and every execution: 352 per `prepare`, and 31 s of a 30-step `fit()` on 2
    cores was its first val read inside the training workers."""
    import ray.data

    from raylm.runtime import cluster_cpus

    fs, in_fs = resolve(path)
    tasks = {}
    if per_file or light:
        infos = file_infos(path, ".parquet", recursive=True)
        n = len(infos)
        if light:
            n = min(n, max(cluster_cpus(), -(-sum(i.size for i in infos) // LIGHT_TASK_BYTES)))
        tasks = {"override_num_blocks": max(1, n)}
    ctx = ray.data.DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # chosen when read_parquet is called
    try:
        return ray.data.read_parquet(in_fs, filesystem=fs, columns=columns, shuffle=shuffle, **tasks)
    finally:
        ctx.use_datasource_v2 = saved


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a URI (its `?query` kept at the end) or a local path."""
    if not is_uri(base):
        return str(local_path(base).joinpath(*parts))
    head, q, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts if p)]) + (q + query)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raylm").expanduser()


def mirror_dir(uri: str, kind: str = "runs") -> Path:
    """This node's local directory for a remote URI: readable name plus a hash of the whole URI (query included)."""
    head = str(uri).partition("?")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", head.split("://", 1)[-1]).strip("_")[-80:]
    return cache_root() / kind / f"{name}-{hashlib.sha256(str(uri).encode()).hexdigest()[:10]}"


# ------------------------------------------------------------------------------------------ atomic writes
def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` (local path or URI) so a reader sees the old file or the new one, never half."""
    if is_uri(path):
        fs, p = resolve(str(path))
        with fs.open_output_stream(p) as f:  # one object: it appears whole or not at all
            f.write(data)
        return
    path = local_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """JSON with 2-space indent and a trailing newline; non-JSON values (Paths, numpy scalars) as str."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path))


def exists(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def file_infos(uri: str | os.PathLike, suffix: str = "", recursive: bool = False) -> list:
    """pyarrow `FileInfo`s (path, size) of the files directly under `uri` (at any depth: `recursive`) ending in
    `suffix`, hidden files left out, sorted by path."""
    import pyarrow.fs as pafs

    fs, p = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=recursive))
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                   and not i.base_name.startswith(".")), key=lambda i: i.path)


def list_files(uri: str | os.PathLike, suffix: str = "", recursive: bool = False) -> list[str]:
    """Paths (inside the URI's filesystem) of the files directly under `uri` (at any depth: `recursive`) ending in
    `suffix`, sorted."""
    return [i.path for i in file_infos(uri, suffix, recursive)]


# ------------------------------------------------------------------------------------------ directories
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _rel_files(local: Path, skip: Iterable[str] = ()) -> list[str]:
    skip = tuple(skip)
    names = (p.relative_to(local).as_posix() for p in sorted(local.rglob("*")) if p.is_file())
    return [n for n in names if n != MARKER and not _skipped(n, skip)]


def _skipped(rel: str, skip: tuple[str, ...]) -> bool:
    return any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in skip)


def problems(local: Path, files: dict[str, dict]) -> list[str]:
    """What differs between a local directory and a marker's file list (sizes first, then sha256)."""
    out = []
    for name, want in files.items():
        p = local / name
        if not p.is_file():
            out.append(f"{name}: missing")
        elif p.stat().st_size != want["size"]:
            out.append(f"{name}: {p.stat().st_size} bytes, the store says {want['size']}")
        elif want.get("sha256") and file_sha256(p) != want["sha256"]:
            out.append(f"{name}: sha256 differs from the store's")
    return out


def clear_dir(uri: str, only: Iterable[str] | None = None) -> None:
    """Delete the directory at `uri` (or only its entries named in `only`), its marker first: from then on readers
    see it as incomplete, never as a mix of old and new files."""
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    marker = f"{root}/{MARKER}"
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        fs.delete_file(marker)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if only is None or info.base_name in only:
            (fs.delete_dir if info.type == pafs.FileType.Directory else fs.delete_file)(info.path)


def upload_dir(local: str | os.PathLike, uri: str, keep: Iterable[str] = ()) -> dict:
    """Replace the directory at `uri` by the local one: old marker deleted first, files uploaded, marker last.
    Entries named in `keep` were written straight to the store (e.g. by Ray Data): left there, listed by size."""
    import pyarrow.fs as pafs

    local, keep = Path(local), tuple(keep)
    fs, root = resolve(uri)
    names = _rel_files(local, skip=keep)
    files = {n: {"size": (local / n).stat().st_size, "sha256": file_sha256(local / n)} for n in names}
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        clear_dir(uri, only={i.base_name for i in fs.get_file_info(pafs.FileSelector(root))} - set(keep))
    for parent in sorted({f"{root}/{n}".rsplit("/", 1)[0] for n in names} | {root}):
        fs.create_dir(parent, recursive=True)
    for n in names:
        with open(local / n, "rb") as src, fs.open_output_stream(f"{root}/{n}") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    for k in keep:  # what Ray wrote in place: sizes from the store's listing
        for info in fs.get_file_info(pafs.FileSelector(f"{root}/{k}", recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                files[info.path[len(root) + 1:]] = {"size": info.size}
    index = {"files": files}
    with fs.open_output_stream(f"{root}/{MARKER}") as f:
        f.write(json.dumps(index, indent=1, sort_keys=True).encode())
    return index


def add_file(uri: str, local: str | os.PathLike) -> None:
    """Put one more local file into the uploaded directory at `uri` and list it in the marker (rewritten after the
    file: a reader meanwhile sees the old, still complete, listing)."""
    local = Path(local)
    fs, root = resolve(uri)
    index = read_marker(uri)
    with open(local, "rb") as src, fs.open_output_stream(f"{root}/{local.name}") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    index["files"][local.name] = {"size": local.stat().st_size, "sha256": file_sha256(local)}
    with fs.open_output_stream(f"{root}/{MARKER}") as f:
        f.write(json.dumps(index, indent=1, sort_keys=True).encode())


def read_marker(uri: str) -> dict:
    fs, root = resolve(uri)
    try:
        with fs.open_input_stream(f"{root}/{MARKER}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no complete upload there (no {MARKER}, which is written last)") from None


def download_dir(uri: str, local: str | os.PathLike, skip: Iterable[str] = ()) -> Path:
    """Make `local` a verified copy of the directory at `uri` (files under `skip` left out); returns `local`.
    A local copy that already matches the store's marker is kept; a download whose sizes or sha256 differ from
    the marker (a tampered or half-replaced store) raises instead of being used."""
    local, skip = Path(local), tuple(skip)
    index = read_marker(uri)
    want = {n: m for n, m in index["files"].items() if not _skipped(n, skip)}
    if local.is_dir() and not problems(local, want):
        return local
    fs, root = resolve(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for n in want:
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root}/{n}") as src, open(tmp / n, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        bad = problems(tmp, want)
        if bad:
            raise ValueError(f"{uri} does not match its {MARKER}: {'; '.join(bad[:3])}")
        _swap_in(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` to `target`, moving an existing target aside first (another replica may race us: fine)."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
    except OSError:
        if not target.is_dir():  # lost a race and nothing is there: a real failure
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


VERSION_RE = re.compile(r"^v(\d{6,})-")


def staging_dir(target: str | os.PathLike) -> Path:
    """A fresh temp directory beside `target` to build its next version in; ones a killed run left are removed
    (one writer per output_dir)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")


def publish_dir(new: str | os.PathLike, target: str | os.PathLike, keep: int = 2) -> Path:
    """Make the finished local directory `new` the one `target` names, in one atomic step: `new` moves to
    `.<name>.versions/<version>/` and `target` becomes a relative symlink to it, swapped in by a rename, so a
    reader that resolves `target` once (see `materialize`) reads the old version or the new one, never a mix.
    The newest `keep` versions stay (a replica may still be loading the previous one); older ones are removed.
    Returns the version's directory."""
    new, target = Path(new), Path(target)
    versions = target.with_name(f".{target.name}.versions")
    versions.mkdir(parents=True, exist_ok=True)

    def next_version() -> Path:  # v<sequence>-<UTC time>: names sort in publishing order
        seq = max((int(m.group(1)) for p in versions.iterdir() if (m := VERSION_RE.match(p.name))), default=0)
        return versions / f"v{seq + 1:06d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"

    if target.is_dir() and not target.is_symlink():  # a directory from before versioning: keep it as a version
        os.replace(target, next_version())
    version = next_version()
    os.replace(new, version)
    link = target.with_name(f".{target.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(version, target.parent), link)
    os.replace(link, target)  # the swap: rename(2) of a symlink over the old one is atomic
    current = target.resolve()
    finished = sorted(p for p in versions.iterdir() if p.is_dir() and VERSION_RE.match(p.name))
    for old in finished[:-keep]:
        if old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)
    for stray in target.parent.glob(f".{target.name}.link-*"):  # symlinks a killed swap left
        stray.unlink(missing_ok=True)
    return version


def materialize(model: str | os.PathLike) -> Path:
    """A local directory for a model reference: a local path resolved once (a versioned directory's symlink is
    read here, so a swap while the caller loads files cannot mix versions); a URI downloaded into this node's
    cache (`cache_root()/models/...`) and verified against the store's marker (reused while it still matches)."""
    if not is_uri(model):
        return local_path(model).resolve()
    return download_dir(str(model), mirror_dir(str(model), "models"))


# ------------------------------------------------------------------------------------------ stage sync
# what prepare's Ray Data tasks write (on any node) and what grows with the corpus: with a remote output_dir these
# live in the store itself and are never copied into a mirror
IN_STORE = ("train", "val", "test", "documents.parquet", "rejected", ".stage")


@dataclass(frozen=True)
class StageIO:
    pull: dict[str, tuple[str, ...]] = field(default_factory=dict)  # part -> entries left out, before the stage
    push: tuple[str, ...] = ()  # parts uploaded from the mirror after the stage succeeded
    in_store: dict[str, tuple[str, ...]] = field(default_factory=dict)  # part -> entries Ray writes in place


STAGE_IO: dict[str, StageIO] = {
    "prepare": StageIO(push=("data",), in_store={"data": IN_STORE}),
    # tracking/ (TensorBoard, MLflow SQLite) as rank 0 and the driver wrote it on this node: one node's view
    "train": StageIO(pull={"data": IN_STORE, "tracking": ()}, push=("model", "tracking")),
    "tune": StageIO(pull={"data": IN_STORE, "tracking": ()}, push=("model", "tracking")),
    "evaluate": StageIO(pull={"data": IN_STORE}, push=("report.md", "plots")),
}


def task_dir(cfg, work: Path, part: str) -> str | Path:
    """Where prepare's Ray tasks write `part` of data/ (shards, staged passes, rejected documents): the run's
    temp dir on a local output_dir; the store itself on a remote one, so that tasks on every node write there."""
    return join(cfg.uri("data"), part) if is_uri(cfg.output_dir) else work / part


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory (a local path or a URI prefix) and everything under it; a missing one is fine."""
    fs, root = resolve(path)
    try:
        fs.delete_dir(root)
    except FileNotFoundError:
        pass


def pull(output_dir: str, part: str, skip: Iterable[str] = ()) -> Path:
    """The mirror copy of `output_dir/part` (a directory uploaded by `push`), downloaded when it differs."""
    return download_dir(join(output_dir, part), mirror_dir(output_dir) / part, skip)


def push(output_dir: str, part: str, keep: Iterable[str] = ()) -> None:
    """Upload the mirror's `part` (a file or a directory) to `output_dir/part`; a missing part is skipped."""
    local = mirror_dir(output_dir) / part
    if local.is_dir():
        upload_dir(local, join(output_dir, part), keep)
    elif local.is_file():
        write_bytes_atomic(join(output_dir, part), local.read_bytes())


def stage_io(stage: str) -> Callable:
    """Decorator for a stage function `fn(cfg, ...)`: with a remote output_dir, pull its inputs into the mirror
    before and push its outputs after (only when it succeeded); with a local output_dir, nothing."""
    io = STAGE_IO[stage]

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def staged(cfg, *args, **kwargs):
            if not is_uri(cfg.output_dir):
                return fn(cfg, *args, **kwargs)
            for part, skip in io.pull.items():
                if exists(join(cfg.output_dir, part, MARKER)):
                    pull(cfg.output_dir, part, skip)
            for part, entries in io.in_store.items():
                clear_dir(join(cfg.output_dir, part), only=entries)
            result = fn(cfg, *args, **kwargs)
            for part in io.push:
                push(cfg.output_dir, part, keep=io.in_store.get(part, ()))
            return result
        return staged
    return wrap
