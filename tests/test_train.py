"""`raylm train`: real Ray Train TorchTrainer + DeepSpeed engines on tiny models; each fit() checks several things."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from raylm.config import load_config
from tiny_data import CLS_BLOCK, TOPICS, build_cls_workspace, build_lm_workspace, manifest, topic_text, write_split

LM_SETTINGS = ["model.arch={family: gpt2, n_layer: 2, d_model: 64, n_head: 2}", "data.block_size=32",
               "train.num_workers=2", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
               "train.max_steps=30", "train.eval_every=10", "train.checkpoint_every=10", "train.log_every=5",
               "train.eval_batches=2", "train.deepspeed.zero_stage=2", "seed=0"]


def lm_cfg(root: Path, *extra: str):
    return load_config(None, [f"output_dir={root}", *LM_SETTINGS, *extra])


def probe_logits_match(model_dir: Path, ckpt: str, auto: str) -> float:
    """Load model_dir in a fresh Python (no raylm import) and return max |logits - live model's probe logits|."""
    code = textwrap.dedent(f"""
        import sys, torch, transformers
        assert "raylm" not in sys.modules
        probe = torch.load({str(Path(ckpt) / 'probe.pt')!r})
        model = transformers.{auto}.from_pretrained({str(model_dir)!r}).eval()
        tok = transformers.AutoTokenizer.from_pretrained({str(model_dir)!r})
        inputs = {{k: v for k, v in probe.items() if k != "logits"}}
        with torch.no_grad():
            out = model(**inputs).logits
        print((out - probe["logits"]).abs().max().item())
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lm_run(ray_session, tmp_path_factory):
    from raylm.train import train

    root = build_lm_workspace(tmp_path_factory.mktemp("lm"))
    cfg = lm_cfg(root)
    return cfg, train(cfg)


@pytest.mark.timeout(900)
def test_zero2_causal_lm_learns_and_exports_hf_model(lm_run):
    cfg, summary = lm_run
    history = summary["history"]
    assert summary["steps"] == 30 and [e["step"] for e in summary["evals"]] == [10, 20, 30]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"], history  # clearly learns the toy grammar
    assert summary["evals"][-1]["val_loss"] < summary["evals"][0]["val_loss"]
    assert summary["tokens_seen"] == 30 * 8 * 32 * 2 and summary["tokens_per_s"] > 0
    model_dir = cfg.path("model")
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_summary.json"} <= {
        p.name for p in model_dir.iterdir()}
    written = json.loads((model_dir / "training_summary.json").read_text())
    assert written["best_step"] == summary["best_step"] and written["evals"] == summary["evals"]
    assert probe_logits_match(model_dir, summary["checkpoint"], "AutoModelForCausalLM") < 1e-4
    assert not list(model_dir.parent.glob(".model.tmp-*"))  # atomic export leaves no temp dirs


@pytest.mark.timeout(900)
def test_worker_crash_resumes_from_checkpoint(lm_run, tmp_path_factory, monkeypatch):
    """A worker process dies at step 15; with max_failures 1 the group restarts from the step-10 checkpoint."""
    from raylm.train import train

    _, reference = lm_run
    root = build_lm_workspace(tmp_path_factory.mktemp("lm_fault"))
    monkeypatch.setenv("RAYLM_FAULT_AT_STEP", "15")
    summary = train(lm_cfg(root, "train.max_failures=1"))
    assert summary["resumed_from"] == [10]  # not restarted from 0
    assert summary["steps"] == 30
    final, ref = summary["evals"][-1]["val_loss"], reference["evals"][-1]["val_loss"]
    assert abs(final - ref) < 0.1 * ref, (final, ref)


@pytest.mark.timeout(900)
def test_zero3_early_stopping_exports_best_checkpoint(ray_session, tmp_path):
    """min_delta no step can reach: the first evaluation stays best, patience 1 stops at the second; the exported
    weights are the step-10 checkpoint's (full shapes, consolidated from ZeRO-3 partitions)."""
    from raylm.train import train

    root = build_lm_workspace(tmp_path)
    cfg = lm_cfg(root, "train.deepspeed.zero_stage=3", "train.early_stopping={patience: 1, min_delta: 100.0}")
    summary = train(cfg)
    assert summary["steps"] == 20 and summary["early_stopped"]
    assert summary["best_step"] == 10
    weights = load_file(cfg.path("model", "model.safetensors"))
    assert tuple(weights["transformer.wte.weight"].shape) == (json.loads(
        cfg.path("data", "manifest.json").read_text())["vocab_size"], 64)
    assert tuple(weights["transformer.h.1.mlp.c_fc.weight"].shape) == (64, 256)
    assert probe_logits_match(cfg.path("model"), summary["checkpoint"], "AutoModelForCausalLM") < 1e-4


@pytest.mark.timeout(900)
def test_minilm_classification_zero1_freeze(ray_session, tmp_path, minilm_path):
    """MiniLM fine-tuned for topics beats the majority baseline; frozen embeddings and layers stay byte-equal."""
    from raylm.train import train

    root = build_cls_workspace(tmp_path, minilm_path, train_steps=0)
    cfg = load_config(None, [
        f"output_dir={root}", f"model.pretrained={minilm_path}", "model.task=classification",
        f"data.block_size={CLS_BLOCK}", "model.freeze={embeddings: true, layers: 2}", "train.num_workers=2",
        "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.max_steps=24", "train.eval_every=12",
        "train.checkpoint_every=12", "train.deepspeed.zero_stage=1", "train.early_stopping=null"])
    summary = train(cfg)
    val_labels = pq.read_table(root / "data" / "val").column("label").to_pylist()
    majority = max(val_labels.count(y) for y in set(val_labels)) / len(val_labels)
    accuracy = summary["val"]["val_accuracy"]
    print(f"MiniLM topics val accuracy {accuracy:.3f} vs majority baseline {majority:.3f}")
    assert accuracy > majority + 0.2
    base = load_file(str(minilm_path / "model.safetensors"))
    tuned = load_file(str(cfg.path("model", "model.safetensors")))
    for name in ("embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight",
                 "encoder.layer.1.attention.self.query.weight"):
        assert torch.equal(tuned[f"bert.{name}"], base[name]), name
    assert not torch.equal(tuned["bert.encoder.layer.5.attention.self.query.weight"],
                           base["encoder.layer.5.attention.self.query.weight"])
    config = json.loads(cfg.path("model", "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(sorted(TOPICS))}


def build_mlm_workspace(root: Path, minilm: Path) -> Path:
    """Masked-LM shards with MiniLM's tokenizer: `[CLS] doc [SEP]` packed into blocks."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm))
    tok.save_pretrained(root / "data" / "tokenizer")
    rng = random.Random(2)
    stream: list[int] = []
    for _ in range(400):
        stream += tok(topic_text(rng, rng.choice(sorted(TOPICS)))).input_ids
    blocks = [stream[i:i + CLS_BLOCK] for i in range(0, len(stream) - CLS_BLOCK, CLS_BLOCK)]
    sizes = {"train": len(blocks) - 48, "val": 24, "test": 24}
    start = 0
    for split, n in sizes.items():
        write_split(root, split, {"input_ids": blocks[start:start + n]})
        start += n
    (root / "data" / "manifest.json").write_text(json.dumps(manifest("masked_lm", tok, CLS_BLOCK, sizes)))
    return root


@pytest.mark.timeout(900)
def test_minilm_masked_lm_lora_merged_on_export(ray_session, tmp_path, minilm_path):
    from raylm.train import train

    root = build_mlm_workspace(tmp_path, minilm_path)
    cfg = load_config(None, [
        f"output_dir={root}", f"model.pretrained={minilm_path}", "model.task=masked_lm",
        f"data.block_size={CLS_BLOCK}", "model.lora={r: 4, alpha: 8}", "train.num_workers=2", "train.batch_size=8",
        "train.lr=5e-3", "train.warmup_steps=0", "train.max_steps=10", "train.eval_every=5",
        "train.checkpoint_every=5", "train.early_stopping=null"])
    summary = train(cfg)
    assert summary["evals"][-1]["val_loss"] < summary["evals"][0]["val_loss"] + 1.0
    tuned = load_file(str(cfg.path("model", "model.safetensors")))
    assert not [k for k in tuned if "lora" in k]
    base = load_file(str(minilm_path / "model.safetensors"))
    q = "encoder.layer.0.attention.self.query.weight"
    assert tuned[f"bert.{q}"].shape == base[q].shape and not torch.equal(tuned[f"bert.{q}"], base[q])
    assert torch.equal(tuned["bert.encoder.layer.0.attention.self.key.weight"],
                       base["encoder.layer.0.attention.self.key.weight"])  # not a LoRA target: untouched
    assert probe_logits_match(cfg.path("model"), summary["checkpoint"], "AutoModelForMaskedLM") < 1e-3


@pytest.mark.timeout(120)
def test_bad_inputs_fail_fast_with_one_line(ray_session, tmp_path, capsys):
    """No fit needed: each problem is named before any training starts, with the contract's exit code."""
    from raylm.cli import run_stage

    root = build_lm_workspace(tmp_path / "ws")
    # missing shards: a run-time failure (exit 1) that says to run prepare
    cfg = lm_cfg(tmp_path / "nowhere")
    (tmp_path / "nowhere" / "data").mkdir(parents=True)
    (tmp_path / "nowhere" / "data" / "manifest.json").write_text((root / "data" / "manifest.json").read_text())
    assert run_stage("train", cfg) == 1
    err = capsys.readouterr().err
    assert "no Parquet shards in" in err and "raylm prepare" in err
    # a pretrained path that is not a model: config validation, exit 2
    not_model = tmp_path / "not_a_model"
    not_model.mkdir()
    from raylm.cli import main

    (tmp_path / "c.yaml").write_text(f"output_dir: {root}\nmodel: {{pretrained: {not_model}}}\n")
    assert main(["train", "-c", str(tmp_path / "c.yaml")]) == 2
    assert "model.pretrained" in capsys.readouterr().err
    # vocab mismatch: a model whose vocab is smaller than the prepared tokenizer's
    data = json.loads((root / "data" / "manifest.json").read_text())
    data["vocab_size"] = 50000
    (root / "data" / "manifest.json").write_text(json.dumps(data))
    assert run_stage("train", lm_cfg(root, f"model.pretrained={root / 'model'}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.pretrained" in err and "vocab_size" in err
