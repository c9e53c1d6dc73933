"""train.tracking's runs as a Tune search makes them (no Ray needed): a search run, trial runs nested under it, a
restarted trial continuing its own run; read back with the MLflow client and TensorBoard's reader.
(The train loop's own use, across a worker restart, is checked in tests/test_train.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from tracking_checks import mlflow_runs, scalars

from raylm.config import load_config
from raylm.tracking import log_exported_model, open_tracking, start_search

pytestmark = pytest.mark.timeout(300)


def test_tune_trials_nest_under_the_search_and_a_restart_continues_its_run(tmp_path):
    cfg = load_config(None, ["name=nested", "train.tracking=[tensorboard, mlflow]", "train.lr=0.002"]).public_dump()
    tracking = tmp_path / "tracking"
    search = start_search(cfg, str(tracking), "nested-search")
    assert start_search(cfg, str(tracking), "nested-search") == search  # a resumed search keeps its run
    for trial in ("trial-a", "trial-b"):
        t = open_tracking(cfg, str(tracking), trial, rank=0, parent=search)
        for step in (1, 2):
            t.log_metrics({"step": step, "train_loss": 5.0 - step, "early_stopped": False}, step)
        t.close()
    again = open_tracking(cfg, str(tracking), "trial-a", rank=0, parent=search)  # the trial restarted
    again.log_metrics({"val_loss": 2.5}, 3)
    again.close()
    assert open_tracking(cfg, str(tracking), "trial-c", rank=1, parent=search).backends == []  # rank 0 only
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    log_exported_model(cfg, str(tracking), search, model)

    client, runs = mlflow_runs(tracking, "nested")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"nested-search", "trial-a", "trial-b"}
    parent_id = by_name["nested-search"].info.run_id
    for trial in ("trial-a", "trial-b"):
        run = by_name[trial]
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.params["train.lr"] == "0.002" and run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert "early_stopped" not in by_name["trial-a"].data.metrics  # booleans are not metrics
    assert by_name["trial-a"].data.metrics["val_loss"] == 2.5
    assert by_name["nested-search"].data.tags["raylm.model_dir"] == str(model.resolve())
    assert [a.path for a in client.list_artifacts(parent_id, "model")] == ["model/config.json",
                                                                            "model/exported_model.json"]
    tb = scalars(Path(tracking / "tensorboard" / "nested-search" / "trial-a"))
    assert tb["train_loss"] == [1, 2] and tb["val_loss"] == [3]
