"""train-compile: when `train.compile: true` pays: raylm's training loop with and without torch.compile.

    python bench/bench_train_compile.py                    # CPU here; on a CUDA machine add --gpu
    python bench/bench_train_compile.py --layers 4 --d 256 --steps 60 --rounds 4

Both arms are `raylm.train.loop.fit` at world size 1 without Ray (the DeepSpeed engine called directly, ZeRO-1,
fp32 on CPU), the same GPT-2 shape, the same synthetic rows, seed, steps and thread budget; they differ only in
`train.compile`. A: compile off. B: compile on (`engine.compile()`: torch.compile of the module inside the engine).
Steady state: tokens/s over the log windows after the first; the first window (compilation, engine build) is
reported apart as start-up (from the first compiled run: later rounds in this process reuse its compiled graphs,
a real run in a fresh worker does not). Ratio = B/A per round, median over interleaved rounds (A B B A ...). Both arms must
start from the same loss (same first-window loss within 1%), else the ratio compares different work.
Target: >= 1.0 (compile pays in steady state); the break-even step count (start-up cost / per-step saving) says
for how long a run must train before it pays overall.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Result, finish, interleave, ratios, spread  # noqa: E402

TARGET_RATIO = 1.0


def make_cfg(root: Path, args, compile_: bool):
    from raylm.config import load_config

    return load_config(None, [
        f"output_dir={root}", f"model.arch={{family: gpt2, n_layer: {args.layers}, d_model: {args.d}, n_head: {args.heads}}}",
        "model.dropout=0.0", f"data.block_size={args.block}", f"train.batch_size={args.batch}", "train.num_workers=1",
        f"train.use_gpu={str(args.gpu).lower()}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}", "train.eval_batches=1", "train.deepspeed.zero_stage=1",
        "train.warmup_steps=2", f"train.log_every={args.log_every}", "train.early_stopping=null",
        f"train.compile={str(compile_).lower()}"])


def manifest(args) -> dict:
    return {"task": "causal_lm", "block_size": args.block, "vocab_size": args.vocab, "label_map": None,
            "special_tokens": {"pad_token_id": 1, "eos_token_id": 0, "bos_token_id": 0},
            "splits": {"train": {"rows": 0}, "val": {"rows": args.batch}}}


def arm(cfg, rows, args):
    import torch

    from raylm.train.loop import fit_in_process

    def run() -> dict:
        t0 = time.perf_counter()
        state = fit_in_process(cfg, manifest(args), rows, port=29541)
        if args.gpu:
            torch.cuda.synchronize()
        hist = state["history"]
        windows = [h["tokens_per_s"] for h in hist]
        return {"steady_tok_s": statistics.median(windows[1:] or windows), "first_window_tok_s": windows[0],
                "first_loss": hist[0]["train_loss"], "e2e_s": time.perf_counter() - t0, "windows": windows}

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    import torch

    device = "cuda" if args.gpu else "cpu"
    threads = torch.get_num_threads()  # one budget for both arms
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, args.vocab, (args.batch, args.block), generator=g).to(device)
            for _ in range(min(args.steps, 32))]
    res = Result("train-compile", f">={TARGET_RATIO}", None, None, "", "")
    with tempfile.TemporaryDirectory(prefix="raylm-bench-compile-") as tmp:
        runs = interleave({"A": arm(make_cfg(Path(tmp) / "a", args, False), rows, args),
                           "B": arm(make_cfg(Path(tmp) / "b", args, True), rows, args)}, args.rounds)
    a = [r["steady_tok_s"] for r in runs["A"]]
    b = [r["steady_tok_s"] for r in runs["B"]]
    rat = ratios(a, b)
    loss_a = statistics.median(r["first_loss"] for r in runs["A"])
    loss_b = statistics.median(r["first_loss"] for r in runs["B"])
    loss_ok = abs(loss_a - loss_b) <= 0.01 * abs(loss_a)
    tok_per_step = args.batch * args.block
    step_a, step_b = tok_per_step / statistics.median(a), tok_per_step / statistics.median(b)
    e2e_a = statistics.median(r["e2e_s"] for r in runs["A"])
    e2e_b = runs["B"][0]["e2e_s"]  # the first compiled run: later rounds reuse this process's compiled graphs,
    # while every real run (a fresh Ray worker) compiles once. Start-up beyond the steps, and the steps to earn it
    extra_startup = (e2e_b - args.steps * step_b) - (e2e_a - args.steps * step_a)
    break_even = extra_startup / (step_a - step_b) if step_a > step_b else float("inf")
    res.ratio = spread(rat)["median"]
    res.passed = loss_ok and res.ratio >= TARGET_RATIO
    res.a = f"{statistics.median(a) / 1e3:,.1f}Ktok/s"
    res.b = f"{statistics.median(b) / 1e3:,.1f}Ktok/s"
    res.details = {"device": device, "threads": threads, "shape": vars(args), "first_loss_A": loss_a,
                   "first_loss_B": loss_b, "loss_match": loss_ok, "ratio": spread(rat), "per_round_ratio": rat,
                   "step_s_A": step_a, "step_s_B": step_b, "e2e_s_A": e2e_a, "e2e_s_B": e2e_b,
                   "compile_startup_s": extra_startup, "break_even_steps": break_even, "runs": runs}
    finish(res, [f"train-compile: {device}, {threads} threads; step A {step_a * 1e3:.0f} ms B {step_b * 1e3:.0f} ms; "
                 f"compile start-up {extra_startup:.0f} s, pays after ~{break_even:.0f} steps; "
                 f"first-window loss A {loss_a:.3f} B {loss_b:.3f}"])


if __name__ == "__main__":
    main()
