"""train-cpu: raylm's training step under Ray Train + DeepSpeed vs a plain PyTorch loop (and the HF Trainer).

    python bench/bench_train_cpu.py                                   # full matrix: 1x2 and 2x1 workers x threads, ZeRO 0-3
    python bench/bench_train_cpu.py --configs 2x1-z0,2x1-z2 --steps 60 --rounds 4    # a cut matrix

Same work on every arm: the same HF GPT-2 (raylm's `build_model`, same seed), AdamW (betas 0.9/0.95, the same
decay groups), cosine schedule with warm-up, grad-norm clip 1.0, the same global batch and the same thread budget
(the plain arms get as many threads as raylm's workers hold in total). Data: synthetic Parquet shards in the
`data/` contract format (uniform random tokens: throughput only; each arm sees the same rows).

Steady state is measured inside each run: tokens/s over the log windows after the first (raylm's own per-window
`tokens_per_s` in its history; the plain arms time the same windows), so Ray Train start-up, DeepSpeed engine
build, evaluation and checkpointing are excluded there and reported as start-up and end-to-end wall instead.
Correctness first: each arm's first-window mean loss must match the plain loop's within --loss-tol.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result, finish, interleave, matmul_peak, private_ray, ratios, spread  # noqa: E402

SHAPES = {  # n_layer, d_model, n_head, vocab, block, global batch
    "small": (2, 128, 4, 8000, 128, 16),
    "quickstart": (4, 256, 4, 8000, 256, 16),
}
ALL_CONFIGS = [f"{w}-z{z}" for w in ("1x2", "2x1") for z in (0, 1, 2, 3)]
TARGETS = {0: 0.90, 1: 0.90, 2: 0.80, 3: 0.80}
THREADS = 2  # the thread budget every arm gets (workers x threads per worker)


def make_workspace(root: Path, vocab: int, block: int, rows: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("val", 32)):
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        ids = rng.integers(0, vocab, size=(n, block), dtype=np.int32)
        pq.write_table(pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}),
                       root / "data" / split / "part-00000.parquet")
    (root / "data" / "tokenizer").mkdir(exist_ok=True)
    manifest = {"task": "causal_lm", "block_size": block, "vocab_size": vocab, "label_map": None,
                "special_tokens": {"pad_token_id": 1, "eos_token_id": 0, "bos_token_id": 0},
                "splits": {"train": {"rows": rows}, "val": {"rows": 32}}}
    (root / "data" / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def make_cfg(root: Path, shape: str, steps: int, log_every: int, workers: int = 1, zero: int = 0):
    from raylm.config import load_config

    n_layer, d, heads, vocab, block, batch = SHAPES[shape]
    return load_config(None, [
        f"output_dir={root}", f"model.arch={{family: gpt2, n_layer: {n_layer}, d_model: {d}, n_head: {heads}}}",
        "model.dropout=0.0", f"data.block_size={block}", f"train.batch_size={batch // workers}",
        f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        "train.eval_batches=1", f"train.num_workers={workers}", f"train.cpus_per_worker={THREADS // workers}",
        f"train.deepspeed.zero_stage={zero}", "train.precision=fp32", "train.warmup_steps=5",
        f"train.log_every={log_every}", "train.early_stopping=null", "train.max_failures=0"])


def window_stats(stamps: list[float], tokens_per_step: int, log_every: int, losses: list[float]) -> dict:
    """Per-window tokens/s from per-step end times (stamps[0] = loop start), as raylm's history computes it."""
    windows = []
    for s in range(log_every, len(stamps), log_every):
        windows.append(log_every * tokens_per_step / (stamps[s] - stamps[s - log_every]))
    return {"steady_tok_s": statistics.median(windows[1:] or windows), "windows": windows,
            "first_loss": float(np.mean(losses[:log_every]))}


def plain_arm(cfg, manifest, rows: np.ndarray, log_every: int):
    """A plain single-process loop: the same model, optimizer, schedule, clip and global batch; THREADS threads."""
    import torch
    from transformers import get_scheduler

    from raylm.train.loop import param_groups
    from raylm.train.models import build_model

    def run() -> dict:
        torch.set_num_threads(THREADS)
        t0 = time.perf_counter()
        t = cfg.train
        model = build_model(cfg, manifest)
        opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
        sched = get_scheduler("cosine", opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
        gb = t.batch_size * t.num_workers
        model.train()
        stamps, losses = [time.perf_counter()], []
        for step in range(t.max_steps):
            ids = torch.from_numpy(rows[step * gb:(step + 1) * gb]).long()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            stamps.append(time.perf_counter())
        out = window_stats(stamps, gb * manifest["block_size"], log_every, losses)
        out.update(e2e_s=time.perf_counter() - t0, startup_s=stamps[0] - t0)
        return out

    return run


def hf_trainer_arm(cfg, manifest, rows: np.ndarray, log_every: int, out_dir: Path):
    """The HF Trainer on the same model, batch, schedule and threads (no DeepSpeed)."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from raylm.train.models import build_model

    class Stamps(TrainerCallback):
        def __init__(self):
            self.stamps, self.losses = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            ids = torch.from_numpy(rows[i]).long()
            return {"input_ids": ids, "labels": ids}

    def run() -> dict:
        torch.set_num_threads(THREADS)
        t0 = time.perf_counter()
        t = cfg.train
        gb = t.batch_size * t.num_workers
        args = TrainingArguments(
            output_dir=str(out_dir), per_device_train_batch_size=gb, max_steps=t.max_steps, learning_rate=t.lr,
            weight_decay=t.weight_decay, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
            lr_scheduler_type="cosine", warmup_steps=t.warmup_steps, max_grad_norm=t.clip_grad_norm,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True, seed=cfg.seed, data_seed=cfg.seed)
        stamps = Stamps()
        trainer = Trainer(model=build_model(cfg, manifest), args=args, train_dataset=Rows(), callbacks=[stamps])
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 keeps every loss; no need to print each
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out = window_stats(stamps.stamps, gb * manifest["block_size"], log_every, losses)
        out.update(e2e_s=time.perf_counter() - t0, startup_s=stamps.stamps[0] - t0)
        return out

    return run


def raylm_arm(cfg, manifest):
    """raylm's TorchTrainer (Ray Train + DeepSpeed) as `raylm train` builds it; figures from its own history."""
    from raylm.train import make_trainer
    from raylm.train.loop import STATE_FILE

    def run() -> dict:
        t0 = time.perf_counter()
        result = make_trainer(cfg, manifest=manifest, name=f"bench-{time.time_ns()}").fit()
        wall = time.perf_counter() - t0
        if result.error is not None:
            raise RuntimeError(f"raylm training failed: {result.error}")
        with result.checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
        windows = [h["tokens_per_s"] for h in state["history"]]
        return {"steady_tok_s": statistics.median(windows[1:] or windows), "windows": windows,
                "first_loss": state["history"][0]["train_loss"], "e2e_s": wall,
                "startup_s": wall - state["train_time_s"]}

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(ALL_CONFIGS), help="WORKERSxTHREADS-zSTAGE, comma-separated")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--steps", type=int, default=200, help="steps per run (the end-to-end wall is of this run)")
    ap.add_argument("--log-every", type=int, default=10, help="window length; the first window is start-up")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-hf", action="store_true", help="leave out the HF Trainer arm")
    ap.add_argument("--loss-tol", type=float, default=0.02, help="relative tolerance on the first-window loss")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in ALL_CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(ALL_CONFIGS)}")

    n_layer, d, heads, vocab, block, gb = SHAPES[args.shape]
    res = Result("train-cpu", "", None, None, "", "")
    peak = matmul_peak(THREADS)
    with tempfile.TemporaryDirectory(prefix="raylm-bench-train-") as tmp:
        root = Path(tmp)
        manifest = make_workspace(root, vocab, block, rows=gb * (args.steps + 2))
        rows = np.stack(np.asarray(__import__("pyarrow.parquet").parquet.read_table(
            root / "data" / "train").column("input_ids").to_pylist(), dtype=np.int32))
        base_cfg = make_cfg(root, args.shape, args.steps, args.log_every)
        arms = {"plain": plain_arm(base_cfg, manifest, rows, args.log_every)}
        if not args.no_hf:
            arms["hf-trainer"] = hf_trainer_arm(base_cfg, manifest, rows, args.log_every, root / "hf")
        t0 = time.perf_counter()
        private_ray()
        ray_init_s = time.perf_counter() - t0
        for c in configs:
            w = int(c.split("x")[0])
            z = int(c.split("-z")[1])
            arms[c] = raylm_arm(make_cfg(root / c, args.shape, args.steps, args.log_every, w, z), manifest)
            (root / c).mkdir()
            (root / c / "data").symlink_to(root / "data")
        print(f"train-cpu: shape {args.shape} (global batch {gb} x {block}), {args.steps} steps/run, "
              f"{args.rounds} rounds, arms {', '.join(arms)}; ray.init {ray_init_s:.1f}s; matmul peak "
              f"{peak / 1e9:.0f} GFLOP/s on {THREADS} threads", flush=True)
        runs = interleave(arms, args.rounds)

    from raylm.train.models import build_model

    n_params = sum(p.numel() for p in build_model(base_cfg, manifest).parameters())
    flop_per_token = 6 * n_params + 6 * n_layer * block * d  # nanoGPT's estimate incl. attention
    plain = [r["steady_tok_s"] for r in runs["plain"]]
    base_loss = statistics.median(r["first_loss"] for r in runs["plain"])
    per_arm, lines, verdicts = {}, [], []
    for name, rs in runs.items():
        tok = [r["steady_tok_s"] for r in rs]
        rat = ratios(plain, tok)
        loss = statistics.median(r["first_loss"] for r in rs)
        loss_ok = abs(loss - base_loss) <= args.loss_tol * base_loss
        per_arm[name] = {"steady_tok_s": spread(tok), "ratio_vs_plain": spread(rat), "per_round_ratio": rat,
                         "e2e_s": spread([r["e2e_s"] for r in rs]), "startup_s": spread([r["startup_s"] for r in rs]),
                         "first_window_loss": loss, "loss_matches_plain": loss_ok,
                         "mfu": statistics.median(tok) * flop_per_token / peak, "runs": rs}
        if name == "plain":
            continue
        target = TARGETS[int(name.split("-z")[1])] if name in ALL_CONFIGS else None
        med = statistics.median(rat)
        ok = loss_ok and (target is None or med >= target)
        e2e = statistics.median(r["e2e_s"] for r in rs)
        lines.append(f"train-cpu[{name}]: ratio {med:.2f} (target {'>=%.2f' % target if target else 'none'}) "
                     f"{'PASS' if ok else 'MISS'}  A={statistics.median(plain):,.0f} tok/s "
                     f"B={statistics.median(tok):,.0f} tok/s  spread ±{spread(rat)['spread_pct']:.0f}%  "
                     f"e2e {e2e:.0f}s vs {statistics.median(r['e2e_s'] for r in runs['plain']):.0f}s "
                     f"({args.steps} steps)  start-up {statistics.median(r['startup_s'] for r in rs):.1f}s  "
                     f"loss {loss:.3f} vs {base_loss:.3f}{'' if loss_ok else ' MISMATCH'}")
        if target is not None:
            verdicts.append((med / target, med, target, name, ok, statistics.median(tok)))
    worst = min(verdicts)
    res.ratio, res.target = worst[1], f">={worst[2]:.2f} worst of {len(verdicts)}: {worst[3]}"
    res.passed = all(v[4] for v in verdicts)
    res.a, res.b = f"{statistics.median(plain):,.0f}tok/s", f"{worst[5]:,.0f}tok/s"
    res.details = {"shape": args.shape, "steps": args.steps, "rounds": args.rounds, "global_batch": gb,
                   "block": block, "threads": THREADS, "n_params": n_params, "matmul_peak_flops": peak,
                   "ray_init_s": ray_init_s, "arms": per_arm}
    finish(res, lines)


if __name__ == "__main__":
    main()
