"""Interleaved A/B of the trainer's Parquet reader on one 30-step, 2-worker ZeRO-2 fit of a tiny GPT-2 (start-up
dominated, as most short runs and every test fit): A = Ray 2.60's default reader (DataSourceV2, FooterReader
actors), B = the file-based reader raylm.storage.read_parquet uses. Same config and data, a fresh output dir per
fit, rounds of A B B A (the first A also pays the one-time DeepSpeed shm op build). Prints one AB line per fit
and a RESULT line. Not part of `make bench`.

    .venv/bin/python bench/ab_train_reader.py [ROUNDS]
"""
import json, sys, tempfile, time, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests")); sys.path.insert(0, str(ROOT / "platform"))
import ray, ray.data
from raylm.runtime import ensure_ray
from raylm.config import load_config
import raylm.storage as storage
import raylm.train as rtrain
from tiny_data import build_lm_workspace

SETTINGS = ["model.arch={family: gpt2, n_layer: 2, d_model: 64, n_head: 2}", "data.block_size=32",
            "train.num_workers=2", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
            "train.max_steps=30", "train.eval_every=10", "train.checkpoint_every=10", "train.log_every=5",
            "train.eval_batches=2", "train.deepspeed.zero_stage=2", "seed=0"]
file_based = storage.read_parquet

def default_reader(path, columns=None, shuffle=None):
    fs, in_fs = storage.resolve(path)
    return ray.data.read_parquet(in_fs, filesystem=fs, columns=columns, shuffle=shuffle)

ensure_ray("local")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
res = {"A": [], "B": []}
for r in range(rounds):
    for arm in ("A", "B", "B", "A"):
        storage.read_parquet = default_reader if arm == "A" else file_based
        root = build_lm_workspace(Path(tempfile.mkdtemp(prefix=f"ab{arm}")))
        cfg = load_config(None, [f"output_dir={root}", *SETTINGS])
        t = time.perf_counter()
        s = rtrain.train(cfg)
        wall = time.perf_counter() - t
        res[arm].append({"train_wall_s": wall, "fit_loop_s": s["wall_time_s"], "val_loss": s["evals"][-1]["val_loss"]})
        print("AB", r, arm, json.dumps(res[arm][-1]), flush=True)
med = {a: statistics.median(x["train_wall_s"] for x in v) for a, v in res.items()}
pairs = [b["train_wall_s"] / a["train_wall_s"] for a, b in zip(res["A"], res["B"])]
print("RESULT", json.dumps({"median_train_wall_s": med, "per_pair_ratio_B_over_A": pairs,
                             "median_ratio": statistics.median(pairs), "runs": res}), flush=True)
