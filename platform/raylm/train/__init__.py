"""`raylm train`: a Ray Train TorchTrainer whose workers run DeepSpeed on streamed Parquet shards, then HF export.

- `train(cfg)`: one run -> output_dir/train/ (Ray results, checkpoints) and output_dir/model/; returns the summary.
- `make_trainer(cfg, storage_path=None, name=None, callbacks=None)`: the TorchTrainer alone (Tune builds one per
  trial with `callbacks=[TuneReportCallback()]`).
- `export_result(cfg, result, model_dir=None)`: a Ray Train `Result` -> `model/` (its best checkpoint by train.metric).
- `loop.fit(...)`: the per-worker loop without Ray (world size 1 on a GPU, see bench/bench_train.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raylm import storage
from raylm.checkpoints import checkpoint_intact
from raylm.config import Config, ConfigError
from raylm.train.export import checkpoint_state, export_checkpoint, training_summary
from raylm.train.loop import FAULT_ENV, data_parallel_size, train_loop_per_worker
from raylm.train.models import model_config, read_manifest
from raylm.tracking import log_exported_model

__all__ = ["train", "make_trainer", "export_result", "check_inputs"]


def check_split_sizes(cfg: Config, manifest: dict) -> None:
    """A split too small to train on is a config error: every data-parallel worker needs one full batch
    (drop_last), and validation needs rows (it picks the best checkpoint and stops early)."""
    t = cfg.train
    rows = {s: ((manifest.get("splits") or {}).get(s) or {}).get("rows", 0) for s in ("train", "val")}
    if rows["val"] == 0:
        raise ConfigError("data.split.val", f"the val split in data/ has no rows (data.split.val is {cfg.data.split.val:g}): "
                                            "validation picks the best checkpoint and stops early, so it needs at least "
                                            "one block; raise data.split.val or add documents, then rerun `raylm prepare`")
    dp = data_parallel_size(cfg, t.num_workers)
    if rows["train"] < t.batch_size * dp:
        fits = f"train.batch_size <= {rows['train'] // dp}" if rows["train"] >= dp else f"train.num_workers <= {rows['train']}"
        raise ConfigError("train.batch_size", f"{t.batch_size} per worker x {dp} data-parallel workers needs at least "
                                              f"{t.batch_size * dp} train rows; data/ has {rows['train']}: use {fits}, "
                                              "or raise data.split.train / add documents")


def check_inputs(cfg: Config) -> dict:
    """Fail fast, before any Ray work, on missing shards and data/model mismatches; returns the manifest."""
    manifest = read_manifest(cfg)
    check_split_sizes(cfg, manifest)
    for split in ("train", "val"):
        d = cfg.uri("data", split)
        if not storage.list_files(d, ".parquet"):
            raise FileNotFoundError(f"no Parquet shards in {d}: run `raylm prepare -c <config>` first")
    model_config(cfg, manifest)  # raises ConfigError on vocab / task / block size mismatches
    return manifest


def preflight(cfg: Config) -> None:
    """`raylm train` runs this before Ray starts (cli.run_stage): bad data/config exits 2 with no cluster started.
    A remote output_dir is checked by the stage itself, once its inputs are pulled."""
    if not storage.is_uri(cfg.output_dir):
        check_inputs(cfg)


def make_trainer(cfg: Config, storage_path: str | Path | None = None, name: str | None = None,
                 callbacks: list | None = None, manifest: dict | None = None, tracking_run: str | None = None,
                 tracking_parent: str | None = None):
    import os

    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = manifest or check_inputs(cfg)
    t = cfg.train
    # shards and checkpoints live where output_dir points (local or an object store): Ray reads and writes them there
    datasets = train_datasets(cfg)
    storage_fs, storage_dir = storage.resolve(str(storage_path or cfg.uri("train")))
    run_config = RunConfig(
        name=name or run_name(cfg),
        storage_path=storage_dir, storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=t.metric,
                                           checkpoint_score_order=t.mode),
        failure_config=FailureConfig(max_failures=t.max_failures),
        callbacks=callbacks,
    )
    loop_config = {"cfg": cfg.model_dump(mode="json"), "manifest": manifest,
                   "fault_at_step": os.environ.get(FAULT_ENV),  # test hook: crash one worker once at this step
                   # train.tracking: the run's name there (default: the Ray Train run's), its parent (a search)
                   "tracking_dir": str(cfg.path("tracking").resolve()), "tracking_config": cfg.public_dump(),
                   "tracking_run": tracking_run or run_config.name, "tracking_parent": tracking_parent,
                   # a plain run on a remote output_dir: rank 0 (on any node) syncs tracking/ with the store;
                   # Tune trials share one directory and leave that to the driver
                   "tracking_store": cfg.uri("tracking") if storage.is_uri(cfg.output_dir) and not tracking_parent else None}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=run_config,
        datasets=datasets,
        dataset_config=data_config(cfg),
    )


def train_datasets(cfg: Config) -> dict:
    """The train and val shards as Ray Datasets, read where output_dir points. Train shards come in a file order
    drawn from `seed` (the same on every pass and every restart); rows are mixed further by the loop's per-epoch
    seeded local shuffle buffer."""
    import ray.data

    datasets = {}
    for split in ("train", "val"):
        # one seeded order for every pass: a resumed run skips the batches it saw in the order it saw them (a new
        # order per epoch, reseed_after_execution=True, made resumes see other rows: 2.7% val-loss drift in stress)
        shuffle = ray.data.FileShuffleConfig(seed=cfg.seed, reseed_after_execution=False) if split == "train" else None
        datasets[split] = storage.read_parquet(cfg.uri("data", split), shuffle=shuffle)
    return datasets


def data_config(cfg: Config):
    """Train rows are split per worker and val is read whole by each worker, then divided. With tensor_parallel > 1
    the ranks of one tensor-parallel group must see identical batches: no split, every worker reads the train set
    in the same order and keeps its data-parallel rank's rows (loop.data_parallel_slice)."""
    from ray.train import DataConfig

    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    if cfg.train.deepspeed.tensor_parallel == 1:
        # each rank scores every dp_size-th val batch of its own read: all ranks must see val in one (file) order
        return DataConfig(datasets_to_split=["train"], execution_options={"val": ordered})
    return DataConfig(datasets_to_split=[], execution_options=ordered)


def best_checkpoint(result, metric: str, mode: str, best_step: int | None = None):
    """The checkpoint of the best evaluation (early stopping's `best_step` by `train.metric`, which honours
    min_delta), else the best `metric` in `mode` among those Ray kept (the later on ties); with its metrics."""
    # a checkpoint damaged on disk (e.g. one a resume skipped) is never exported
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m and checkpoint_intact(c)]
    if not ranked:
        raise RuntimeError(f"training produced no checkpoint with {metric} (results in {result.path})")
    at_best = [cm for cm in ranked if cm[1].get("step") == best_step]
    sign = 1 if mode == "min" else -1
    return at_best[0] if at_best else min(ranked, key=lambda cm: (sign * cm[1][metric], -cm[1]["step"]))


def export_result(cfg: Config, result, model_dir: str | Path | None = None, manifest: dict | None = None) -> dict:
    """Export a Ray Train `Result`'s best checkpoint to `model_dir` (default output_dir/model); returns the summary."""
    manifest = manifest or read_manifest(cfg)
    state = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as last_dir:
            state = checkpoint_state(last_dir)  # the latest checkpoint has the full history
    ckpt, metrics = best_checkpoint(result, cfg.train.metric, cfg.train.mode, state.get("best_step"))
    with ckpt.as_directory() as ckpt_dir:
        summary = training_summary(state, metrics, ckpt.path)
        summary["early_stopped"] = bool((result.metrics or {}).get("early_stopped"))
        summary["results_path"] = result.path
        summary["run_key"] = run_name(cfg)  # a rerun of the same settings finds it finished
        out = export_checkpoint(cfg, manifest, ckpt_dir, model_dir, summary)
    summary["model_dir"] = str(out)
    return summary


def run_name(cfg: Config) -> str:
    """The Ray Train run's name: the same for the same seed/data/model/train settings, so `raylm train` started
    again after its driver died continues that run from its newest checkpoint instead of starting over."""
    import hashlib
    import json

    key = {k: v for k, v in cfg.public_dump().items() if k in ("seed", "data", "model", "train")}
    return "run-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def finished_summary(cfg: Config) -> dict | None:
    """The exported model's training summary when it came from a finished run of these settings."""
    path = cfg.path("model", "training_summary.json")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("run_key") == run_name(cfg) else None


@storage.stage_io("train")  # remote output_dir: model/ is exported to the mirror, then uploaded
def train(cfg: Config, force: bool = False) -> dict:
    manifest = check_inputs(cfg)
    done = None if force else finished_summary(cfg)
    if done is not None:
        print(f"[raylm train] {run_name(cfg)} already finished (step {done.get('steps')}, model in "
              f"{cfg.path('model')}); nothing to do. Pass --force to train again from scratch.", flush=True)
        return done
    start = time.time()
    # --force: a new run beside the finished one (its checkpoints stay until keep_checkpoints prunes this one's)
    name = f"{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}" if force else run_name(cfg)
    result = make_trainer(cfg, manifest=manifest, name=name).fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    summary = export_result(cfg, result, manifest=manifest)
    if storage.is_uri(cfg.output_dir) and storage.exists(cfg.uri("tracking", storage.MARKER)):
        storage.pull(cfg.output_dir, "tracking")  # what rank 0 uploaded from its node
    log_exported_model(cfg.public_dump(), str(cfg.path("tracking")), Path(result.path).name,
                       summary["model_dir"])
    summary["total_wall_time_s"] = time.time() - start
    print(f"[raylm train] exported step {summary['best_step']} ({cfg.train.metric} {summary['val'].get(cfg.train.metric, 0):.4f}) "
          f"to {summary['model_dir']} in {summary['total_wall_time_s']:.0f}s")
    return summary
