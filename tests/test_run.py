"""`raylm run --no-wait` end to end on a quickstart-shaped tiny config, as a user runs it (a subprocess)."""

from __future__ import annotations

import json

import pytest
import yaml

from raylm.runtime import free_port


def longest_run(ids: list[int]) -> int:
    """The most times one token repeats back to back."""
    best = run = 0
    for i, t in enumerate(ids):
        run = run + 1 if i and ids[i - 1] == t else 1
        best = max(best, run)
    return best


@pytest.mark.timeout(1200)  # 610-880 s on a loaded 2-core machine (CI of 12-05): 900 left no margin
def test_quickstart_run_no_wait_beats_bigram_and_answers_with_text(cli, repo_root, tmp_path):
    """configs/quickstart.yaml as shipped (own output dir and port): prepare -> train -> evaluate -> serve -> request.
    The model beats the bigram baseline on test perplexity, and its greedy answer to the README's `"def "` is text."""
    from transformers import AutoTokenizer

    cfg = yaml.safe_load((repo_root / "configs" / "quickstart.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["serve"].update(port=free_port(), num_cpus_per_replica=0.5,
                        autoscaling={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2})
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg))

    proc = cli("run", "-c", str(path), "--no-wait", "--address", "local", timeout=1180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"http://127.0.0.1:{cfg['serve']['port']}" in proc.stdout and "curl -s" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert list(summary["steps"]) == ["prepare", "train", "evaluate", "serve", "request"]
    assert all(s["status"] == "ok" and s["wall_time_s"] >= 0 for s in summary["steps"].values())
    assert summary["endpoint"].startswith("http://127.0.0.1:")
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    print("quickstart wall times:", {k: s["wall_time_s"] for k, s in summary["steps"].items()}, summary["wall_time_s"])
    # quality bar: test perplexity under the bigram baseline of the same tokens
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    print("quickstart test perplexity", metrics["perplexity"], "baselines", metrics["baselines"])
    assert metrics["perplexity"] < metrics["baselines"]["bigram_perplexity"] < metrics["baselines"]["unigram_perplexity"]
    # the served greedy answer to "def " is text: letters, and no token repeated more than 4 times in a row
    sample = summary["sample"]
    assert sample["request"]["prompt"] == "def " and sample["request"]["temperature"] == 0
    text = sample["response"]["choices"][0]["text"]
    print("quickstart sample:", repr(text))
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "model"))(text, add_special_tokens=False).input_ids
    assert any(c.isalpha() for c in text) and longest_run(ids) <= 4, (text, ids)


@pytest.mark.timeout(120)
def test_failed_step_exits_1_naming_it_and_keeps_earlier_outputs(cli, tmp_path):
    """A run whose prepare cannot read its source stops at prepare with exit 1 and a summary saying so."""
    cfg = {"name": "broken", "output_dir": str(tmp_path / "out"),
           "data": {"sources": [{"path": str(tmp_path / "missing" / "*.jsonl")}]}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("run", "-c", str(path), "--no-wait", timeout=110)
    assert proc.returncode in (1, 2), proc.stderr
    if proc.returncode == 1:
        assert "raylm run failed" in proc.stderr and "prepare:" in proc.stderr
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["failed_step"] == "prepare"
        assert summary["steps"]["prepare"]["status"] == "failed" and "train" not in summary["steps"]
