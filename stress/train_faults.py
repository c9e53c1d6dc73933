"""Promise 1, training survives dead workers: a 2-worker DeepSpeed run (max_failures 2) whose worker processes are
SIGKILLed twice, each at a random moment after a checkpoint; the run must finish, each resume must start from the
newest intact checkpoint at the moment of the kill (its step is `resumed_from`), and the final val loss must be
within 2% of an uninterrupted run with the same seed. Prints failures injected/survived, resume steps, losses.

    .venv/bin/python stress/train_faults.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import start_ray

SETTINGS = ["model.arch={family: gpt2, n_layer: 2, d_model: 64, n_head: 2}", "data.block_size=32",
            "train.num_workers=2", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
            "train.eval_every=10", "train.checkpoint_every=10", "train.log_every=5", "train.eval_batches=2",
            "train.deepspeed.zero_stage=2", "train.early_stopping=null", "train.keep_checkpoints=3", "seed=0"]
SAFE_AFTER_REPORT_S = 4  # Ray Train polls reports about every 2 s: a kill sooner can lose the newest checkpoint


def intact_checkpoints(run_root: Path) -> list[tuple[int, float]]:
    """(step, mtime) of every intact checkpoint under the run's storage."""
    from raylm.checkpoints import checkpoint_step, is_intact

    out = []
    for d in run_root.glob("*/checkpoint_*"):
        step = checkpoint_step(d, "raylm_state.json")
        if step is not None and is_intact(d):
            out.append((step, max(p.stat().st_mtime for p in d.rglob("*") if p.is_file())))
    return sorted(out)


def worker_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if a.class_name and "RayTrainWorker" in a.class_name and a.pid]


def killer(run_root: Path, kills: int, expected: list[int], done: threading.Event, rng: random.Random) -> None:
    """Kill one worker `kills` times: each time after a checkpoint newer than the last resume point exists."""
    last = 0
    while kills and not done.is_set():
        ckpts = [c for c in intact_checkpoints(run_root) if c[0] > last]
        if not ckpts or time.time() - ckpts[-1][1] < SAFE_AFTER_REPORT_S:
            time.sleep(0.5)
            continue
        time.sleep(rng.uniform(0, 3))
        newest = intact_checkpoints(run_root)[-1][0]
        pids = worker_pids()
        if len(pids) < 2:
            time.sleep(0.5)
            continue
        victim = rng.choice(pids)
        print(f"[stress] SIGKILL worker pid {victim}; newest intact checkpoint: step {newest}", flush=True)
        os.kill(victim, signal.SIGKILL)
        expected.append(newest)
        last, kills = newest, kills - 1
        time.sleep(SAFE_AFTER_REPORT_S)


def main() -> int:
    from tiny_data import build_lm_workspace

    from raylm.config import load_config
    from raylm.train import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kills", type=int, default=2)
    args = ap.parse_args()
    start_ray()
    rng = random.Random(14)
    root = Path(tempfile.mkdtemp(prefix="raylm-stress-train-"))
    ref_root = build_lm_workspace(root / "reference")
    reference = train(load_config(None, [f"output_dir={ref_root}", *SETTINGS, f"train.max_steps={args.steps}",
                                         "train.max_failures=0"]))
    fault_root = build_lm_workspace(root / "faults")
    cfg = load_config(None, [f"output_dir={fault_root}", *SETTINGS, f"train.max_steps={args.steps}",
                             f"train.max_failures={args.kills}"])
    expected: list[int] = []
    done = threading.Event()
    thread = threading.Thread(target=killer, args=(cfg.path("train"), args.kills, expected, done, rng), daemon=True)
    thread.start()
    try:
        summary = train(cfg)
    finally:
        done.set()
    ref_loss, loss = reference["evals"][-1]["val_loss"], summary["evals"][-1]["val_loss"]
    drift = abs(loss - ref_loss) / ref_loss
    print(f"train faults: {len(expected)} workers killed, {len(summary['resumed_from'])} resumes survived; "
          f"resumed from steps {summary['resumed_from']} (newest intact checkpoints at the kills: {expected}); "
          f"finished {summary['steps']}/{args.steps} steps; val loss {loss:.4f} vs uninterrupted {ref_loss:.4f} "
          f"({drift:.2%})")
    print(json.dumps({"resumed_from": summary["resumed_from"], "expected": expected, "drift": drift}))
    ok = (len(expected) == args.kills and summary["resumed_from"] == expected and summary["steps"] == args.steps
          and drift <= 0.02)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
