"""Issue 14 promise 2, a killed driver resumes: SIGKILL `raylm train` after its first checkpoint and `raylm tune`
after its first finished trial (each with its private cluster: the whole process group, as a lost terminal or
machine), then run the same command again. Prints per verb what was there at the kill and what the rerun did;
exit 1 when a rerun fails, starts over, or reruns a finished trial.

    .venv/bin/python stress/driver_kill.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
RAYLM = [sys.executable, "-m", "raylm"]

TRAIN = """\
name: killdrv
output_dir: {out}
seed: 0
data: {{block_size: 32}}
model: {{task: causal_lm, arch: {{family: gpt2, n_layer: 1, d_model: 32, n_head: 2}}}}
train: {{num_workers: 2, max_steps: 80, eval_every: 10, checkpoint_every: 10, batch_size: 8, warmup_steps: 2,
        log_every: 10, eval_batches: 2, deepspeed: {{zero_stage: 1}}}}
"""


def start(verb: str, cfg: Path, log: Path) -> subprocess.Popen:
    """`raylm <verb>` with a private cluster, in its own process group (the kill takes the cluster too)."""
    return subprocess.Popen([*RAYLM, verb, "-c", str(cfg), "--address", "local"], cwd=REPO, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"})


def kill_when(proc: subprocess.Popen, ready, limit: float = 600) -> float:
    """SIGKILL the process group once `ready()`; returns the seconds it ran."""
    t0 = time.time()
    while not ready() and proc.poll() is None and time.time() - t0 < limit:
        time.sleep(1)
    if proc.poll() is not None or not ready():
        raise RuntimeError(f"the run ended or stalled before the kill point (rc {proc.poll()})")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.time() - t0


def rerun(verb: str, cfg: Path, log: Path) -> int:
    proc = start(verb, cfg, log)
    return proc.wait(timeout=1500)


def train_case(out: Path) -> bool:
    from tiny_data import build_lm_workspace

    build_lm_workspace(out)
    cfg = out / "train.yaml"
    cfg.write_text(TRAIN.format(out=out))
    ckpts = lambda: sorted(out.glob("train/*/checkpoint_*/raylm_state.json"))  # noqa: E731 - complete ones
    ran = kill_when(start("train", cfg, out / "first.log"), lambda: len(ckpts()) >= 1)
    at_kill = len(ckpts())
    rc = rerun("train", cfg, out / "second.log")
    text = (out / "second.log").read_text(errors="replace")
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", text)]
    summary = json.loads((out / "model" / "training_summary.json").read_text()) if rc == 0 else {}
    rc3 = rerun("train", cfg, out / "third.log")
    again = "already finished" in (out / "third.log").read_text(errors="replace")
    ok = rc == 0 and bool(resumed) and resumed[0] >= 10 and summary.get("steps") == 80 and rc3 == 0 and again
    print(json.dumps({"verb": "train", "killed_after_s": round(ran), "checkpoints_at_kill": at_kill, "rerun_rc": rc,
                      "resumed_from": resumed[:1], "final_step": summary.get("steps"), "third_run_rc": rc3,
                      "third_run_says_finished": again, "ok": ok}), flush=True)
    return ok


def tune_case(out: Path) -> bool:
    from test_tune import TINY_TUNE, completed_trials
    from tiny_data import build_lm_workspace

    build_lm_workspace(out)
    cfg = out / "tune.yaml"
    cfg.write_text(TINY_TUNE.format(out=out))
    ran = kill_when(start("tune", cfg, out / "first.log"), lambda: bool(completed_trials(out / "tune")))
    before = completed_trials(out / "tune")
    rc = rerun("tune", cfg, out / "second.log")
    text = (out / "second.log").read_text(errors="replace")
    after = completed_trials(out / "tune")
    untouched = {k: after.get(k) for k in before} == before
    best_path = out / "tune" / "best.json"
    trials = json.loads(best_path.read_text())["trials"] if best_path.exists() else []
    ok = (rc == 0 and "resuming the experiment" in text and untouched and len(trials) == 4
          and (out / "model" / "model.safetensors").is_file())
    print(json.dumps({"verb": "tune", "killed_after_s": round(ran), "trials_done_at_kill": len(before),
                      "rerun_rc": rc, "resumed_experiment": "resuming the experiment" in text,
                      "finished_trials_untouched": untouched, "trials": len(trials),
                      "statuses": [t["status"] for t in trials], "ok": ok}), flush=True)
    return ok


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="raylm-driver-kill-"))
    ok = True
    for name, case in (("train", train_case), ("tune", tune_case)):
        (root / name).mkdir()
        try:
            ok = case(root / name) and ok
        except Exception as e:  # noqa: BLE001 - report and go on to the next case
            print(json.dumps({"verb": name, "error": repr(e)}), flush=True)
            ok = False
    print(f"logs: {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
