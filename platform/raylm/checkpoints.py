"""Checkpoint manifests: a checkpoint is complete and intact, or it is never resumed from or exported.

Every rank writes `raylm_files.rank<R>.json` (size and sha256 of each file it wrote) as its LAST file, after
its DeepSpeed shards and rank 0's state file. Ray Train merges the ranks' directories into one checkpoint, so a
complete checkpoint holds one manifest per rank and every listed file with its recorded size and hash.
`verify(dir)` lists what is wrong; `resumable(checkpoint)` is Ray's latest checkpoint when intact, else the newest
intact one beside it in the run's storage (with a warning): a truncated or deleted file never gets resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from raylm.storage import file_sha256

log = logging.getLogger(__name__)

MANIFEST_GLOB = "raylm_files.rank*.json"
MANIFEST_RE = re.compile(r"^raylm_files\.rank(\d+)\.json$")


def manifest_name(rank: int) -> str:
    return f"raylm_files.rank{rank}.json"


def _files(directory: Path) -> Iterable[Path]:
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not MANIFEST_RE.match(p.name) and not p.name.endswith(".tmp"):
            yield p


def write_manifest(directory: str | os.PathLike, rank: int = 0, world_size: int = 1,
                   files: Iterable[str | os.PathLike] | None = None) -> Path:
    """Record size + sha256 of `files` (default: every file under `directory`) in this rank's manifest, written
    last and atomically (temp name + rename), so its presence means the files before it are all on disk."""
    directory = Path(directory)
    paths = [directory / f for f in files] if files is not None else list(_files(directory))
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
               for p in paths}
    out = directory / manifest_name(rank)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"rank": rank, "world_size": world_size, "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def verify(directory: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint directory: [] when every rank's manifest is there and every file it
    lists has its recorded size and sha256."""
    directory = Path(directory)
    manifests = {}
    for p in directory.glob(MANIFEST_GLOB):
        try:
            manifests[int(MANIFEST_RE.match(p.name).group(1))] = json.loads(p.read_text())
        except (ValueError, OSError, AttributeError) as e:
            return [f"{p.name}: unreadable manifest ({e})"]
    if not manifests:
        return [f"no {MANIFEST_GLOB} (written last): the checkpoint is incomplete"]
    world = max(int(m.get("world_size", 1)) for m in manifests.values())
    problems = [f"{manifest_name(r)} missing (rank {r} of {world} did not finish)"
                for r in range(world) if r not in manifests]
    for rank, manifest in sorted(manifests.items()):
        for name, want in manifest.get("files", {}).items():
            path = directory / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif path.stat().st_size != want["size"]:
                problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {want['size']}")
            elif file_sha256(path) != want["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def is_intact(directory: str | os.PathLike) -> bool:
    return not verify(directory)


# the only non-tensor classes DeepSpeed pickles into its checkpoints (ZeRO 0-3, fp32 and bf16; DeepSpeed 0.19)
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler:LossScaler", "deepspeed.runtime.zero.config:ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment:fragment_address")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's own, which ask for full unpickling, included) runs with
    weights_only=True and only DeepSpeed's few state classes allowed: a checkpoint cannot run code when loaded."""
    import importlib

    import torch

    allowed = [getattr(importlib.import_module(mod), name)
               for mod, name in (g.split(":") for g in DEEPSPEED_SAFE_GLOBALS)]
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def checkpoint_intact(checkpoint) -> bool:
    """Whether a Ray Train `Checkpoint` (local or in an object store) verifies against its manifests."""
    with checkpoint.as_directory() as d:
        return is_intact(d)


def checkpoint_step(directory: str | os.PathLike, state_file: str) -> int | None:
    try:
        return int(json.loads((Path(directory) / state_file).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resumable(checkpoint, state_file: str):
    """The Ray Train checkpoint to resume from: `checkpoint` (Ray's latest) when intact, else the newest intact
    checkpoint beside it in the run's storage, with a warning; raises when none is intact."""
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    with checkpoint.as_directory() as d:
        problems = verify(d)
    if not problems:
        return checkpoint
    parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    siblings = [info.path for info in checkpoint.filesystem.get_file_info(FileSelector(parent))
                if info.type == FileType.Directory and info.base_name.startswith("checkpoint_")
                and info.path.rstrip("/") != checkpoint.path.rstrip("/")]
    candidates = []
    for path in siblings:
        ckpt = Checkpoint(path, filesystem=checkpoint.filesystem)
        with ckpt.as_directory() as d:
            step = checkpoint_step(d, state_file)
            if step is not None and is_intact(d):
                candidates.append((step, ckpt))
    if not candidates:
        raise RuntimeError(f"checkpoint {checkpoint.path} is damaged ({'; '.join(problems[:3])}) and no intact "
                           f"earlier checkpoint is left in {parent}; refusing to resume from it")
    step, chosen = max(candidates, key=lambda sc: sc[0])
    log.warning("checkpoint %s is damaged (%s); resuming from the previous intact checkpoint %s (step %d)",
                checkpoint.path, "; ".join(problems[:3]), chosen.path, step)
    print(f"[raylm train] WARNING: checkpoint {checkpoint.path} is damaged ({'; '.join(problems[:3])}); "
          f"resuming from the previous intact one at step {step}: {chosen.path}", flush=True)
    return chosen
