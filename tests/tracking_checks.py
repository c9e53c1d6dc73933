"""Reading back `train.tracking` output with the tools' own readers (TensorBoard's EventAccumulator, the MLflow
client): shared by the train and tune tests that switch tracking on."""

from __future__ import annotations

from pathlib import Path


def scalars(run_dir: Path) -> dict[str, list[int]]:
    """tag -> the steps logged, from every event file of one TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return {tag: sorted(v) for tag, v in steps.items()}


def mlflow_runs(tracking: Path, experiment: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracking / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {tracking}"
    return client, client.search_runs([exp.experiment_id])


def assert_tracked_train_run(root: Path, experiment: str, summary: dict, log_steps: list[int],
                             eval_steps: list[int], params: dict[str, str]) -> None:
    """One Ray Train run tracked in both tools: the loss curve, evaluations, the resolved config, the export."""
    tracking = root / "tracking"
    run_dirs = [p for p in (tracking / "tensorboard").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    tb = scalars(run_dirs[0])
    assert sorted(set(tb["train_loss"])) == log_steps and sorted(set(tb["val_loss"])) == eval_steps, tb
    client, runs = mlflow_runs(tracking, experiment)
    assert len(runs) == 1, [r.info.run_name for r in runs]  # a restarted worker group continued the same run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == run_dirs[0].name
    assert {k: run.data.params.get(k) for k in params} == params
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted({m.step for m in history}) == log_steps
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_loss")}) == eval_steps
    assert run.data.tags["raylm.model_dir"] == str(Path(summary["model_dir"]).resolve())
    assert {"model/exported_model.json", "model/config.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "model")}
