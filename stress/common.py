"""What the stress runs share: a private local Ray cluster, the tiny GPT-2 the serve tests build, one served app,
replica processes and their memory. Each stress script prints its figure and exits 1 when its promise is broken."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "platform"), str(REPO / "tests")]
from raylm.runtime import free_port  # noqa: E402 - after the path setup above
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def start_ray(num_cpus: int = 4) -> None:
    """A private cluster for this run (never joins another one on the machine); token auth stays on."""
    from raylm.runtime import LOCAL, ensure_ray

    ensure_ray(LOCAL, num_cpus=num_cpus)  # exactly as raylm starts one (runtime env, Serve's high-throughput mode)


def serve_tiny_gpt2(name: str = "stress", **serve_settings) -> str:
    """Deploy the tiny GPT-2 of tests/serve_apps.py on Serve at a free port; returns the base URL."""
    from serve_apps import make_cfg, save_tiny_gpt2

    from raylm.serve import serve

    model_dir = save_tiny_gpt2(Path(tempfile.mkdtemp(prefix="raylm-stress-model-")))
    port = free_port()
    from ray import serve as ray_serve

    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    return serve(make_cfg(name, port, f"/{name}", **serve_settings), model_dir=model_dir, blocking=False)


def replica_pids(deployment: str = "ModelServer") -> list[int]:
    """PIDs of the live replica actors of one deployment (Ray's state API)."""
    import ray
    from ray.util.state import list_actors

    # this script's cluster by address: with none given, the state API refuses when another cluster runs here
    address = ray.get_runtime_context().gcs_address
    return [a.pid for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)
            if a.class_name and deployment in a.class_name and a.pid]


def rss_mib(pids: list[int]) -> float:
    import psutil

    return sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20


def wait_until(predicate, timeout_s: float, every_s: float = 0.2) -> float | None:
    """Seconds until predicate() is true, or None after timeout_s."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        try:
            if predicate():
                return time.perf_counter() - start
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(every_s)
    return None
