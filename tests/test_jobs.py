"""README "From laptop to cluster", step 1, run as written against a real `ray start --head` with Ray's defaults
(token auth ON): the README's own commands, parsed from README.md, with only the test's private ports, temp dir
and output dir put in, plus tiny settings appended. Also on that head: the package reaches workers without an
install, the runtime env carries no accelerator decision, a bad config FAILS naming the key, and `raylm` without
`--address` joins the running head (or ignores a stale `ray_current_cluster` file)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ray_head import (BIN, README_ADDRESS, PrivateHead, device_choices, free_port, readme_command, readme_commands,
                      readme_submit, submit_argv)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "configs/quickstart.yaml"
# tiny: a few dozen documents, a small vocab, a 1-layer model, a handful of steps
TINY_DATA = ["--set", "data.sources=[{builtin: python-docs, max_docs: 60}]", "--set", "data.tokenizer.train.vocab_size=300",
             "--set", "data.block_size=32"]
TINY_TRAIN = ["--set", "model.arch={family: gpt2, n_layer: 1, d_model: 32, n_head: 2}", "--set", "train.max_steps=4",
              "--set", "train.batch_size=2", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
              "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1", "--set", "train.log_every=1"]

# run inside a job: where the driver and a remote worker import raylm from, and the runtime env workers get
PROBE = ("import sys, json; sys.path.insert(0, 'platform'); from raylm.runtime import ensure_ray; ensure_ray(); "
         "import ray, raylm; f = ray.remote(lambda: (__import__('raylm').__file__, "
         "ray.get_runtime_context().runtime_env.get('env_vars') or {})); "
         "where, env = ray.get(f.remote()); print('RAYLM_AT', raylm.__file__, where); print('WORKER_ENV', json.dumps(env))")
# env vars that decide a device: none may be set for workers by the driver
ACCELERATOR_VARS = ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU", "RAYLM_DEVICE")


@pytest.fixture(scope="module")
def head():
    """The README's head: its `export`s, its token command, its `ray start --head` flags (plus private ports and
    a private RAY_TMPDIR, so the head records itself where Ray looks by default, without touching /tmp/ray)."""
    cmds = readme_commands()
    assert cmds[0] == "source .venv/bin/activate"  # PrivateHead puts the venv first on PATH
    exports = dict(c.removeprefix("export ").split("=", 1) for c in cmds if c.startswith("export "))
    assert exports == {"RAY_AUTH_MODE": "token"}, "the README turns token auth on for its clients"
    assert cmds[-1] == "ray stop"  # the only README command not run: it would stop every Ray on this machine
    start = readme_command("ray start --head")
    with PrivateHead(head_args=tuple(shlex.split(start)[2:]), env=exports, default_temp_dir=True) as h:
        token_cmd = readme_command("ray get-auth-token")
        proc = subprocess.run(["bash", "-c", token_cmd], env=h.env, cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        yield h


def submit(head: PrivateHead, *entrypoint: str, timeout: float = 420) -> tuple[str, str, str]:
    return submit_argv(head, ["ray", "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO),
                              "--", *entrypoint], timeout=timeout)


@pytest.mark.timeout(300)  # includes starting the head
def test_job_ships_raylm_to_workers_without_install_or_device_choice(head):
    _, state, logs = submit(head, "python", "-c", PROBE, timeout=240)
    assert state == "SUCCEEDED", logs
    driver_file, worker_file = next(ln for ln in logs.splitlines() if ln.startswith("RAYLM_AT")).split()[1:]
    assert "working_dir_files" in driver_file, "the driver imports the uploaded checkout (--working-dir .)"
    assert "py_modules_files" in worker_file, "workers import raylm from the job's py_modules, not a local install"
    worker_env = json.loads(next(ln for ln in logs.splitlines() if ln.startswith("WORKER_ENV")).split(" ", 1)[1])
    assert worker_env.get("TOKENIZERS_PARALLELISM") == "false", "raylm's env_vars did reach the worker"
    decided = {k: v for k, v in worker_env.items() if k in ACCELERATOR_VARS}
    assert not decided, f"the driver decided a device for every worker: {decided}"


@pytest.mark.timeout(900)
def test_readme_step_1_verbatim_prepare_train_succeed(head, tmp_path):
    """README step 1 on a token-auth head: prepare and train jobs SUCCEEDED with their outputs; each training worker
    chose its own device; `ray job list` shows both."""
    assert head.env["RAY_AUTH_MODE"] == "token" and "Token authentication is disabled" not in head.start_log
    out = tmp_path / "out"
    prep_id, state, logs = readme_submit(head, "prepare.py", out, *TINY_DATA)
    assert state == "SUCCEEDED", logs[-5000:]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0 and list((out / "data" / "train").glob("*.parquet"))

    train_id, state, logs = readme_submit(head, "train.py", out, *TINY_DATA, *TINY_TRAIN)
    assert state == "SUCCEEDED", logs[-5000:]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["steps"] == 4
    choices = {rank: rest for rank, *rest in device_choices(logs)}
    assert sorted(choices) == [0, 1], f"each worker logs its own device choice:\n{logs[-4000:]}"
    assert all(tuple(c[:3]) == ("cpu", "cpu", "gloo") for c in choices.values()), choices  # this machine has no GPU

    listing = subprocess.run(shlex.split(readme_command("ray job list").replace(README_ADDRESS, head.dashboard_url)),
                             env=head.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    for job_id in (prep_id, train_id):
        assert re.search(rf"submission_id='{job_id}'.*?status=<JobStatus.SUCCEEDED", listing.stdout, re.S), \
            listing.stdout[-3000:]


@pytest.mark.timeout(180)
def test_bad_config_job_fails_with_the_config_error(head, tmp_path):
    _, state, logs = submit(head, "python", "jobs/train.py", "-c", QUICKSTART, "--set", f"output_dir={tmp_path}",
                            "--set", "train.lr=-1", timeout=150)
    assert state == "FAILED", logs
    assert "config error: train.lr:" in logs


@pytest.mark.timeout(120)
def test_client_without_token_mode_is_refused(head):
    """Token auth is really on: the same submit without RAY_AUTH_MODE=token in the client's env is refused."""
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.dashboard_url], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "token" in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ raylm without --address
WHICH_CLUSTER = ("import sys, ray; sys.path.insert(0, {platform!r}); from raylm.runtime import ensure_ray; "
                 "ensure_ray(sys.argv[1] if len(sys.argv) > 1 else None); "
                 "print('GCS', ray.get_runtime_context().gcs_address, flush=True); ray.shutdown()")


def which_cluster(env: dict, *address: str) -> subprocess.CompletedProcess:
    code = WHICH_CLUSTER.format(platform=str(REPO / "platform"))
    return subprocess.run([sys.executable, "-c", code, *address], env=env, capture_output=True, text=True,
                          timeout=240, cwd=REPO)


def gcs_of(proc: subprocess.CompletedProcess) -> str:
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GCS ")), None)
    assert line and proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return line.split()[1]


@pytest.mark.timeout(400)
def test_without_address_joins_running_head_and_local_forces_private(head):
    # a user's shell without the export: raylm still joins (Ray enables the token for a found local head)
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    port = head.gcs_address.rsplit(":", 1)[1]  # Ray may name 127.0.0.1 by the machine's own IP
    joined = which_cluster(env)
    assert gcs_of(joined).rsplit(":", 1)[1] == port
    assert re.search(rf"joining the local Ray cluster at \S+:{port} ", joined.stderr), joined.stderr[-2000:]
    private = which_cluster(env, "local")
    assert gcs_of(private).rsplit(":", 1)[1] != port and "joining" not in private.stderr


@pytest.mark.timeout(300)
def test_without_address_ignores_stale_current_cluster_file():
    """A head killed without `ray stop` leaves ray_current_cluster behind: raylm starts its own cluster instead of
    crashing with "num_cpus and num_gpus must not be provided"."""
    root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (root / "ray").mkdir()
        stale = f"127.0.0.1:{free_port()}"
        (root / "ray" / "ray_current_cluster").write_text(stale)
        env = {**os.environ, "RAY_TMPDIR": str(root)}
        env.pop("RAY_ADDRESS", None)
        proc = which_cluster(env)
        assert gcs_of(proc).rsplit(":", 1)[1] != stale.rsplit(":", 1)[1] and "must not be provided" not in proc.stderr
        assert "joining" not in proc.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------ a python without a dependency
@pytest.mark.timeout(120)
def test_missing_dependency_is_named_not_reported_as_unavailable(tmp_path):
    # a python where pyarrow cannot be imported (None in sys.modules is how Python spells "not installed here")
    code = ("import sys; sys.modules['pyarrow'] = None; sys.path.insert(0, 'platform'); import raylm.cli; "
            f"sys.exit(raylm.cli.main(['prepare', '-c', {QUICKSTART!r}, '--set', 'output_dir={tmp_path}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert "not yet available" not in proc.stderr
    assert "missing dependency" in proc.stderr and "pyarrow" in proc.stderr and "pip install" in proc.stderr
