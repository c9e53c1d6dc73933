"""Checkpoint -> Hugging Face directory: consolidate ZeRO shards to fp32, merge LoRA, save atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from raylm.chat_template import write_chat_template
from raylm.checkpoints import verify, weights_only_loads
from raylm.config import Config
from raylm.storage import publish_dir, staging_dir
from raylm.train.loop import CKPT_TAG, STATE_FILE
from raylm.train.models import build_model, tokenizer_dir, unwrap_lora


def consolidated_state_dict(ckpt_dir: str | Path, zero_stage: int) -> dict:
    """Full fp32 weights from a DeepSpeed checkpoint directory (any ZeRO stage)."""
    ckpt_dir = Path(ckpt_dir)
    problems = verify(ckpt_dir)
    if problems:
        raise RuntimeError(f"checkpoint {ckpt_dir} is damaged, not exporting it: {'; '.join(problems[:3])}")
    with weights_only_loads():  # tensors only: nothing in output_dir gets to run code when loaded
        if zero_stage == 0:  # no partitioning: rank 0's model states hold the whole module
            states = torch.load(ckpt_dir / CKPT_TAG / "mp_rank_00_model_states.pt", map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=CKPT_TAG)


def load_checkpoint_model(cfg: Config, manifest: dict, ckpt_dir: str | Path) -> torch.nn.Module:
    """The trained model from a checkpoint directory, LoRA merged, in eval mode (an in-memory `model/`)."""
    model = build_model(cfg, manifest, trainable=False)
    state = consolidated_state_dict(ckpt_dir, cfg.train.deepspeed.zero_stage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "decoder" in k}  # tied to input embeddings, restored by tying
    # frozen params may be left out of ZeRO checkpoints; they never changed, so the rebuilt model's values are theirs
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - tied - frozen:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {sorted(set(missing) - tied - frozen)[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model = unwrap_lora(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if cfg.model.task == "causal_lm":
        model.config.use_cache = True
    return model.eval()


def export_checkpoint(cfg: Config, manifest: dict, ckpt_dir: str | Path, model_dir: str | Path | None = None,
                      summary: dict | None = None) -> Path:
    """Write `model_dir` (default output_dir/model) from one checkpoint: weights, tokenizer, summary; atomically."""
    model_dir = Path(model_dir or cfg.path("model"))
    model = load_checkpoint_model(cfg, manifest, ckpt_dir)
    tmp = staging_dir(model_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tokenizer_dir(cfg).iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    write_chat_template(tmp, cfg.model.task, cfg.model.chat_template)
    (tmp / "training_summary.json").write_text(json.dumps(summary or {}, indent=2, default=float))
    publish_dir(tmp, model_dir)  # model/ -> .model.versions/<version>: serving replicas never see a mix
    return model_dir


def checkpoint_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def training_summary(state: dict, best_metrics: dict, ckpt_path: str) -> dict:
    """The `training_summary.json` contract: steps, best step, val metrics, tokens, time, history, evals."""
    wall = state.get("train_time_s", 0.0)
    return {
        "steps": state.get("step"), "best_step": best_metrics.get("step", state.get("best_step")),
        "val": {k: v for k, v in best_metrics.items() if k.startswith("val_")},
        "tokens_seen": state.get("tokens_seen"), "wall_time_s": wall,
        "tokens_per_s": (state.get("tokens_seen") or 0) / wall if wall else None,
        "history": state.get("history", []), "evals": state.get("evals", []), "checkpoint": ckpt_path,
        "resumed_from": state.get("resumed_from", []),
    }
