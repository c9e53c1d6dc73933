"""train-gpu: raylm's training step (DeepSpeed engine, ZeRO-2, bf16, compile) vs plain PyTorch on the same GPU.

    python bench/bench_train_gpu.py                  # on a machine with one CUDA GPU; no Ray needed
    python bench/bench_train_gpu.py --steps 30 --rounds 4 --no-compile

GPT-2-124M shape (12 layers, d 768, 12 heads, vocab 50304, T 1024), batch 16 x 1024, bf16.
A: plain PyTorch: the HF GPT-2 (SDPA attention), bf16 autocast, fused AdamW, `torch.compile`.
B: raylm's per-worker loop `raylm.train.loop.fit` at world size 1 without Ray (the DeepSpeed engine called
directly, ZeRO-2, bf16, `train.compile`), on the same synthetic rows (uniform random tokens: throughput only).
Steady state: tokens/s over the log windows after the first (compile and engine build are start-up, reported
apart). MFU against the H100 dense bf16 peak (989 TFLOP/s) and against a measured bf16 matmul probe.
Without a CUDA device it prints `train-gpu: skipped (no CUDA device)` and exits 0.

On the GPU machine (no Ray, no deepspeed there): carry wheels built here with `DS_BUILD_OPS=0 pip wheel --no-deps
deepspeed` plus hjson and pydantic(-core), annotated-types, typing-inspection for its Python (STACK-NOTES).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result, finish, interleave, ratios, spread  # noqa: E402

SHAPE = {"n_layer": 12, "d": 768, "heads": 12, "vocab": 50304, "block": 1024, "batch": 16}
H100_BF16_PEAK = 989e12
TARGET_RATIO, TARGET_MFU = 1.0, 0.45


def bf16_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t)


def make_cfg(root: Path, steps: int, log_every: int, compile_: bool):
    from raylm.config import load_config

    s = SHAPE
    overrides = [
        f"output_dir={root}", f"model.arch={{family: gpt2, n_layer: {s['n_layer']}, d_model: {s['d']}, n_head: {s['heads']}}}",
        "model.dropout=0.0", f"data.block_size={s['block']}", f"train.batch_size={s['batch']}", "train.num_workers=1",
        "train.use_gpu=true", f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        "train.eval_batches=1", "train.deepspeed.zero_stage=2", "train.precision=bf16", "train.warmup_steps=2",
        f"train.log_every={log_every}", "train.early_stopping=null"]
    from raylm.config import TrainCfg

    if "compile" in TrainCfg.model_fields:
        overrides.append(f"train.compile={str(compile_).lower()}")
    return load_config(None, overrides)


def manifest() -> dict:
    return {"task": "causal_lm", "block_size": SHAPE["block"], "vocab_size": SHAPE["vocab"], "label_map": None,
            "special_tokens": {"pad_token_id": 1, "eos_token_id": 0, "bos_token_id": 0},
            "splits": {"train": {"rows": 0}, "val": {"rows": 16}}}


def plain_arm(cfg, rows, log_every: int, compile_: bool):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    s = SHAPE

    def run() -> dict:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=s["vocab"], n_positions=s["block"], n_embd=s["d"],
                                           n_layer=s["n_layer"], n_head=s["heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0), attn_implementation="sdpa").cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), fused=True)
        step_model = torch.compile(model) if compile_ else model
        stamps, losses = [], []
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        for i in range(cfg.train.max_steps):
            ids = rows[i % len(rows)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (i + 1) % log_every == 0:  # one host sync per window, like raylm's log windows
                losses.append(float(loss))
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
        tok = log_every * s["batch"] * s["block"]
        windows = [tok / (b - a) for a, b in zip(stamps, stamps[1:])]
        return {"steady_tok_s": statistics.median(windows[1:] or windows), "windows": windows,
                "first_loss": losses[0], "e2e_s": time.perf_counter() - t0}

    return run


def raylm_arm(cfg, rows):
    import torch

    from raylm.train.loop import fit_in_process

    def run() -> dict:
        t0 = time.perf_counter()
        state = fit_in_process(cfg, manifest(), rows, port=29533)
        torch.cuda.synchronize()
        windows = [h["tokens_per_s"] for h in state["history"]]
        return {"steady_tok_s": statistics.median(windows[1:] or windows), "windows": windows,
                "first_loss": state["history"][0]["train_loss"], "e2e_s": time.perf_counter() - t0}

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("train-gpu: skipped (no CUDA device)", flush=True)
        return
    s = SHAPE
    res = Result("train-gpu", f">={TARGET_RATIO} and MFU >={TARGET_MFU:.0%}", None, None, "", "")
    g = torch.Generator().manual_seed(0)
    n_rows = min(args.steps, 64)
    rows = [torch.randint(0, s["vocab"], (s["batch"], s["block"]), generator=g).cuda() for _ in range(n_rows)]
    with tempfile.TemporaryDirectory(prefix="raylm-bench-gpu-") as tmp:
        cfg = make_cfg(Path(tmp), args.steps, args.log_every, not args.no_compile)
        runs = interleave({"A": plain_arm(cfg, rows, args.log_every, not args.no_compile),
                           "B": raylm_arm(cfg, rows)}, args.rounds)
    n_params = 12 * s["n_layer"] * s["d"] ** 2 + s["vocab"] * s["d"] + s["block"] * s["d"]
    flop_per_token = 6 * n_params + 6 * s["n_layer"] * s["block"] * s["d"]
    peak = bf16_peak()
    a = [r["steady_tok_s"] for r in runs["A"]]
    b = [r["steady_tok_s"] for r in runs["B"]]
    rat = ratios(a, b)
    mfu_b = statistics.median(b) * flop_per_token / H100_BF16_PEAK
    mfu_a = statistics.median(a) * flop_per_token / H100_BF16_PEAK
    loss_a, loss_b = statistics.median(r["first_loss"] for r in runs["A"]), statistics.median(r["first_loss"] for r in runs["B"])
    loss_ok = abs(loss_a - loss_b) <= 0.02 * loss_a
    res.ratio = spread(rat)["median"]
    res.passed = loss_ok and res.ratio >= TARGET_RATIO and mfu_b >= TARGET_MFU
    res.a = f"{statistics.median(a) / 1e3:,.0f}Ktok/s(MFU{mfu_a:.0%})"
    res.b = f"{statistics.median(b) / 1e3:,.0f}Ktok/s(MFU{mfu_b:.0%})"
    res.details = {"device": torch.cuda.get_device_name(), "shape": s, "compile": not args.no_compile,
                   "steps": args.steps, "n_params": n_params, "bf16_matmul_peak": peak, "mfu_A": mfu_a, "mfu_B": mfu_b,
                   "mfu_B_vs_measured_peak": statistics.median(b) * flop_per_token / peak, "first_loss_A": loss_a,
                   "first_loss_B": loss_b, "loss_match": loss_ok, "ratio": spread(rat), "per_round_ratio": rat,
                   "runs": runs}
    finish(res, [f"train-gpu: {torch.cuda.get_device_name()}; measured bf16 matmul {peak / 1e12:.0f} TFLOP/s; "
                 f"first-window loss A {loss_a:.3f} B {loss_b:.3f}; e2e per run A "
                 f"{statistics.median(r['e2e_s'] for r in runs['A']):.0f}s B {statistics.median(r['e2e_s'] for r in runs['B']):.0f}s"])


if __name__ == "__main__":
    main()
