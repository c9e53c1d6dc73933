"""`raylm evaluate` and report.md: test-split metrics through Ray Data, consistent with each other, and plots."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylm.config import validate_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def lm_workspace(tmp_path_factory) -> Path:
    from tiny_data import build_lm_workspace, write_training_summary

    root = build_lm_workspace(tmp_path_factory.mktemp("eval-lm"))
    write_training_summary(root / "model")
    return root


@pytest.fixture(scope="module")
def cls_workspace(tmp_path_factory, minilm_path) -> Path:
    from tiny_data import build_cls_workspace

    return build_cls_workspace(tmp_path_factory.mktemp("eval-cls"), minilm_path, train_steps=12)


def test_classification_metrics_are_consistent_and_beat_the_baseline(ray_session, cls_workspace):
    from raylm.evaluate import evaluate

    cfg = validate_config({"output_dir": str(cls_workspace), "data": {"block_size": 24, "tokenizer": {
                               "pretrained": str(cls_workspace / "model")}},
                           "model": {"task": "classification", "pretrained": str(cls_workspace / "model")}})
    m = evaluate(cfg)
    assert json.loads((cls_workspace / "metrics.json").read_text())["macro_f1"] == pytest.approx(m["macro_f1"])
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class", "auc_roc_macro",
                "auc_roc", "confusion_matrix", "baseline"):
        assert key in m, key
    cm = np.array(m["confusion_matrix"]["matrix"])
    assert cm.sum() == m["rows"] == 48
    # F1 recomputed from the confusion matrix (rows = true, columns = predicted) equals the reported one
    tp = np.diag(cm)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(len(tp)), where=cm.sum(0) > 0)
    recall = tp / cm.sum(1)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(tp)), where=precision + recall > 0)
    assert f1.mean() == pytest.approx(m["macro_f1"], abs=1e-9)
    assert tp.sum() / cm.sum() == pytest.approx(m["accuracy"])
    for i, name in enumerate(m["confusion_matrix"]["labels"]):
        assert m["per_class"][name]["f1"] == pytest.approx(f1[i], abs=1e-9)
    # the majority class of the (imbalanced) train split is `sports`; a trained model beats always guessing it
    assert m["baseline"]["label"] == "sports" and m["baseline"]["accuracy"] == pytest.approx(1 / 3)
    assert m["accuracy"] > m["baseline"]["accuracy"]
    assert 0.5 < m["auc_roc_macro"] <= 1.0

    report = (cls_workspace / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"plots/confusion_matrix.png", "plots/roc.png"} <= set(images)
    assert "## Data card" in report and "too_short" in report
    check_images(cls_workspace, images)


def test_causal_lm_perplexity_is_exp_loss_and_report_has_training_plots(ray_session, lm_workspace):
    from raylm.evaluate import evaluate

    cfg = validate_config({"output_dir": str(lm_workspace), "data": {"block_size": 32}})
    m = evaluate(cfg)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
    # a random model over a 320-token vocabulary: loss near ln(320), accuracy near chance
    assert abs(m["loss"] - math.log(320)) < 1.0 and 0 <= m["token_accuracy"] < 0.2
    assert m["tokens_scored"] == 24 * 31 and m["rows"] == 24
    assert len(m["completions"]) == 3 and all(c["prompt"] for c in m["completions"])
    # n-gram baselines of the same test tokens, counts from the train split: unigram add-one recomputed here
    b = m["baselines"]
    train = np.array(pq.read_table(lm_workspace / "data" / "train").column("input_ids").to_pylist())
    test = np.array(pq.read_table(lm_workspace / "data" / "test").column("input_ids").to_pylist())
    counts = np.bincount(train[:, 1:].ravel(), minlength=320)
    p_unigram = (counts[test[:, 1:].ravel()] + 1) / (counts.sum() + 320)
    assert b["tokens_scored"] == m["tokens_scored"]
    assert b["unigram_perplexity"] == pytest.approx(math.exp(-np.log(p_unigram).mean()), rel=1e-9)
    assert 1 < b["bigram_perplexity"] < 0.5 * b["unigram_perplexity"] < m["perplexity"]  # the toy grammar is bigram-friendly
    report = (lm_workspace / "report.md").read_text()
    assert "bigram perplexity" in report and "unigram perplexity" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"plots/loss.png", "plots/lr_schedule.png"} <= set(images)
    check_images(lm_workspace, images)


def check_images(root: Path, images: list[str]) -> None:
    from PIL import Image

    for rel in images:
        with Image.open(root / rel) as im:
            im.verify()
        with Image.open(root / rel) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200, (rel, im.size)
            low, high = im.convert("L").getextrema()
            assert high - low > 50, f"{rel} looks blank"


def test_evaluate_without_a_model_names_the_missing_path(lm_workspace, tmp_path):
    from raylm.evaluate import evaluate

    cfg = validate_config({"output_dir": str(lm_workspace)})
    with pytest.raises(FileNotFoundError, match="no model at .*nowhere"):
        evaluate(cfg, model_dir=tmp_path / "nowhere")


def test_masked_lm_validation_and_test_mask_alike_80_10_10():
    """Test metrics mask as validation does: 15% chosen, of those 80% [MASK], 10% random, 10% kept, seeded per row;
    the training loop's validation masker gives the very same inputs and targets."""
    import torch

    from raylm.evaluate import mask_row, masking_context
    from raylm.train.loop import eval_masker

    manifest = {"vocab_size": 1000, "special_tokens": {"mask_token_id": 4, "pad_token_id": 0, "cls_token_id": 1}}
    ctx = masking_context(manifest, seed=0)
    rows = np.random.default_rng(1).integers(5, 1000, size=(400, 128))
    outs = [mask_row(row, ctx) for row in rows]
    chosen = np.stack([c for _, c in outs])
    masked = np.stack([m for m, _ in outs])
    assert 0.13 < chosen.mean() < 0.17
    to_mask = (masked == 4)[chosen].mean()
    kept = (masked == rows)[chosen].mean()
    assert 0.77 < to_mask < 0.83 and 0.07 < kept < 0.13 and 0.07 < 1 - to_mask - kept < 0.13
    assert not (masked != rows)[~chosen].any()
    again = mask_row(rows[0], ctx)
    assert np.array_equal(again[0], outs[0][0]) and np.array_equal(again[1], outs[0][1])
    cfg = validate_config({"seed": 0, "model": {"task": "masked_lm", "arch": {"family": "bert"}}})
    inputs, labels = eval_masker(cfg, manifest)(torch.as_tensor(rows[:8]))
    assert np.array_equal(inputs.numpy(), masked[:8])
    assert np.array_equal(labels.numpy(), np.where(chosen[:8], rows[:8], -100))
