"""Connecting to Ray: `--address`, else RAY_ADDRESS, else a local cluster; the runtime env workers need."""

from __future__ import annotations

import os
from pathlib import Path

import raylm

# DS_ACCELERATOR=cpu silences DeepSpeed's accelerator probe on CPU workers; harmless on GPU nodes (it is only
# set when the driver has no CUDA).
PACKAGE_ROOT = Path(raylm.__file__).resolve().parent


def worker_env() -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    except ImportError:
        pass
    # raylm's source root on workers' path, so a --working-dir job or a fresh node can import it uninstalled
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT.parent), os.environ.get("PYTHONPATH")) if p)
    return env


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Start or join Ray once per process; a no-op when Ray is already initialized (tests, jobs)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": worker_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **init_kwargs)
    else:
        ray.init(runtime_env=runtime_env, include_dashboard=True, **init_kwargs)
