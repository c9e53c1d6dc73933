"""`ray job submit --working-dir . -- python jobs/<verb>.py` against a real `ray start --head` of the test's own:
the package reaches workers without an install, prepare and train succeed with outputs, a bad config FAILS."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from ray_head import PrivateHead

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "configs/quickstart.yaml"
# tiny: a few dozen documents, a small vocab, a 1-layer model, a handful of steps
TINY_DATA = ["--set", "data.sources=[{builtin: python-docs, max_docs: 60}]", "--set", "data.tokenizer.train.vocab_size=300",
             "--set", "data.block_size=32"]
TINY_TRAIN = ["--set", "model.arch={family: gpt2, n_layer: 1, d_model: 32, n_head: 2}", "--set", "train.max_steps=4",
              "--set", "train.batch_size=2", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
              "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1", "--set", "train.log_every=1"]

# run inside a job: where the driver and a remote worker import raylm from
PROBE = ("import sys; sys.path.insert(0, 'platform'); from raylm.runtime import ensure_ray; ensure_ray(); "
         "import ray, raylm; f = ray.remote(lambda: __import__('raylm').__file__); "
         "print('RAYLM_AT', raylm.__file__, ray.get(f.remote()))")


@pytest.fixture(scope="module")
def head():
    with PrivateHead(num_cpus=4) as h:
        yield h


def submit(head: PrivateHead, *entrypoint: str, timeout: float = 420) -> tuple[str, str, str]:
    """`ray job submit` as a user would (blocking, working dir = the checkout); returns (id, status, logs)."""
    job_id = f"raylm-test-{uuid.uuid4().hex[:8]}"
    proc = head.ray("job", "submit", "--address", head.dashboard_url, "--submission-id", job_id,
                    "--working-dir", str(REPO), "--", *entrypoint, timeout=timeout)
    status = head.ray("job", "status", "--address", head.dashboard_url, job_id, timeout=60)
    # the CLI logs its answer ("Status for job '...': SUCCEEDED") to stderr, with terminal colours
    status = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    logs = head.ray("job", "logs", "--address", head.dashboard_url, job_id, timeout=60).stdout
    assert job_id in status, proc.stderr[-3000:]
    # terminal states read "Job 'ID' succeeded" / "failed" / "was stopped"; others "Status for job 'ID': RUNNING"
    m = re.search(r"Job '[^']+' (succeeded|failed|was stopped)|Status for job '[^']+': (?:JobStatus\.)?([A-Z]+)", status)
    state = ({"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}.get(m.group(1)) or m.group(2)
             if m else "UNKNOWN")
    return job_id, state, logs + proc.stderr[-3000:]


@pytest.mark.timeout(300)  # includes starting the head
def test_job_ships_raylm_to_workers_without_install(head):
    _, state, logs = submit(head, "python", "-c", PROBE, timeout=240)
    assert state == "SUCCEEDED", logs
    driver_file, worker_file = next(ln for ln in logs.splitlines() if ln.startswith("RAYLM_AT")).split()[1:]
    assert "working_dir_files" in driver_file, "the driver imports the uploaded checkout (--working-dir .)"
    assert "py_modules_files" in worker_file, "workers import raylm from the job's py_modules, not a local install"


@pytest.mark.timeout(600)
def test_prepare_then_train_jobs_succeed(head, tmp_path):
    out = tmp_path / "out"
    _, state, logs = submit(head, "python", "jobs/prepare.py", "-c", QUICKSTART, "--set", f"output_dir={out}",
                            *TINY_DATA)
    assert state == "SUCCEEDED", logs[-5000:]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0 and list((out / "data" / "train").glob("*.parquet"))

    _, state, logs = submit(head, "python", "jobs/train.py", "-c", QUICKSTART, "--set", f"output_dir={out}",
                            *TINY_DATA, *TINY_TRAIN)
    assert state == "SUCCEEDED", logs[-5000:]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["steps"] == 4


@pytest.mark.timeout(180)
def test_bad_config_job_fails_with_the_config_error(head, tmp_path):
    _, state, logs = submit(head, "python", "jobs/train.py", "-c", QUICKSTART, "--set", f"output_dir={tmp_path}",
                            "--set", "train.lr=-1", timeout=150)
    assert state == "FAILED", logs
    assert "config error: train.lr:" in logs
