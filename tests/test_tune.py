"""`raylm tune`: space errors exit 2; one small ASHA search, interrupted and resumed, exports the best model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raylm.cli import main

REPO = Path(__file__).resolve().parent.parent

TINY_TUNE = """\
name: tinytune
output_dir: {out}
seed: 0
data: {{block_size: 32}}
model:
  task: causal_lm
  arch: {{family: gpt2, n_layer: 1, d_model: 32, n_head: 2}}
train: {{num_workers: 1, max_steps: 40, eval_every: 10, checkpoint_every: 10, batch_size: 8, warmup_steps: 2,
         log_every: 10, eval_batches: 2, deepspeed: {{zero_stage: 1}}}}
tune:
  num_samples: 4
  max_concurrent: 2
  metric: val_loss
  mode: min
  seed: 3
  space:
    train.lr: {{loguniform: [1.0e-5, 3.0e-2]}}
    train.batch_size: {{choice: [4, 8]}}
    model.dropout: {{uniform: [0.0, 0.3]}}
  scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("space, key, reason", [
    ("train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}", "tune.space.train.learning_rate", "no config key"),
    ("train.lr: {loguniform: [1.0e-3]}", "tune.space.train.lr", "loguniform takes [low, high]"),
    ("model.dropout: {normal: [0.0, 0.3]}", "tune.space.model.dropout", "unknown distribution"),
    ("train: {choice: [1, 2]}", "tune.space.train", "a section, not a value"),
])
def test_bad_search_space_exits_2_naming_the_key(tmp_path, capsys, space, key, reason):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\ntune:\n  space:\n    {space}\n")
    assert main(["tune", "-c", str(cfg)]) == 2  # before any Ray work: no cluster is started
    err = capsys.readouterr().err
    assert key in err and reason in err, err


def completed_trials(exp_root: Path) -> dict[str, str]:
    """Trial dir -> its result.json text, for trials whose last result says done (finished or stopped)."""
    done = {}
    for result in exp_root.glob("*/run_trial_*/result.json"):
        lines = result.read_text().strip().splitlines()
        if lines and json.loads(lines[-1]).get("done"):
            done[result.parent.name] = result.read_text()
    return done


class PlacementGroupWatch:
    """Polls the cluster's placement group table while a search runs: the most Train worker groups (bundles of
    1 CPU; Tune's own 0.01-CPU trial groups are not counted) reserved at once."""

    def __init__(self, ray):
        import threading

        self.ray, self.most, self.stop = ray, 0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def live(self) -> int:
        return sum(pg["state"] in ("CREATED", "PREPARED") and any(b.get("CPU", 0) >= 1 for b in pg["bundles"].values())
                   for pg in self.ray.util.placement_group_table().values())

    def poll(self) -> None:
        while not self.stop.wait(0.5):
            self.most = max(self.most, self.live())

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.most


@pytest.mark.timeout(1500)
def test_interrupted_search_resumes_and_releases_every_trial_group(tmp_path, ray_session):
    """A search is interrupted (SIGINT: exit 130, nothing exported) and the same command, run again on the same
    cluster, resumes it to the end. While either runs, at most max_concurrent (2) trials hold placement groups: a
    trial ASHA stops mid-run, or the interrupted search's, has its group released before more trials start (no leak
    to wait on, the hang this guards against), and none is left once the search has ended
    (`stress/tune_repeat.py` runs five full searches in a row)."""
    from tiny_data import build_lm_workspace

    build_lm_workspace(tmp_path)
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(TINY_TUNE.format(out=tmp_path))
    # the CLI joins the session's cluster (no second cluster start); SIGINT as a user's Ctrl+C
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "raylm", "tune", "-c", str(cfg)]
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe: a full pipe would block the driver
    watch = PlacementGroupWatch(ray_session)
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while not completed_trials(tmp_path / "tune") and first.poll() is None and time.time() < deadline:
        time.sleep(2)
    before = completed_trials(tmp_path / "tune")
    assert before, "no trial completed before the deadline"
    first.send_signal(signal.SIGINT)
    first.wait(timeout=180)
    err = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, err[-2000:]
    assert re.search(r"interrupted after \d of 4 trials; rerun the same command to resume", err), err[-2000:]
    assert not (tmp_path / "tune" / "best.json").exists() and not (tmp_path / "model" / "training_summary.json").exists()
    # ASHA's rungs are kept for the resume (Tune restores the searcher, not the scheduler): resumed trials are judged
    # against the finished ones, not only against each other
    assert len(list((tmp_path / "tune").glob("*/raylm-scheduler.pkl"))) == 1

    try:
        second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as hung:  # name what it waited for (the search reports a trial stuck 120 s)
        tail = (hung.stderr or b"")[-4000:].decode(errors="replace")
        pytest.fail(f"the resumed search hung; its stderr ends:\n{tail}\nplacement groups: "
                    f"{ray_session.util.placement_group_table()}\nfree: {ray_session.available_resources()}")
    most = watch.close()
    assert 1 <= most <= 2, most
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming the experiment" in second.stderr
    deadline = time.time() + 30  # every trial's worker group is gone once the search has ended
    while watch.live() and time.time() < deadline:
        time.sleep(1)
    assert watch.live() == 0, ray_session.util.placement_group_table()
    # trials that had completed were not rerun: their results are untouched, and there are still 4 trials
    after = completed_trials(tmp_path / "tune")
    assert {k: after.get(k) for k in before} == before
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    trials = best["trials"]
    assert len(trials) == 4 and len(list((tmp_path / "tune").glob("*/run_trial_*"))) == 4
    assert all(t["status"] in ("finished", "stopped_early") for t in trials), trials
    stopped = [t for t in trials if t["status"] == "stopped_early"]
    assert stopped and all(t["iterations"] < best["max_evaluations"] == 4 for t in stopped)
    assert best["best_trial"]["metric"] == min(t["metric"] for t in trials)
    winner = next(t for t in trials if t["trial_id"] == best["best_trial"]["trial_id"])
    assert best["best_trial"]["config"]["train"]["lr"] == pytest.approx(winner["hyperparameters"]["train.lr"])
    assert Path(best["best_trial"]["checkpoint"]).is_dir()

    # the exported model loads with plain transformers, no raylm import
    probe = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}); t = AutoTokenizer.from_pretrained({str(tmp_path / 'model')!r})
        assert 'raylm' not in sys.modules
        print(m(**t("the big cat", return_tensors="pt")).logits.shape)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and "torch.Size([1," in out.stdout, out.stderr[-2000:]
    summary = json.loads((tmp_path / "model" / "training_summary.json").read_text())
    assert summary["val"]["val_loss"] == pytest.approx(best["best_trial"]["metric"])


@pytest.mark.parametrize("steps, eval_every, checkpoint_every, expected", [
    (30, 20, 20, 2),   # evaluations at 20 and 30 (the last step): ASHA's max_t 2, not 30 // 20 = 1
    (40, 10, 10, 4),
    (30, 20, 25, 3),   # a checkpoint step reports (with its own evaluation) too: 20, 25, 30
])
def test_asha_max_t_counts_every_evaluation(tmp_path, steps, eval_every, checkpoint_every, expected):
    from raylm.config import load_config
    from raylm.tune import evaluations_per_run

    cfg = load_config(None, [f"train.max_steps={steps}", f"train.eval_every={eval_every}",
                             f"train.checkpoint_every={checkpoint_every}"])
    assert evaluations_per_run(cfg) == expected


@pytest.mark.timeout(120)
def test_orphaned_placement_groups_are_only_those_no_live_run_owns(ray_session):
    """What the tune driver removes before a search and after each ended trial: a group whose creator (a Train
    controller) is dead, never one a live driver or actor holds, nor a detached one another job left on purpose."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from raylm.tune import orphaned_placement_groups

    ray = ray_session
    mine = placement_group([{"CPU": 0.01}])  # this driver's own: its job lives
    ray.get(mine.ready(), timeout=30)

    @ray.remote(num_cpus=0)
    class Controller:  # stands in for a Train controller: it creates its worker group's placement group
        def start(self):
            from ray.util.placement_group import placement_group

            return placement_group([{"CPU": 0.01}]).id.hex()

    controller = Controller.remote()
    controller_id = controller._actor_id.hex()
    left = ray.get(controller.start.remote())
    ray.kill(controller)  # as Tune stopping a trial kills its controller; the group's job (this driver) lives on
    deadline = time.time() + 30
    while orphaned_placement_groups(frozenset([controller_id])) != [left] and time.time() < deadline:
        time.sleep(0.5)
    assert orphaned_placement_groups(frozenset([controller_id])) == [left]
    # Ray keeps it (its job lives), and with no dead controller named it is no orphan: a live job may still use it
    assert ray.util.placement_group_table()[left]["state"] != "REMOVED"
    assert left not in orphaned_placement_groups() and mine.id.hex() not in orphaned_placement_groups()

    # a detached group another driver left on purpose, its job ended: not an orphan
    code = ("import ray; from ray.util.placement_group import placement_group; ray.init(address='auto'); "
            "pg = placement_group([{'CPU': 0.01}], lifetime='detached'); ray.get(pg.ready()); print(pg.id.hex())")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    detached = out.stdout.split()[-1]
    try:
        assert detached not in orphaned_placement_groups()
    finally:
        from ray.util.placement_group import PlacementGroup

        for pg in (mine, PlacementGroup(ray.PlacementGroupID(bytes.fromhex(detached))),
                   PlacementGroup(ray.PlacementGroupID(bytes.fromhex(left)))):
            remove_placement_group(pg)
