"""The per-worker training loop: DeepSpeed engine from the config, batches in, evaluations and checkpoints out.

`fit(cfg, manifest, train_epoch, val_batches, hooks)` is the whole loop and needs no Ray (a GPU benchmark drives it
at world size 1 with plain iterables); `train_loop_per_worker(config)` wires it to Ray Train: dataset shards,
`ray.train.report` with checkpoints, and resume from `ray.train.get_checkpoint()`.

Reading order: `fit` (the training step, top to bottom) calls `evaluate` and `save_checkpoint` at the steps
`is_report_step` names; both take what they need as arguments.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from raylm.checkpoints import resumable, weights_only_loads, write_manifest
from raylm.config import Config
from raylm.tracking import Tracker, open_tracking
from raylm.train.models import build_model, tokenizer_dir

CKPT_TAG = "ds"  # the DeepSpeed tag inside every checkpoint directory
STATE_FILE = "raylm_state.json"  # written last by rank 0: a checkpoint without it is incomplete
PROBE_FILE = "probe.pt"  # fixed inputs and the live model's logits on them, to check exports against
FAULT_ENV = "RAYLM_FAULT_AT_STEP"  # tests: crash one worker once at this step (fault-tolerance check)


# ------------------------------------------------------------------------------------------ DeepSpeed config
def ds_config(cfg: Config) -> dict:
    """The DeepSpeed config dict, built from `train` (optimizer params; the scheduler is passed separately)."""
    t, d = cfg.train, cfg.train.deepspeed
    zero: dict = {"stage": d.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.clip_grad_norm or 0.0,
        # torch_adam: PyTorch's AdamW instead of compiling DeepSpeed's fused_adam (a slow first build on CPU)
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.tensor_parallel > 1:  # AutoTP: shards linear layers across GPUs (validated to need use_gpu)
        config["tensor_parallel"] = {"autotp_size": d.tensor_parallel}
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (nanoGPT): biases and norms are not decayed; frozen params left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """Ranks that see different data: a tensor-parallel group of `tensor_parallel` ranks shares one batch."""
    return max(1, world_size // cfg.train.deepspeed.tensor_parallel)


def total_steps(cfg: Config, manifest: dict, world_size: int) -> int:
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    rows = manifest["splits"]["train"]["rows"]
    per_epoch = max(1, rows // (t.batch_size * data_parallel_size(cfg, world_size) * t.grad_accum))
    return max(1, math.ceil(t.epochs * per_epoch))


def is_report_step(cfg: Config, step: int, steps: int) -> bool:
    """Steps that evaluate and report to Ray: every eval_every and checkpoint_every step, and the last one
    (a checkpoint always carries its own fresh validation score, so checkpoints can be ranked)."""
    t = cfg.train
    return step % t.eval_every == 0 or step % t.checkpoint_every == 0 or step >= steps


def count_report_steps(cfg: Config, steps: int) -> int:
    """How many reports a full run makes (Tune's ASHA max_t)."""
    return sum(is_report_step(cfg, s, steps) for s in range(1, steps + 1))


def build_engine(cfg: Config, manifest: dict, steps: int):
    import deepspeed
    from transformers import get_scheduler

    model = build_model(cfg, manifest)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.lr_schedule]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds_config(cfg),
        lr_scheduler=lambda opt: get_scheduler(schedule, opt, num_warmup_steps=cfg.train.warmup_steps,
                                               num_training_steps=steps))
    if cfg.train.compile:  # torch.compile of the module inside the engine (DeepSpeed keeps ZeRO hooks working)
        engine.compile()
    return engine


# ------------------------------------------------------------------------------------------------ batches
class Masker:
    """BERT masking for training (15% of non-special tokens; 80% [MASK], 10% random, 10% kept), transformers'
    collator; validation and test use the seeded per-row `raylm.evaluate.mask_row` instead (same rule)."""

    def __init__(self, cfg: Config, manifest: dict, seed: int):
        from transformers import AutoTokenizer, DataCollatorForLanguageModeling

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(cfg)))  # pulled on this node when remote
        self.collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
        self.collator.generator = torch.Generator().manual_seed(seed)
        self.special = torch.tensor(sorted(set(tok.all_special_ids)))

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, self.special))


def eval_masker(cfg: Config, manifest: dict) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Validation masking: the same seeded per-row 80/10/10 rule `raylm evaluate` applies to the test split."""
    from raylm.evaluate import masking_context, mask_row

    ctx = masking_context(manifest, cfg.seed)

    def mask(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [mask_row(row, ctx) for row in ids.numpy()]
        masked = torch.as_tensor(np.stack([m for m, _ in rows]))
        labels = torch.where(torch.as_tensor(np.stack([c for _, c in rows])), ids, torch.full_like(ids, -100))
        return masked, labels

    return mask


def as_long(column) -> torch.Tensor:
    """A batch column as int64: tensors, numpy arrays, or numpy object arrays of equal-length lists."""
    if isinstance(column, np.ndarray) and column.dtype == object:
        column = np.stack(column)
    return torch.as_tensor(np.asarray(column) if isinstance(column, list) else column).long()


def model_inputs(task: str, batch: dict, masker: Callable | None, device) -> tuple[dict, int]:
    """Model kwargs for one batch of shard rows, and the number of tokens the loss is averaged over."""
    ids = as_long(batch["input_ids"])
    if task == "causal_lm":
        inputs, n = {"input_ids": ids, "labels": ids}, ids.numel() - ids.shape[0]
    elif task == "masked_lm":
        masked, labels = masker(ids)
        inputs, n = {"input_ids": masked, "labels": labels}, int((labels != -100).sum())
    else:
        inputs = {"input_ids": ids, "attention_mask": as_long(batch["attention_mask"]),
                  "labels": as_long(batch["label"])}
        n = ids.shape[0]
    return {k: v.to(device) for k, v in inputs.items()}, n


def data_parallel_slice(batch: dict, dp_rank: int, dp_size: int) -> dict:
    """This data-parallel rank's rows of a global batch: every rank of one tensor-parallel group gets the same rows."""
    return {k: v[dp_rank::dp_size] for k, v in batch.items()}


# -------------------------------------------------------------------------------------------------- state
@dataclass
class State:
    """Everything besides the DeepSpeed engine that a resume needs (saved as the checkpoint's client state)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in `epoch`: the data position
    tokens_seen: int = 0
    best_val: float = math.inf  # best `train.metric` so far (-inf start when train.mode is max)
    best_step: int = 0
    bad_evals: int = 0
    train_time_s: float = 0.0
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    resumed_from: list = field(default_factory=list)  # steps this run restarted from after a failure


@dataclass
class Hooks:
    """How the loop talks to its runner: Ray Train, or plain callables for a run without Ray."""

    report: Callable[[dict, str | None], None] = lambda metrics, ckpt_dir: None
    restore_dir: str | None = None  # a checkpoint directory to resume from
    rank: int = 0
    world_size: int = 1
    log: Callable[[str], None] = print
    dp_rank: int = 0  # data-parallel rank: equal on the ranks of one tensor-parallel group
    dp_size: int = 1
    track: Tracker = field(default_factory=Tracker)  # train.tracking (TensorBoard, MLflow): real on rank 0 only


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def fmt_eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ------------------------------------------------------------------------------------- evaluation
def evaluate(engine, task: str, val_batches: Iterable[dict], masker: Callable | None, hooks: Hooks,
             eval_batches: int | None) -> tuple[dict, dict]:
    """Validation metrics over the val split (each data-parallel rank scores every dp_size-th batch), and a probe:
    the first val rows, the same on every rank, whose logits each checkpoint records for the export check."""
    limit = eval_batches * hooks.dp_size if eval_batches else None
    first, local = None, []
    for i, batch in enumerate(val_batches):
        if limit is not None and i >= limit:
            break
        first = batch if first is None else first
        if i % hooks.dp_size == hooks.dp_rank:
            local.append(batch)
    if first is None:
        raise RuntimeError("the val split has no rows: validation (early stopping, best checkpoint) needs some")
    probe = {"input_ids": as_long(first["input_ids"])[:2]}
    if task == "classification":
        probe["attention_mask"] = as_long(first["attention_mask"])[:2]
    # every rank runs the same number of forwards (ZeRO-3 gathers params collectively); extras weigh 0
    n_fwd = int(max(all_sum([0.0] * hooks.rank + [len(local)] + [0.0] * (hooks.world_size - hooks.rank - 1),
                            engine.device)))
    engine.eval()
    loss_sum = n_sum = correct = 0.0
    with torch.no_grad():
        for i in range(n_fwd):
            batch = local[i] if i < len(local) else first  # a forward that weighs 0
            inputs, n = model_inputs(task, batch, masker, engine.device)
            out = engine(**inputs)
            if i < len(local):
                loss_sum += float(out.loss) * n
                n_sum += n
                if task == "classification":
                    correct += float((out.logits.argmax(-1) == inputs["labels"]).sum())
    engine.train()
    loss_sum, n_sum, correct = all_sum([loss_sum, n_sum, correct], engine.device)
    val_loss = loss_sum / n_sum
    if task == "classification":
        return {"val_loss": val_loss, "val_accuracy": correct / n_sum}, probe
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}, probe


def improves(value: float, best: float, mode: str, min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta


# ------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(engine, state: State, probe: dict, directory: str, cfg: Config, hooks: Hooks) -> None:
    """Every rank saves its DeepSpeed shards and runs the probe forward (collectives under ZeRO-3); rank 0 writes
    the probe and, last, the state file that marks the checkpoint complete."""
    engine.save_checkpoint(directory, tag=CKPT_TAG, client_state={"raylm": state.__dict__, "rng": torch.get_rng_state()})
    engine.eval()
    with torch.no_grad():
        probe_logits = engine(**{k: v.to(engine.device) for k, v in probe.items()}).logits.float().cpu()
    engine.train()
    if hooks.rank == 0:
        torch.save({**probe, "logits": probe_logits}, Path(directory) / PROBE_FILE)
        tmp = Path(directory) / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({**state.__dict__, "task": cfg.model.task, "config": cfg.model_dump(mode="json")}))
        tmp.rename(Path(directory) / STATE_FILE)
    write_manifest(directory, hooks.rank, hooks.world_size)  # last: sizes + hashes of this rank's files


def restore(engine, restore_dir: str, log: Callable[[str], None]) -> State:
    with weights_only_loads():  # DeepSpeed asks for full unpickling; never let a checkpoint run code
        _, client = engine.load_checkpoint(restore_dir, tag=CKPT_TAG)
    state = State(**client["raylm"])
    state.resumed_from.append(state.step)
    torch.set_rng_state(client["rng"])
    log(f"resumed from checkpoint at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    return state


# --------------------------------------------------------------------------------------------------- loop
def fit(cfg: Config, manifest: dict, train_epoch: Callable[[int], Iterable[dict]],
        val_batches: Callable[[], Iterable[dict]], hooks: Hooks = Hooks()) -> dict:
    """Train until max_steps/epochs or early stopping; returns the final state as a dict (rank 0's is used)."""
    t, task, metric = cfg.train, cfg.model.task, cfg.train.metric
    steps = total_steps(cfg, manifest, hooks.world_size)
    engine = build_engine(cfg, manifest, steps)
    state = restore(engine, hooks.restore_dir, hooks.log) if hooks.restore_dir else \
        State(best_val=math.inf if t.mode == "min" else -math.inf)
    torch.manual_seed(cfg.seed + 1000 * hooks.dp_rank + state.step)  # a tensor-parallel group shares dropout
    masker = Masker(cfg, manifest, seed=cfg.seed + hooks.dp_rank) if task == "masked_lm" else None
    val_masker = eval_masker(cfg, manifest) if task == "masked_lm" else None
    min_delta = t.early_stopping.min_delta if t.early_stopping else 0.0
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    tokens_per_micro = t.batch_size * manifest["block_size"] * hooks.dp_size

    window_loss, window_micro, window_start = torch.zeros((), device=engine.device), 0, time.perf_counter()
    loop_start = time.perf_counter() - state.train_time_s
    micro_in_step, done = 0, state.step >= steps
    engine.train()
    while not done:
        skip, seen = state.batches_in_epoch, 0  # resume mid-epoch: skip what was already consumed
        for i, batch in enumerate(train_epoch(state.epoch)):
            seen += 1
            if i < skip:
                continue
            # -- one micro-step: forward, backward, optimizer step at the accumulation boundary (DeepSpeed)
            inputs, _ = model_inputs(task, batch, masker, engine.device)
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach()  # stays on the device: the host syncs only at log steps
            window_micro += 1
            state.batches_in_epoch += 1
            state.tokens_seen += tokens_per_micro
            micro_in_step += 1
            if micro_in_step < t.grad_accum:
                continue
            micro_in_step = 0
            state.step += 1
            if fault_step and state.step == fault_step and hooks.restore_dir is None and hooks.rank == hooks.world_size - 1:
                hooks.log(f"fault injection: worker rank {hooks.rank} exits at step {state.step}")
                # die a few seconds after the last report: Ray Train's controller polls reports every ~2 s, and a
                # worker that dies before its last report was polled loses that checkpoint (resumes from the one before)
                time.sleep(6)
                os._exit(1)
            now = time.perf_counter()
            state.train_time_s = now - loop_start
            report = is_report_step(cfg, state.step, steps)
            # -- log: the one host sync of the training loss
            if state.step % t.log_every == 0 or report:
                elapsed = max(now - window_start, 1e-9)
                entry = {"step": state.step, "train_loss": float(window_loss) / max(window_micro, 1),
                         "lr": engine.get_lr()[0], "tokens_per_s": window_micro * tokens_per_micro / elapsed,
                         "step_time_s": elapsed / max(window_micro / t.grad_accum, 1)}
                state.history.append(entry)
                hooks.track.log_metrics(entry, state.step)
                if hooks.rank == 0:
                    hooks.log(f"step {state.step}/{steps} | loss {entry['train_loss']:.4f} | lr {entry['lr']:.2e} | "
                              f"{entry['tokens_per_s']:,.0f} tok/s | eta {fmt_eta((steps - state.step) * entry['step_time_s'])}")
                window_loss, window_micro, window_start = torch.zeros((), device=engine.device), 0, time.perf_counter()
            if not report:
                continue
            # -- evaluate, early-stop on train.metric, checkpoint, report
            val, probe = evaluate(engine, task, val_batches(), val_masker, hooks, t.eval_batches)
            improved = improves(val[metric], state.best_val, t.mode, min_delta)
            if improved:
                state.best_val, state.best_step, state.bad_evals = val[metric], state.step, 0
            else:
                state.bad_evals += 1
            state.evals.append({"step": state.step, **val})
            hooks.track.log_metrics(val, state.step)
            stop = bool(t.early_stopping and state.bad_evals >= t.early_stopping.patience)
            done = stop or state.step >= steps
            last = state.history[-1]
            metrics = {"step": state.step, "epoch": state.epoch, **val, "train_loss": last["train_loss"],
                       "lr": last["lr"], "tokens_per_s": last["tokens_per_s"], "step_time_s": last["step_time_s"],
                       "tokens_seen": state.tokens_seen, "early_stopped": stop}
            if hooks.rank == 0:
                hooks.log(f"eval step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in val.items())
                          + (" (early stop)" if stop else ""))
            # checkpoint on cadence, on a new best (so the best is exportable), and at the end
            if state.step % t.checkpoint_every == 0 or improved or done:
                with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
                    save_checkpoint(engine, state, probe, tmp, cfg, hooks)
                    hooks.report(metrics, tmp)
            else:
                hooks.report(metrics, None)
            window_start = time.perf_counter()  # evaluation time is not training throughput
            if done:
                break
        else:
            if seen == 0:  # drop_last on a shard smaller than one batch: never loop over empty epochs
                raise RuntimeError(f"worker rank {hooks.rank} got no training batch in epoch {state.epoch}: its "
                                   f"shard has fewer than train.batch_size ({t.batch_size}) rows")
            state.epoch += 1
            state.batches_in_epoch = 0
    return dict(state.__dict__)


def fit_in_process(cfg: Config, manifest: dict, rows: list, port: int = 29500) -> dict:
    """`fit` at world size 1 in this process, without Ray (benchmarks, the compile test): every epoch and every
    evaluation read `rows`, a list of input_ids batches."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(port))

    def epoch(_):
        return ({"input_ids": ids} for ids in rows)

    return fit(cfg, manifest, epoch, lambda: epoch(0), Hooks(report=lambda m, c: None, log=lambda s: None))


# ---------------------------------------------------------------------------------------------- Ray Train

def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's worker function: shards from Ray Data, reports and checkpoints to Ray Train."""
    import ray.train
    from ray.train import Checkpoint

    from raylm.accelerator import choose_device

    choice = choose_device()  # before DeepSpeed is first used: this worker's own GPU/CPU, not the driver's
    print(f"[raylm train] worker rank {ray.train.get_context().get_world_rank()}: {choice.describe()}", flush=True)
    cfg = Config.model_validate(config["cfg"])
    manifest = config["manifest"]
    if config.get("fault_at_step"):
        os.environ[FAULT_ENV] = str(config["fault_at_step"])
    ctx = ray.train.get_context()
    tp = cfg.train.deepspeed.tensor_parallel
    dp_rank, dp_size = ctx.get_world_rank() // tp, data_parallel_size(cfg, ctx.get_world_size())
    train_shard = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")

    def train_epoch(epoch: int):
        # tensor_parallel > 1: the train set is not split per worker (see make_trainer); every rank reads the same
        # global batches in the same order and keeps its data-parallel rank's rows
        batches = train_shard.iter_torch_batches(batch_size=cfg.train.batch_size * dp_size if tp > 1 else cfg.train.batch_size,
                                                 drop_last=True, local_shuffle_buffer_size=4 * cfg.train.batch_size * dp_size,
                                                 local_shuffle_seed=cfg.seed + epoch, dtypes=None)
        return (data_parallel_slice(b, dp_rank, dp_size) for b in batches) if tp > 1 else batches

    val_cache: list[dict] = []

    def val_batches():
        batches = val_ds.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy") if not val_cache else None
        if not cfg.train.eval_batches:
            return batches  # the whole val split: streamed on every evaluation
        # capped: every evaluation scores the same first batches (val keeps its order), so read them once here
        # instead of starting one Ray Data execution per evaluation; eval_batches bounds what is held
        if not val_cache:
            val_cache.extend(itertools.islice(batches, cfg.train.eval_batches * dp_size))
        return val_cache

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a damaged newest checkpoint falls back to the previous intact one
        checkpoint = resumable(checkpoint, STATE_FILE)
    with (checkpoint.as_directory() if checkpoint else _null()) as restore_dir:
        if restore_dir and not (Path(restore_dir) / STATE_FILE).exists():
            raise RuntimeError(f"checkpoint {restore_dir} is incomplete (no {STATE_FILE}); refusing to resume")
        # a restarted worker group reopens the same tracking run (keyed by the Ray Train run's name)
        track = open_tracking(config.get("tracking_config", config["cfg"]), config.get("tracking_dir"),
                              config.get("tracking_run", "train"), ctx.get_world_rank(), config.get("tracking_parent"),
                              config.get("tracking_store"))
        hooks = Hooks(report=report, restore_dir=restore_dir, rank=ctx.get_world_rank(),
                      world_size=ctx.get_world_size(), log=lambda s: print(f"[raylm train] {s}", flush=True),
                      dp_rank=dp_rank, dp_size=dp_size, track=track)
        try:
            return fit(cfg, manifest, train_epoch, val_batches, hooks)
        finally:
            track.close()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
