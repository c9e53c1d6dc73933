"""`raylm train`: real Ray Train TorchTrainer + DeepSpeed engines on tiny models; each fit() checks several things."""

from __future__ import annotations

import json
import math
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
    assert model_dir.is_symlink() and model_dir.resolve().parent.name == ".model.versions"  # swapped, versioned


@pytest.mark.timeout(900)
def test_worker_crash_resumes_from_checkpoint(lm_run, tmp_path_factory, monkeypatch):
    """A worker process dies at step 15; with max_failures 1 the group restarts from the step-10 checkpoint."""
    from raylm.train import train

    _, reference = lm_run
    root = build_lm_workspace(tmp_path_factory.mktemp("lm_fault"))
    monkeypatch.setenv("RAYLM_FAULT_AT_STEP", "15")
    summary = train(lm_cfg(root, "train.max_failures=1", "train.tracking=[tensorboard, mlflow]"))
    assert summary["resumed_from"] == [10]  # not restarted from 0
    assert summary["steps"] == 30
    final, ref = summary["evals"][-1]["val_loss"], reference["evals"][-1]["val_loss"]
    assert abs(final - ref) < 0.1 * ref, (final, ref)
    # train.tracking across the restart: one TensorBoard run and one MLflow run, read back with their own readers
    from tracking_checks import assert_tracked_train_run

    assert_tracked_train_run(root, "raylm", summary, log_steps=[5, 10, 15, 20, 25, 30], eval_steps=[10, 20, 30],
                             params={"train.lr": "0.003", "train.max_failures": "1"})


@pytest.mark.timeout(900)
def test_zero3_early_stopping_exports_best_checkpoint(ray_session, tmp_path):
    """min_delta no step can reach: the first evaluation stays best, patience 1 stops at the second; the exported
    weights are the step-10 checkpoint's (full shapes, consolidated from ZeRO-3 partitions)."""
    from raylm.train import train

    # one val batch for two workers: rank 1 scores nothing, yet joins every ZeRO-3 gather (probe forward included)
    root = build_lm_workspace(tmp_path, rows={"train": 256, "val": 8, "test": 24})
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
        f"data.tokenizer={{pretrained: {minilm_path}}}",
        f"data.block_size={CLS_BLOCK}", "model.freeze={embeddings: true, layers: 2}", "train.num_workers=2",
        "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.max_steps=24", "train.eval_every=12",
        "train.checkpoint_every=12", "train.deepspeed.zero_stage=1", "train.early_stopping=null",
        "train.metric=val_accuracy", "train.mode=max"])
    summary = train(cfg)
    # the exported checkpoint is the evaluation with the best val_accuracy (train.metric), not the lowest val_loss
    assert summary["val"]["val_accuracy"] == max(e["val_accuracy"] for e in summary["evals"])
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
        f"data.tokenizer={{pretrained: {minilm_path}}}", f"data.block_size={CLS_BLOCK}", "model.lora={r: 4, alpha: 8}", "train.num_workers=2", "train.batch_size=8",
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
    assert run_stage("train", lm_cfg(root, f"model.pretrained={root / 'model'}",
                                     f"data.tokenizer={{pretrained: {root / 'model'}}}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.pretrained" in err and "vocab_size" in err


# ------------------------------------------------------------------------------ issue 12: defects, each its test
def tiny_qwen2(path: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Qwen2 (a family outside gpt2/llama/bert) saved with the workspace's tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.timeout(900)
def test_qwen2_freeze_and_checkpoint_every_between_evaluations(ray_session, tmp_path):
    """Fine-tunes a family outside gpt2/llama/bert with `freeze.layers: 1` (found from the model's own layer list):
    the frozen layer is byte-equal after training, the other changed. checkpoint_every 4 with eval_every 10 gives
    checkpoints at steps 4 and 8 too (each with its own evaluation), not only at evaluation steps."""
    from raylm.train import train

    root = build_lm_workspace(tmp_path / "ws")
    base = tiny_qwen2(tmp_path / "qwen2", root / "data" / "tokenizer")
    cfg = lm_cfg(root, f"model.pretrained={base}", f"data.tokenizer={{pretrained: {base}}}",
                 "model.freeze={layers: 1}", "train.max_steps=12", "train.eval_every=10", "train.checkpoint_every=4",
                 "train.keep_checkpoints=5", "train.early_stopping=null", "train.eval_batches=1")
    summary = train(cfg)
    assert [e["step"] for e in summary["evals"]] == [4, 8, 10, 12]
    ckpt_steps = {json.loads(p.read_text())["step"] for p in Path(summary["results_path"]).glob("checkpoint_*/raylm_state.json")}
    assert {4, 8, 12} <= ckpt_steps, ckpt_steps
    before, after = load_file(str(base / "model.safetensors")), load_file(str(cfg.path("model", "model.safetensors")))
    layer0 = [k for k in before if k.startswith("model.layers.0.")]
    assert layer0 and all(torch.equal(before[k], after[k]) for k in layer0)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.layers.1."))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("problem, overrides, key, hint", [
    ("train split smaller than batch_size x workers", ["train.batch_size=8"], "train.batch_size",
     "train.batch_size <= 5"),
    ("empty val split", [], "data.split.val", "raise data.split.val"),
    ("pretrained model + freshly trained tokenizer", ["model.pretrained={root}/model"], "data.tokenizer",
     "data.tokenizer: {pretrained:"),
    ("metric the task does not report", ["train.metric=val_accuracy", "train.mode=max"], "train.metric",
     "val_loss, val_ppl"),
])
def test_configs_that_cannot_train_exit_2_before_ray(tmp_path, capsys, problem, overrides, key, hint):
    """Exit 2 naming the key and what would work, before Ray: the address given leads nowhere, so reaching Ray
    would fail differently (exit 1)."""
    from raylm.cli import main

    rows = {"train": 10, "val": 16, "test": 8} if "smaller" in problem else \
        {"train": 64, "val": 0, "test": 8} if "empty val" in problem else None
    root = build_lm_workspace(tmp_path, rows=rows) if rows is None or rows["val"] else _lm_workspace_without_val(tmp_path, rows)
    sets = [f"output_dir={root}", *LM_SETTINGS, *(o.format(root=root) for o in overrides)]
    args = ["train", "-c", str(_empty_config(tmp_path)), "--address", "127.0.0.1:9"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"config error: {key}:" in err and hint in err, err


def _empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("name: bad\n")
    return path


def _lm_workspace_without_val(tmp_path: Path, rows: dict) -> Path:
    """A prepared workspace whose val split came out empty (a split fraction too small for the corpus)."""
    root = build_lm_workspace(tmp_path, rows={k: v for k, v in rows.items() if v})
    data = json.loads((root / "data" / "manifest.json").read_text())
    data["splits"]["val"] = {"documents": 0, "tokens": 0, "rows": 0, "shards": 0}
    (root / "data" / "manifest.json").write_text(json.dumps(data))
    return root


def test_freeze_finds_embeddings_and_layers_in_any_family():
    """No table of three families: roberta, distilbert and qwen2 freeze through their own structure."""
    import transformers

    from raylm.train.models import frozen_modules

    cfg = load_config(None, ["model.freeze={embeddings: true, layers: 1}"])
    families = {
        "roberta": (transformers.RobertaForMaskedLM, transformers.RobertaConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)),
        "distilbert": (transformers.DistilBertForMaskedLM, transformers.DistilBertConfig(
            vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32)),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32, tie_word_embeddings=False)),
    }
    for name, (cls, config) in families.items():
        model = cls(config)
        for module in frozen_modules(model, cfg):
            module.requires_grad_(False)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert model.get_input_embeddings().weight.requires_grad is False, name
        assert any(".0." in n for n in frozen) and not any(".1." in n for n in frozen), (name, sorted(frozen))
    with pytest.raises(Exception, match="model.freeze.layers"):
        frozen_modules(cls(config), load_config(None, ["model.freeze={layers: 3}"]))


def test_checkpoint_choice_follows_train_metric(tmp_path):
    """Ranked by train.metric in train.mode: the best val_accuracy wins even when another has the lowest val_loss;
    a damaged checkpoint is never chosen, however good its metric."""
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from raylm.checkpoints import write_manifest
    from raylm.train import best_checkpoint

    def checkpoint(step: int, damaged: bool = False) -> Checkpoint:
        d = tmp_path / f"checkpoint_{step}"
        d.mkdir()
        (d / "weights.bin").write_bytes(bytes(64))
        write_manifest(d)
        if damaged:
            (d / "weights.bin").write_bytes(bytes(10))  # truncated after the manifest recorded it
        return Checkpoint.from_directory(str(d))

    kept = [(checkpoint(10), {"step": 10, "val_loss": 0.40, "val_accuracy": 0.70}),
            (checkpoint(20), {"step": 20, "val_loss": 0.55, "val_accuracy": 0.85}),
            (checkpoint(30), {"step": 30, "val_loss": 0.50, "val_accuracy": 0.80}),
            (checkpoint(40, damaged=True), {"step": 40, "val_loss": 0.10, "val_accuracy": 0.99})]
    result = SimpleNamespace(best_checkpoints=kept, path="results")
    assert best_checkpoint(result, "val_accuracy", "max")[1]["step"] == 20
    assert best_checkpoint(result, "val_loss", "min")[1]["step"] == 10
    assert best_checkpoint(result, "val_accuracy", "max", best_step=30)[1]["step"] == 30  # early stopping's best
    # tune ranks trials by the same metric: given in either section, the other follows; a conflict is an error
    cfg = load_config(None, ["model.task=classification", "model.arch.family=bert",
                             "tune={metric: val_accuracy, mode: max, space: {train.lr: {choice: [0.001]}}}"])
    assert (cfg.train.metric, cfg.train.mode) == ("val_accuracy", "max")
    with pytest.raises(Exception, match="tune.metric"):
        load_config(None, ["train.metric=val_ppl", "tune={metric: val_loss, space: {train.lr: {choice: [0.001]}}}"])


def test_tensor_parallel_group_sees_identical_batches():
    """tensor_parallel 2 on 4 workers: ranks 0-1 and 2-3 form tensor-parallel groups; each group gets the same
    rows, the two data-parallel ranks disjoint ones, and steps count data-parallel ranks, not workers."""
    from raylm.train.loop import data_parallel_size, data_parallel_slice, total_steps

    cfg = load_config(None, ["train.use_gpu=true", "train.num_workers=4", "train.deepspeed.tensor_parallel=2",
                             "train.batch_size=2", "train.max_steps=null", "train.epochs=1"])
    dp_size = data_parallel_size(cfg, 4)
    global_batch = {"input_ids": torch.arange(8).reshape(4, 2)}  # what every rank reads: batch_size x dp_size rows
    seen = {rank: data_parallel_slice(global_batch, rank // 2, dp_size)["input_ids"] for rank in range(4)}
    assert dp_size == 2 and torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not set(seen[0].flatten().tolist()) & set(seen[2].flatten().tolist())
    assert len(seen[0]) == cfg.train.batch_size
    assert total_steps(cfg, {"splits": {"train": {"rows": 40}}}, world_size=4) == 10


def test_train_shards_come_in_a_seeded_file_order_the_same_on_every_pass(ray_session, tmp_path):
    """The trainer reads train shards in a file order drawn from `seed`, the same on every pass and for a rebuilt
    Dataset (a resumed run skips exactly the batches it saw); another seed, another order; val as written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data import DataContext

    from raylm.train import train_datasets

    for split, n in (("train", 8), ("val", 3)):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(n):
            pq.write_table(pa.table({"input_ids": [[i]]}), tmp_path / "data" / split / f"{split}-{i:05d}.parquet")
    ctx = DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True  # file order, not task timing
    try:
        def order(ds) -> list[int]:  # one pass = one execution = one epoch
            return [r["input_ids"][0] for r in ds.iter_rows()]

        seed3 = train_datasets(load_config(None, [f"output_dir={tmp_path}", "seed=3"]))
        assert order(seed3["val"]) == [0, 1, 2]
        first = order(seed3["train"])
        assert sorted(first) == list(range(8)) and first != list(range(8))  # shuffled
        assert order(seed3["train"]) == first  # the next epoch: same file order
        again = train_datasets(load_config(None, [f"output_dir={tmp_path}", "seed=3"]))["train"]
        assert order(again) == first  # a restart: same order
        assert order(train_datasets(load_config(None, [f"output_dir={tmp_path}", "seed=4"]))["train"]) != first
    finally:
        ctx.execution_options.preserve_order = saved


COMPILE_PROBE = r"""
import json, sys, tempfile
import torch
from raylm.config import load_config
from raylm.train.loop import fit_in_process

g = torch.Generator().manual_seed(0)
rows = [torch.randint(0, 300, (4, 32), generator=g) for _ in range(6)]
manifest = {"task": "causal_lm", "block_size": 32, "vocab_size": 300, "label_map": None,
            "special_tokens": {"pad_token_id": 1, "eos_token_id": 0, "bos_token_id": 0},
            "splits": {"train": {"rows": 0}, "val": {"rows": 4}}}
out = {}
for compile_ in (False, True):
    cfg = load_config(None, [f"output_dir={tempfile.mkdtemp()}", "model.arch={family: gpt2, n_layer: 1, d_model: 32, n_head: 2}",
                             "model.dropout=0.0", "data.block_size=32", "train.batch_size=4", "train.num_workers=1",
                             "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6", "train.eval_batches=1",
                             "train.warmup_steps=1", "train.log_every=2", "train.early_stopping=null",
                             f"train.compile={str(compile_).lower()}"])
    state = fit_in_process(cfg, manifest, rows, port=int(sys.argv[1]))
    out[str(compile_)] = [h["train_loss"] for h in state["history"]]
from torch._dynamo.utils import counters
out["graphs"] = counters["stats"]["unique_graphs"]
print("COMPILE " + json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_compile_trains_the_same_model_through_torch_compile(tmp_path):
    """`train.compile: true` compiles the module inside the DeepSpeed engine (dynamo captured graphs) and trains the
    same model: identical data and seed give the same losses as without it (fit at world size 1, no Ray)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", COMPILE_PROBE, str(port)], capture_output=True, text=True,
                          timeout=540, cwd=tmp_path)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("COMPILE ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    losses = json.loads(line.removeprefix("COMPILE "))
    assert losses["graphs"] >= 1, "nothing was compiled"
    eager, compiled = losses["False"], losses["True"]
    assert len(eager) == len(compiled) == 3 and all(map(math.isfinite, compiled)), losses
    assert compiled == pytest.approx(eager, rel=2e-3), losses


def test_every_rank_reads_the_val_split_in_one_order(ray_session, tmp_path):
    """Each rank reads the whole val split and scores every dp_size-th batch of it, so all ranks must get its rows
    in one order (file order), or a batch is scored twice and another never: a wrong val loss, no error."""
    import pyarrow as pa

    from raylm import storage
    from raylm.train import data_config

    (tmp_path / "val").mkdir()
    for i in range(24):
        pq.write_table(pa.table({"input_ids": [[i]]}), tmp_path / "val" / f"val-{i:05d}.parquet")
    dc = data_config(load_config(None, [f"output_dir={tmp_path}"]))
    val = storage.read_parquet(tmp_path / "val")
    ranks = dc.configure({"val": val}, world_size=2, worker_handles=None, worker_node_ids=None)
    orders = [[row["input_ids"][0] for row in r["val"].iter_rows()] for r in ranks]
    assert orders[0] == orders[1] == list(range(24)), orders
    assert dc._resolve_execution_options("val").preserve_order  # guaranteed, not a lucky schedule
