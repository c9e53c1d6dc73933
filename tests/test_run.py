"""`raylm run --no-wait` end to end on a quickstart-shaped tiny config, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import socket

import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_run_no_wait_end_to_end(cli, repo_root, tmp_path):
    cfg = yaml.safe_load((repo_root / "configs" / "quickstart.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["data"]["sources"] = [{"builtin": "python-docs", "max_docs": 200}]
    cfg["data"]["tokenizer"] = {"train": {"type": "bpe", "vocab_size": 512}}
    cfg["data"]["block_size"] = 64
    cfg["model"]["arch"] = {"family": "gpt2", "n_layer": 1, "d_model": 64, "n_head": 2}
    cfg["train"].update(max_steps=4, eval_every=2, checkpoint_every=4, eval_batches=2, batch_size=4)
    cfg["serve"].update(port=free_port(), num_cpus_per_replica=0.5,
                        autoscaling={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))

    proc = cli("run", "-c", str(path), "--no-wait", timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"http://127.0.0.1:{cfg['serve']['port']}" in proc.stdout and "curl -s" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert list(summary["steps"]) == ["prepare", "train", "evaluate", "serve", "request"]
    assert all(s["status"] == "ok" and s["wall_time_s"] >= 0 for s in summary["steps"].values())
    assert summary["endpoint"].startswith("http://127.0.0.1:")
    assert summary["sample"]["response"]["choices"][0]["text"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()


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
