"""`raylm tune`: a Ray Tune search whose trials are Ray Train runs; exports the best trial's model.

- Space: `tune.space` maps dotted config keys to distributions (SPACE registry); each trial applies its sampled
  values with `with_overrides` (re-validated) and fits the same TorchTrainer `raylm train` builds
  (`raylm.train.make_trainer`), reporting to Tune through `TuneReportCallback` once per evaluation.
- Resources: Ray Train V2 cannot run under a Tuner directly, so the trial function only holds a token 0.01 CPU
  (holding a whole CPU deadlocks 2-core machines: the trial's workers never get one); `tune.max_concurrent`
  caps concurrency; nothing divides the cluster's current resources (an autoscaling cluster starts with none):
  each trial's Train workers request theirs and the autoscaler adds nodes. Extra trials queue.
- Early stopping: ASHA / median stopping over `training_iteration` (one per evaluation); ASHA's max_t is the
  number of evaluations a full run makes.
- Resume: the experiment is named after the config's hash, so rerunning the same config restores it
  (`Tuner.restore`, finished trials are kept, interrupted ones continue from their Train checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from raylm.config import Config, ConfigError, with_overrides
from raylm.storage import is_uri, join as join_storage, resolve as resolve_storage, stage_io, write_json_atomic
from raylm.tracking import log_exported_model, start_search

log = logging.getLogger(__name__)

TRIAL_CPU = 0.01  # the trial function's own share: it only drives a TorchTrainer (0 is refused by Tune)
TRAIN_RUN_NAME = "train"  # each trial's Ray Train run lives in <trial dir>/train


def space_entry(kind: str, args: Any):
    from ray import tune

    SPACE: dict[str, Callable[[Any], Any]] = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "quniform": lambda a: tune.quniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return SPACE[kind](args)


def param_space(cfg: Config) -> dict[str, Any]:
    """`tune.space` as Ray Tune's param_space; `search: grid` turns choices into grid axes."""
    space = {}
    for key, dist in cfg.tune.space.items():
        (kind, args), = dist.items()
        if cfg.tune.search == "grid":
            if kind not in ("grid", "choice"):
                raise ConfigError(f"tune.space.{key}", f"search: grid needs grid or choice values, got {kind}")
            kind = "grid"
        if cfg.tune.search == "optuna" and kind == "grid":
            raise ConfigError(f"tune.space.{key}", "search: optuna cannot take grid; use choice")
        space[key] = space_entry(kind, args)
    return space


def evaluations_per_run(cfg: Config, manifest: dict | None = None) -> int:
    """How many times a full training run reports (ASHA's max_t): the loop's own count of its report steps
    (every eval_every and checkpoint_every step and the last; 30 steps, eval every 20: 2, not 30 // 20)."""
    from raylm.train.loop import count_report_steps, total_steps
    from raylm.train.models import read_manifest

    t = cfg.train
    if t.max_steps is None and manifest is None:
        manifest = read_manifest(cfg)
    return count_report_steps(cfg, total_steps(cfg, manifest or {}, t.num_workers))


def make_scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    s = cfg.tune.scheduler
    SCHEDULERS: dict[str, Callable[[], Any]] = {
        "asha": lambda: ASHAScheduler(time_attr="training_iteration", max_t=evaluations_per_run(cfg),
                                      grace_period=s.grace_period, reduction_factor=s.reduction_factor),
        "median": lambda: MedianStoppingRule(time_attr="training_iteration", grace_period=s.grace_period,
                                             min_samples_required=2),
        "none": FIFOScheduler,
    }
    return SCHEDULERS[s.type]()


def make_searcher(cfg: Config, concurrency: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.seed
    if cfg.tune.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=seed)  # TPE, Ray Tune's default sampler for Optuna
        except (ImportError, AssertionError):
            raise ConfigError("tune.search", "optuna is not installed; pip install 'raylm[optuna]'") from None
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)


def trial_concurrency(cfg: Config) -> int:
    """`tune.max_concurrent`, never derived from the resources the cluster has right now: an autoscaling cluster
    (head with 0 CPUs, min_workers 0) starts with none. Each trial's TorchTrainer requests its workers' resources,
    the autoscaler adds nodes for them, and trials beyond what fits wait in Tune's queue."""
    import ray

    t, n = cfg.train, cfg.tune.max_concurrent
    need = n * (t.num_workers * t.cpus_per_worker + 1)  # + 1: each trial's Ray Data ingest tasks
    have = ray.cluster_resources().get("CPU", 0)
    if have < need:  # informative only: an autoscaler may add the rest; a fixed cluster needs a lower cap
        log.warning("tune: %d trials at a time need ~%g CPUs, the cluster has %g now: the autoscaler must add "
                    "nodes, else lower tune.max_concurrent", n, need, have)
    return n


def run_trial(values: dict[str, Any], base: dict) -> None:
    """One trial: the base config with this trial's values, fitted by the same TorchTrainer as `raylm train`."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylm.train import make_trainer

    base_cfg = Config.model_validate(base)
    cfg = with_overrides(base_cfg, values)
    trial_dir = tune.get_context().get_trial_dir()
    if is_uri(base_cfg.output_dir):  # the trial dir above is a local staging dir: the Train run goes to the store
        trial_dir = join_storage(base_cfg.uri("tune"), experiment_name(base_cfg), Path(trial_dir).name)
    # a fixed run name inside the trial dir: a restored trial's Train run resumes from its latest checkpoint
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, storage_path=trial_dir, name=TRAIN_RUN_NAME,
                           callbacks=[TuneReportCallback(), RecordTrainRun(trial_id)],
                           tracking_run=f"trial-{trial_id}", tracking_parent=experiment_name(base_cfg))
    result = trainer.fit()
    if result.error is not None:
        raise result.error


# ------------------------------------------------------------------ releasing a finished trial's resources
# Why placement groups leaked: when a trial ends (ASHA stops it, or it reaches max_t while its TorchTrainer still
# runs), Tune stops the trial's actor, and the Train controller that actor owns dies with it, mid-run, without
# shutting down its worker group. A non-detached placement group is only removed by Ray once its creator actor AND
# its job are dead: the job (this driver) lives on, so the group keeps its CPUs. Ray Train's backstop, a detached
# PlacementGroupCleaner, asks the State API whether the controller lives; its client finds the dashboard by
# address discovery, which raises "Found multiple active Ray instances" whenever another Ray cluster runs on the
# host (a second user, a test cluster, `ray start`), killing the cleaner's monitor thread at its first check (and
# with no dashboard it retries forever). Then nothing removes the group: the next trials wait for its CPUs forever.
# So each trial's Train controller records its placement groups (RecordTrainRun), and the Tune driver removes them
# once the trial's controller is dead per the GCS actor table (ReleaseFinishedTrials), before it schedules more work.
# Even a job's end does not free a group whose registration reached the GCS after its creator's death (the GCS marks
# creators dead only in groups registered by then): an interrupted search left one, and its resume waited forever.
# So a search first removes such orphans (orphaned_placement_groups).
KV_NAMESPACE = "raylm_tune"
WAIT_REPORT_S = 120.0  # a running trial without a result for this long is reported with what it waits for


def _kv_key(trial_id: str) -> bytes:
    return f"trial-run:{trial_id}".encode()


def _train_callback_bases() -> tuple[type, ...]:
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    return ControllerCallback, WorkerGroupCallback


class RecordTrainRun(*_train_callback_bases()):
    """Runs inside the trial's Train controller: records the controller's actor id and every placement group its
    worker groups get, under the trial id in Ray's internal KV (cluster-wide, read by the Tune driver)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id
        self.record: dict = {"controller": None, "placement_groups": []}

    def _put(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(_kv_key(self.trial_id), json.dumps(self.record).encode(), overwrite=True,
                         namespace=KV_NAMESPACE)

    def after_controller_start(self, train_run_context) -> None:
        import ray

        self.record["controller"] = ray.get_runtime_context().get_actor_id()
        self._put()

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self.record["placement_groups"].append(pg.id.hex())
        self._put()


def trial_run_record(trial_id: str) -> dict | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_kv_key(trial_id), namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None


def actor_dead(actor_id: str | None) -> bool:
    from ray._private.state import actors  # the GCS actor table directly (no dashboard / State API)

    return actor_id is None or (actors(actor_id=actor_id) or {}).get("State", "DEAD") == "DEAD"


def release_placement_groups(pg_ids: list[str]) -> list[str]:
    """Removes those of `pg_ids` that still exist; returns the ids it removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for pg_id in pg_ids:
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
        if ray.util.placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(pg)
            removed.append(pg_id)
    return removed


def orphaned_placement_groups(dead_creators: frozenset[str] = frozenset()) -> list[str]:
    """Ids of placement groups that still hold (or wait for) resources although Ray's own lifetime rule says they
    are over: not detached, creator actor dead and creator job ended; or created by one of `dead_creators` (the dead
    Train controllers of this driver's ended trials). Why they exist: the GCS marks a group's creator dead only for
    groups registered before the death, so a group whose registration was in flight when its controller was killed
    (a trial stopped, or a search interrupted, while its worker group started) is never removed."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    ended_jobs = {j["JobID"] for j in state.job_table() if j["IsDead"]}
    nil_actor = ray.ActorID.nil().binary()
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():  # noqa: SLF001 - raw rows carry the creator
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
            continue
        creator = pg.creator_actor_id.hex() if pg.creator_actor_id != nil_actor else None
        if (creator is not None and creator in dead_creators) or (
                pg.creator_job_id.hex() in ended_jobs and actor_dead(creator)):
            orphans.append(pg.placement_group_id.hex())
    return orphans


def release_orphaned_placement_groups() -> list[str]:
    removed = release_placement_groups(orphaned_placement_groups())
    if removed:
        log.warning("tune: removed %d placement group(s) that ended runs left holding resources: %s",
                    len(removed), removed)
    return removed


def _tune_callback_base() -> type:
    from ray.tune import Callback

    return Callback


class ReleaseFinishedTrials(_tune_callback_base()):
    """Tune driver side: once a finished or errored trial's Train controller is dead, removes the placement groups
    it left; a running trial whose Train workers have not started WAIT_REPORT_S after its start or last result is
    reported once with every placement group that holds or waits for resources, and the cluster's free ones."""

    def __init__(self):
        self.ended: dict[str, float] = {}  # trial id -> when it ended
        self.warned: set[str] = set()
        self.last_result: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.last_result[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last_result[trial.trial_id] = time.monotonic()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        self.release()
        self.report_waiting(trials)

    def on_experiment_end(self, trials, **info):
        deadline = time.monotonic() + 60
        while self.ended and time.monotonic() < deadline:
            self.release()
            time.sleep(0.5)

    def release(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        for trial_id in list(self.ended):
            record = trial_run_record(trial_id)
            if record is None:  # the trial never started a Train run (or it was released already)
                self.ended.pop(trial_id)
                continue
            if not actor_dead(record["controller"]):
                if time.monotonic() - self.ended[trial_id] > WAIT_REPORT_S and trial_id not in self.warned:
                    self.warned.add(trial_id)
                    log.warning("tune: trial %s ended %.0f s ago but its Train controller %s is still alive",
                                trial_id, WAIT_REPORT_S, record["controller"])
                continue
            # the recorded groups, and any this controller created whose start it did not live to record
            created = orphaned_placement_groups(frozenset([record["controller"]]))
            removed = release_placement_groups(list(dict.fromkeys(record["placement_groups"] + created)))
            if removed:
                log.info("tune: released %d placement group(s) trial %s's Train run left behind: %s",
                         len(removed), trial_id, removed)
            _internal_kv_del(_kv_key(trial_id), namespace=KV_NAMESPACE)
            self.ended.pop(trial_id)

    def report_waiting(self, trials) -> None:
        import ray

        now = time.monotonic()
        for trial in trials:
            since = self.last_result.get(trial.trial_id)
            if trial.status != "RUNNING" or since is None or now - since < WAIT_REPORT_S or trial.trial_id in self.warned:
                continue
            if (trial_run_record(trial.trial_id) or {}).get("placement_groups"):
                continue  # its workers have their resources: slow, not waiting
            self.warned.add(trial.trial_id)
            groups = [{"id": pg_id[:8], "state": pg.get("state"), "bundles": list((pg.get("bundles") or {}).values())}
                      for pg_id, pg in ray.util.placement_group_table().items() if pg.get("state") != "REMOVED"]
            msg = (f"trial {trial.trial_id} has waited {now - since:.0f} s for its Train workers; placement groups "
                   f"(waiting or holding resources): {groups or 'none'}; free now: {ray.available_resources()} of "
                   f"{ray.cluster_resources()}")
            log.warning("tune: %s", msg)
            print(f"[raylm tune] {msg}", file=sys.stderr, flush=True)


def trial_done(trial) -> bool:
    """Ran to its end, was stopped by the scheduler (Tune marks both results `done`), or errored; a trial SIGINT
    stopped is TERMINATED too, but its last result is not done."""
    return trial.status == "ERROR" or (trial.status == "TERMINATED" and bool((trial.last_result or {}).get("done")))


def expected_trials(cfg: Config) -> int:
    grid = math.prod(len(args) for d in cfg.tune.space.values() for kind, args in d.items() if kind == "grid")
    return cfg.tune.num_samples * grid


def experiment_name(cfg: Config) -> str:
    return f"{cfg.name}-{cfg.config_hash()[:8]}"


def make_tuner(cfg: Config):
    from ray import tune

    from raylm.runtime import worker_env  # noqa: F401 - workers get raylm's env from ray.init's runtime_env

    fs, storage = resolve_storage(cfg.uri("tune"))  # local or an object store: Tune writes there itself
    name = experiment_name(cfg)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.model_dump(mode="json")),
                                    {"cpu": TRIAL_CPU})
    path = f"{storage}/{name}"
    release_orphaned_placement_groups()  # before the search: e.g. an interrupted search's, which would starve this one
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("tune: resuming the experiment at %s", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs), path
    concurrency = trial_concurrency(cfg)
    log.info("tune: %d samples, %d at a time, scheduler %s, search %s", cfg.tune.num_samples, concurrency,
             cfg.tune.scheduler.type, cfg.tune.search)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                    # the searcher enforces the cap (Tune ignores max_concurrent_trials beside one)
                                    scheduler=make_scheduler(cfg), search_alg=make_searcher(cfg, concurrency)),
        run_config=tune.RunConfig(name=name, storage_path=storage, storage_filesystem=fs, verbose=1,
                                  callbacks=[ReleaseFinishedTrials()]),
    )
    return tuner, path


SCHEDULER_STATE = "raylm-scheduler.pkl"  # in the experiment dir, beside Tune's own state


def scheduler_state(tuner, fs, path: str, save: bool) -> None:
    """Saves (at an interrupt) or restores (before a resumed fit) ASHA's rungs, the results each trial reached them
    with: `Tuner.restore` brings back the searcher but a fresh scheduler, which would judge the resumed trials only
    against each other."""
    import pickle

    from ray.tune.schedulers import AsyncHyperBandScheduler

    scheduler = tuner._local_tuner._tune_config.scheduler  # noqa: SLF001 - the object the search runs with
    if not isinstance(scheduler, AsyncHyperBandScheduler):
        return
    stored = f"{path}/{SCHEDULER_STATE}"
    if save:
        with fs.open_output_stream(stored) as out:
            out.write(pickle.dumps(scheduler._brackets))  # noqa: SLF001 - the rungs; metric and mode come from the config
    elif fs.get_file_info(stored).is_file:
        with fs.open_input_stream(stored) as src:
            scheduler._brackets = pickle.loads(src.read())  # noqa: SLF001


def trial_status(result, evaluations: int, max_t: int) -> str:
    """finished: ran to the end (or stopped by training's own early stopping); stopped_early: by the scheduler."""
    if result.error is not None:
        return "error"
    if (result.metrics or {}).get("early_stopped") or evaluations >= max_t:
        return "finished"
    return "stopped_early"


def metric_curve(result, metric: str) -> list[dict]:
    """One point per training step: a trial resumed from its checkpoint reports the steps after it again, so
    Tune's history can hold a step twice (the later report wins)."""
    df = result.metrics_dataframe
    if df is None or metric not in df:
        return []
    by_step = {}
    for _, r in df.iterrows():
        if r.get(metric) == r.get(metric):  # not NaN
            step = int(r.get("step", r["training_iteration"]))
            by_step[step] = {"iteration": int(r["training_iteration"]), "step": step, "value": float(r[metric])}
    return [by_step[s] for s in sorted(by_step)]


def trial_rows(cfg: Config, grid, max_t: int) -> list[dict]:
    metric, better = cfg.tune.metric, (min if cfg.tune.mode == "min" else max)
    rows = []
    for result in grid:
        curve = metric_curve(result, metric)
        rows.append({
            "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
            "path": result.path,
            "hyperparameters": {k: v for k, v in (result.config or {}).items()},
            "status": trial_status(result, len(curve), max_t),
            "metric": better(p["value"] for p in curve) if curve else None,
            "last_metric": curve[-1]["value"] if curve else None,
            "iterations": len(curve),
            "curve": curve,
            "error": str(result.error).splitlines()[0] if result.error is not None else None,
        })
    return rows


def preflight(cfg: Config) -> None:
    """Config and data checks before any Ray work (`raylm tune` runs it first, cli.run_stage)."""
    from raylm.train import preflight as train_preflight

    if cfg.tune is None:
        raise ConfigError("tune", "this config has no tune section")
    if not cfg.tune.space:
        raise ConfigError("tune.space", "empty: give at least one dotted key to search")
    train_preflight(cfg)


@stage_io("tune")  # remote output_dir: model/ is exported to the mirror, then uploaded
def tune(cfg: Config) -> dict:
    """Runs (or resumes) the search; writes tune/best.json and exports the best trial to model/."""
    from ray.train import Result

    from raylm.train import export_result

    from raylm.train import check_inputs

    preflight(cfg)
    manifest = check_inputs(cfg)
    start = time.time()
    tuner, path = make_tuner(cfg)
    fs = resolve_storage(cfg.uri("tune"))[0]
    scheduler_state(tuner, fs, path, save=False)
    start_search(cfg.public_dump(), str(cfg.path("tracking")), experiment_name(cfg))  # trials nest under it
    grid = tuner.fit()
    trials = grid._experiment_analysis.trials  # noqa: SLF001 - Trial objects carry the status
    expected = expected_trials(cfg)
    done = sum(trial_done(t) for t in trials)
    if done < expected:  # Tune returns normally on SIGINT after saving its state: no best.json, no export
        scheduler_state(tuner, fs, path, save=True)
        print(f"[raylm tune] interrupted after {done} of {expected} trials; rerun the same command to resume "
              f"({path})", file=sys.stderr, flush=True)
        raise KeyboardInterrupt(f"interrupted after {done} of {expected} trials")
    max_t = evaluations_per_run(cfg, manifest)
    rows = trial_rows(cfg, grid, max_t)
    scored = [r for r in rows if r["metric"] is not None]
    if not scored:
        raise RuntimeError(f"no trial reported {cfg.tune.metric}; see {path} "
                           f"({sum(r['status'] == 'error' for r in rows)} trials errored)")
    pick = min if cfg.tune.mode == "min" else max
    best = pick(scored, key=lambda r: r["metric"])
    best_cfg = with_overrides(cfg, best["hyperparameters"])
    train_result = Result.from_path(f"{best['path']}/{TRAIN_RUN_NAME}", storage_filesystem=fs)
    summary = export_result(best_cfg, train_result, manifest=manifest)
    log_exported_model(cfg.public_dump(), str(cfg.path("tracking")), experiment_name(cfg),
                       summary["model_dir"])
    report = {
        "metric": cfg.tune.metric, "mode": cfg.tune.mode, "scheduler": cfg.tune.scheduler.type,
        "search": cfg.tune.search, "experiment_path": path, "max_evaluations": max_t,
        "best_trial": {"trial_id": best["trial_id"], "hyperparameters": best["hyperparameters"],
                       "metric": best["metric"], "metrics": summary.get("val"),
                       "checkpoint": summary.get("checkpoint"), "model_dir": summary.get("model_dir"),
                       "config": best_cfg.public_dump()},  # ${ENV} values stay references
        "trials": rows,
        "wall_time_s": round(time.time() - start, 1),
    }
    write_json_atomic(cfg.uri("tune", "best.json"), report)
    for r in rows:
        print(f"[raylm tune] {r['trial_id']} {r['hyperparameters']} {r['status']} {cfg.tune.metric}={r['metric']} "
              f"evals={r['iterations']}")
    print(f"[raylm tune] best {best['trial_id']} {cfg.tune.metric}={best['metric']:.4f} -> {summary.get('model_dir')}")
    return report
