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
        # Logical CPUs above the core count so Ray Data's read/map tasks can run beside training workers that
        # hold one CPU each (2 workers on a 2-core laptop would otherwise starve the data pipeline).
        init_kwargs.setdefault("num_cpus", max(4, os.cpu_count() or 1))
        # The dashboard stays on: without it, Tune over Ray Train V2 left placement groups behind (STACK-NOTES).
        ray.init(runtime_env=runtime_env, include_dashboard=True, **init_kwargs)
