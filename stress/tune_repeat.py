"""Issue 12, tune never hangs: N consecutive 4-trial ASHA searches (tests/test_tune.py's TINY_TUNE) against one
local cluster. Prints per run: exit code, wall time, trials and their statuses, the most Train worker groups alive
at once, and worker groups left after it; exit 1 when a run fails or leaves a worker group behind.

    .venv/bin/python stress/tune_repeat.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import ray
    from test_tune import TINY_TUNE, PlacementGroupWatch
    from tiny_data import build_lm_workspace

    from raylm.runtime import ensure_ray

    ensure_ray("local")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the CLI joins this cluster
    root = Path(tempfile.mkdtemp(prefix="raylm-tune-repeat-"))
    ok = True
    for i in range(args.runs):
        out = root / f"run{i}"
        out.mkdir()
        build_lm_workspace(out)
        (out / "tune.yaml").write_text(TINY_TUNE.format(out=out).replace("seed: 3", f"seed: {10 + i}"))
        watch = PlacementGroupWatch(ray)
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "raylm", "tune", "-c", str(out / "tune.yaml")], env=env,
                              capture_output=True, text=True, timeout=1200, cwd=REPO)
        most = watch.close()
        time.sleep(3)
        left = watch.live()
        best_path = out / "tune" / "best.json"
        trials = json.loads(best_path.read_text())["trials"] if best_path.exists() else []
        print(json.dumps({"run": i + 1, "rc": proc.returncode, "wall_s": round(time.time() - start),
                          "trials": len(trials), "statuses": [t["status"] for t in trials],
                          "most_worker_groups": most, "worker_groups_left": left}), flush=True)
        if proc.returncode or left or len(trials) != 4:
            print(proc.stderr[-3000:], file=sys.stderr)
            ok = False
            break
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
