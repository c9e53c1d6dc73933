"""Offline experiment tracking (`train.tracking: [tensorboard, mlflow]`), no server: rank 0 writes TensorBoard event
files and an MLflow run in a SQLite store under `output_dir/tracking/`.

    tracking/tensorboard/<run>/events.out.tfevents.*    `tensorboard --logdir output_dir/tracking/tensorboard`
    tracking/mlflow.db, tracking/mlartifacts/            `mlflow ui --backend-store-uri sqlite:///.../mlflow.db`
    tracking/runs.json                                   Ray Train run name -> MLflow run id (resume continues it)

`open_tracking(...)` returns a callback-like `Tracker` (`log_params`, `log_metrics`, `log_artifact`, `close`); the
train loop calls it at log steps and evaluations. A restarted worker group (fault tolerance) reopens the same MLflow
run; a Tune trial's run is nested under its search's run (`mlflow.parentRunId`).
(Ray Train's documented MLflow recipe uses the file store that current MLflow refuses: mlflow#23634; hence SQLite.)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

RUNS_FILE = "runs.json"
MLFLOW_DB = "mlflow.db"
MAX_PARAM_CHARS = 6000  # MLflow's param value limit


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (`train.lr`), the way `--set` names them."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


# ------------------------------------------------------------------------------------------------ backends
class TensorBoardBackend:
    def __init__(self, root: Path, run: str, parent: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(root / "tensorboard" / (f"{parent}/{run}" if parent else run)))

    def log_params(self, params: dict) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))  # indented: markdown code block
        self.writer.add_text("config", text)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_artifact(self, path: Path, name: str) -> None:
        self.writer.add_text(name, str(path))

    def close(self) -> None:
        self.writer.close()


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=f"sqlite:///{(root / MLFLOW_DB).resolve()}")


def mlflow_experiment(client, root: Path, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=(root / "mlartifacts").resolve().as_uri())


class MlflowBackend:
    def __init__(self, root: Path, run: str, experiment: str, parent_run_id: str | None):
        self.root, self.client = root, mlflow_client(root)
        runs = read_runs(root)
        self.run_id = runs.get(run)
        if self.run_id is None:  # a new run; a restarted worker group continues the recorded one
            tags = {"mlflow.runName": run, "raylm.run": run}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            exp_id = mlflow_experiment(self.client, root, experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run, tags=tags).info.run_id
            record_run(root, run, self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.params_logged = bool(self.client.get_run(self.run_id).data.params)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        if self.params_logged:  # MLflow params are immutable: a resumed run keeps the ones it started with
            return
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.params_logged = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path, name: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=name)
        self.client.set_tag(self.run_id, f"raylm.{name}", str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, Callable[..., Any]] = {
    "tensorboard": lambda root, run, experiment, parent, parent_run_id: TensorBoardBackend(root, run, parent),
    "mlflow": lambda root, run, experiment, parent, parent_run_id: MlflowBackend(root, run, experiment, parent_run_id),
}


# --------------------------------------------------------------------------------------------- the tracker
class Tracker:
    """Fans each call out to the configured backends; with none configured (or off rank 0) every call is a no-op."""

    def __init__(self, backends: list | None = None, on_close: Callable[[], None] | None = None):
        self.backends = backends or []
        self.on_close = on_close

    def log_params(self, params: dict) -> None:
        for b in self.backends:
            b.log_params(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        values = scalar_metrics(metrics)
        if values:
            for b in self.backends:
                b.log_metrics(values, step)

    def log_artifact(self, path: str | os.PathLike, name: str) -> None:
        for b in self.backends:
            b.log_artifact(Path(path), name)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        if self.on_close:
            self.on_close()


def read_runs(root: Path) -> dict[str, str]:
    path = root / RUNS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_run(root: Path, run: str, run_id: str) -> None:
    runs = read_runs(root) | {run: run_id}
    tmp = root / f".{RUNS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(runs, indent=2))
    tmp.replace(root / RUNS_FILE)


def open_tracking(cfg_dict: dict, tracking_dir: str | None, run: str, rank: int = 0,
                  parent: str | None = None, store: str | None = None) -> Tracker:
    """The tracker for one Ray Train run (rank 0 only), its params logged; `parent`: the Tune search's run name.
    `store`: output_dir/tracking in an object store: rank 0 may run on any node, so it starts from the stored copy
    (a restarted group continues the same MLflow run) and uploads its own when it closes."""
    kinds = (cfg_dict.get("train") or {}).get("tracking") or []
    if rank != 0 or not kinds or not tracking_dir:
        return Tracker()
    root = Path(tracking_dir)
    on_close = None
    if store:
        from raylm import storage

        if storage.exists(storage.join(store, storage.MARKER)):
            storage.download_dir(store, root)
        on_close = lambda: storage.upload_dir(root, store)  # noqa: E731
    root.mkdir(parents=True, exist_ok=True)
    parent_run_id = read_runs(root).get(parent) if parent else None
    tracker = Tracker([TRACKERS[k](root, run, cfg_dict.get("name", "raylm"), parent, parent_run_id) for k in kinds],
                      on_close)
    tracker.log_params(flatten(cfg_dict))
    return tracker


def start_search(cfg_dict: dict, tracking_dir: str, search: str) -> str | None:
    """The parent MLflow run of a Tune search (created once, before trials start); its run name, or None."""
    if "mlflow" not in ((cfg_dict.get("train") or {}).get("tracking") or []):
        return None
    root = Path(tracking_dir)
    if search not in read_runs(root):
        client = mlflow_client(root)
        exp_id = mlflow_experiment(client, root, cfg_dict.get("name", "raylm"))
        run_id = client.create_run(exp_id, run_name=search, tags={"mlflow.runName": search,
                                                                  "raylm.run": search}).info.run_id
        record_run(root, search, run_id)
    return search


def log_exported_model(cfg_dict: dict, tracking_dir: str, run: str, model_dir: str | os.PathLike) -> None:
    """After export (driver): the exported model's path and small files as the run's `model` artifact."""
    kinds = (cfg_dict.get("train") or {}).get("tracking") or []
    root = Path(tracking_dir)
    if "mlflow" not in kinds or run not in read_runs(root):
        return
    client, run_id = mlflow_client(root), read_runs(root)[run]
    model_dir = Path(model_dir).resolve()
    client.set_tag(run_id, "raylm.model_dir", str(model_dir))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        pointer = Path(tmp) / "exported_model.json"
        pointer.write_text(json.dumps({"model_dir": str(model_dir)}))
        client.log_artifact(run_id, str(pointer), artifact_path="model")
    for name in ("config.json", "training_summary.json", "README.md"):
        if (model_dir / name).is_file():
            client.log_artifact(run_id, str(model_dir / name), artifact_path="model")
