"""`model/README.md`: the Hugging Face model card `raylm evaluate` writes next to the exported weights."""

from __future__ import annotations

import json

import pytest
import yaml

from raylm.config import validate_config

pytestmark = pytest.mark.timeout(300)


def test_model_card_front_matter_parses_and_its_metrics_equal_metrics_json(ray_session, tmp_path):
    from huggingface_hub import ModelCard
    from tiny_data import build_lm_workspace, write_training_summary

    from raylm.evaluate import evaluate

    root = build_lm_workspace(tmp_path)
    write_training_summary(root / "model")
    cfg = validate_config({"name": "card-lm", "output_dir": str(root), "data": {"block_size": 32}})
    evaluate(cfg)
    text = (root / "model" / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    metrics = json.loads((root / "metrics.json").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "raylm" in meta["tags"] and meta["datasets"] == ["tests/tiny_data.py"]
    reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert {"loss", "perplexity", "token_accuracy"} <= reported.keys()
    assert reported == {k: metrics[k] for k in reported}
    # the Hub's own parser reads the same metadata
    card = ModelCard(text)
    assert card.data.pipeline_tag == "text-generation" and card.data.eval_results[0].metric_value in reported.values()
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    for section in ("## Evaluation (test split)", "## Data card", "## Training config", "## Lineage"):
        assert section in text, section
    assert cfg.config_hash() in text and manifest["config_hash"] in text
    assert f"{metrics['baselines']['bigram_perplexity']:.4g}" in text  # the baseline row of the eval table
