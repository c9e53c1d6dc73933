"""Training throughput: raylm's Ray Train + DeepSpeed run vs a plain single-process PyTorch loop, same model/batch.

    python bench/bench_train.py                      # quickstart shape on CPU: 2 Ray workers ZeRO-2 vs plain loop
    python bench/bench_train.py --no-ray --gpu --shape gpt2-124m --precision bf16   # DeepSpeed engine alone, GPU

Prints tokens/s of each and the ratio raylm / plain. Synthetic shards in the data/ contract format (uniform random
tokens: throughput only). With --no-ray the per-worker loop (`raylm.train.loop.fit`) runs at world size 1 without
Ray, which is how it runs on a GPU machine that has no Ray installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

SHAPES = {  # (n_layer, d_model, n_head, vocab, block, batch)
    "quickstart": (2, 128, 4, 8000, 128, 8),
    "gpt2-124m": (12, 768, 12, 50257, 1024, 16),
}
PEAK_FLOPS = {"cuda": 989e12, "cpu": 157e9}  # H100 SXM dense bf16; this 2-core CPU's fp32 peak (STACK-NOTES)


def make_workspace(root: Path, vocab: int, block: int, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("val", 32)):
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        ids = rng.integers(0, vocab, size=(n, block), dtype=np.int32)
        pq.write_table(pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}),
                       root / "data" / split / "part-00000.parquet")
    (root / "data" / "tokenizer").mkdir(exist_ok=True)
    special = {"pad_token_id": 1, "eos_token_id": 0, "bos_token_id": 0}
    (root / "data" / "manifest.json").write_text(json.dumps({
        "task": "causal_lm", "block_size": block, "vocab_size": vocab, "special_tokens": special, "label_map": None,
        "splits": {"train": {"rows": rows}, "val": {"rows": 32}}}))


def config(root: Path, args, workers: int):
    from raylm.config import load_config

    n_layer, d, heads, vocab, block, batch = SHAPES[args.shape]
    return load_config(None, [
        f"output_dir={root}", f"model.arch={{family: gpt2, n_layer: {n_layer}, d_model: {d}, n_head: {heads}}}",
        f"data.block_size={block}", f"train.batch_size={batch}", f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "train.eval_batches=1",
        f"train.num_workers={workers}", "train.deepspeed.zero_stage=2", f"train.precision={args.precision}",
        f"train.use_gpu={str(args.gpu).lower()}", "train.warmup_steps=2", f"train.log_every={max(1, args.steps // 4)}",
        "train.early_stopping=null"])


def plain_loop(cfg, manifest, steps: int, device: str) -> float:
    """The baseline: the same HF model, AdamW, one process, no DeepSpeed, no Ray."""
    from raylm.train.models import build_model

    model = build_model(cfg, manifest).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    b, block, vocab = cfg.train.batch_size, manifest["block_size"], manifest["vocab_size"]
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    ids = torch.randint(0, vocab, (b, block), device=device)
    model.train()
    for i in range(steps + 3):
        if i == 3:  # warm-up steps excluded
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return steps * b * block / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_alone(cfg, manifest, root: Path) -> float:
    """raylm's per-worker loop at world size 1, without Ray (DeepSpeed engine, same batches)."""
    import pyarrow.parquet as pq

    from raylm.train.loop import Hooks, fit

    os.environ.update({k: os.environ.get(k, v) for k, v in
                       {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29533"}.items()})
    rows = pq.read_table(root / "data" / "train").column("input_ids").to_pylist()
    b = cfg.train.batch_size

    def epoch(_):
        for i in range(0, len(rows) - b + 1, b):
            yield {"input_ids": torch.tensor(rows[i:i + b])}

    state = fit(cfg, manifest, epoch, lambda: epoch(0), Hooks(report=lambda m, c: None))
    steady = [h["tokens_per_s"] for h in state["history"][1:]] or [state["history"][-1]["tokens_per_s"]]
    return float(np.median(steady))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="quickstart")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--no-ray", action="store_true", help="drive the DeepSpeed loop directly at world size 1")
    args = p.parse_args()
    device = "cuda" if args.gpu else "cpu"
    n_layer, d, heads, vocab, block, batch = SHAPES[args.shape]
    workers = 1 if args.no_ray else args.workers
    with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
        root = Path(tmp)
        make_workspace(root, vocab, block, rows=batch * workers * (args.steps + 2))
        cfg = config(root, args, workers)
        manifest = json.loads((root / "data" / "manifest.json").read_text())
        if args.no_ray:
            raylm_tps = engine_alone(cfg, manifest, root)
            label = "DeepSpeed ZeRO-2 engine, 1 process"
        else:
            from raylm.runtime import ensure_ray
            from raylm.train import train

            ensure_ray()
            summary = train(cfg)
            steady = [h["tokens_per_s"] for h in summary["history"][1:]] or [summary["tokens_per_s"]]
            raylm_tps = float(np.median(steady))  # log windows after the first (start-up), evaluation excluded
            label = f"Ray Train {workers} workers + DeepSpeed ZeRO-2"
        plain_tps = plain_loop(cfg, manifest, min(args.steps, 20), device)
    n_params = 12 * n_layer * d * d + vocab * d
    print(f"shape {args.shape} ({n_params / 1e6:.1f} M params, batch {batch} x {block}, {args.precision}, {device})")
    print(f"raylm ({label}): {raylm_tps:,.0f} tokens/s  MFU {6 * n_params * raylm_tps / PEAK_FLOPS[device]:.1%}")
    print(f"plain PyTorch loop, 1 process:   {plain_tps:,.0f} tokens/s  MFU {6 * n_params * plain_tps / PEAK_FLOPS[device]:.1%}")
    print(f"ratio raylm / plain: {raylm_tps / plain_tps:.2f}")


if __name__ == "__main__":
    main()
