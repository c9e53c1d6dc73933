"""Reliability and security promises (issue 14), tried the way users would break them: damaged checkpoints,
hostile HTTP input, leaked secrets, random configs and bad data. Long soak variants live in stress/ (`make stress`)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest


# ------------------------------------------------------------------------------ promise 3: checkpoints
def fake_checkpoint(root: Path, step: int, ranks: int = 2) -> Path:
    """A checkpoint directory laid out like a merged Ray Train one: each rank's files, then its manifest."""
    from raylm.checkpoints import write_manifest

    d = root / f"checkpoint_2026-01-01_00-00-{step:02d}.000000"
    (d / "ds").mkdir(parents=True)
    for rank in range(ranks):
        shard = d / "ds" / f"zero_pp_rank_{rank}_optim_states.pt"
        shard.write_bytes(os.urandom(4096))
        files = [shard.relative_to(d)]
        if rank == 0:
            (d / "raylm_state.json").write_text(json.dumps({"step": step}))
            files.append(Path("raylm_state.json"))
        write_manifest(d, rank, ranks, files=files)
    return d


def test_checkpoint_manifest_detects_truncation_deletion_and_missing_rank(tmp_path):
    from raylm.checkpoints import verify

    ok = fake_checkpoint(tmp_path, 10)
    assert verify(ok) == []
    truncated = fake_checkpoint(tmp_path, 20)
    shard = truncated / "ds" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    assert any("100 bytes" in p for p in verify(truncated))
    flipped = fake_checkpoint(tmp_path, 30)
    data = bytearray((flipped / "ds" / "zero_pp_rank_0_optim_states.pt").read_bytes())
    data[7] ^= 0xFF  # same size, different content
    (flipped / "ds" / "zero_pp_rank_0_optim_states.pt").write_bytes(bytes(data))
    assert any("sha256" in p for p in verify(flipped))
    deleted = fake_checkpoint(tmp_path, 40)
    (deleted / "raylm_state.json").unlink()
    assert any("raylm_state.json: missing" in p for p in verify(deleted))
    half = fake_checkpoint(tmp_path, 50)
    (half / "raylm_files.rank1.json").unlink()  # rank 1 died before its manifest: incomplete
    assert any("rank 1 of 2" in p for p in verify(half))
    (half / "raylm_files.rank0.json").unlink()
    assert verify(half) and "incomplete" in verify(half)[0]


def test_resume_falls_back_to_previous_intact_checkpoint_with_warning(tmp_path, capsys):
    from ray.train import Checkpoint

    from raylm.checkpoints import resumable

    older = fake_checkpoint(tmp_path, 10)
    newer = fake_checkpoint(tmp_path, 20)
    assert resumable(Checkpoint.from_directory(str(newer)), "raylm_state.json").path == str(newer)
    (newer / "ds" / "zero_pp_rank_1_optim_states.pt").unlink()
    chosen = resumable(Checkpoint.from_directory(str(newer)), "raylm_state.json")
    assert chosen.path == str(older)
    out = capsys.readouterr().out
    assert "WARNING" in out and "damaged" in out and "step 10" in out
    # nothing intact left: refuse rather than resume from a damaged checkpoint
    (older / "raylm_state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no intact"):
        resumable(Checkpoint.from_directory(str(newer)), "raylm_state.json")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_loads_never_unpickle_code(tmp_path):
    """Inside weights_only_loads every torch.load (DeepSpeed's weights_only=False ones too) refuses pickled code,
    while tensors and DeepSpeed's own state classes still load."""
    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from raylm.checkpoints import weights_only_loads

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"module": _RunsCode()}, f)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "zero_stage": ZeroStageEnum.gradients, "rng": torch.get_rng_state()}, good)
    with weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(evil, weights_only=False)  # what DeepSpeed passes
        loaded = torch.load(good, weights_only=False)
    assert torch.equal(loaded["module"]["w"], torch.ones(2)) and loaded["zero_stage"] == ZeroStageEnum.gradients
    assert torch.load is not None and "safe_load" not in torch.load.__name__  # restored afterwards
