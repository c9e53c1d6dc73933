"""Each training worker picks its own accelerator from what *its* node has, never from the driver.

The driver usually runs on a CPU-only head while training workers run on GPU nodes, so nothing about devices may
be decided where the job starts (no `DS_ACCELERATOR` in the runtime env). `choose_device()` runs first thing in
every worker: CUDA when this process sees a GPU (Ray Train sets CUDA_VISIBLE_DEVICES for `use_gpu` workers),
else CPU; it pins DeepSpeed's accelerator to match before DeepSpeed is first used, and returns what it chose so
the worker can report it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

DS_ACCELERATOR_ENV = "DS_ACCELERATOR"  # DeepSpeed reads it once, on its first get_accelerator()


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # torch device string: "cuda:0", "cpu"
    ds_accelerator: str  # DeepSpeed accelerator name: "cuda", "cpu"
    backend: str  # torch.distributed backend the accelerator uses: "nccl", "gloo"
    node_id: str  # the Ray node this worker runs on ("" outside Ray)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"device {self.device}, DeepSpeed accelerator {self.ds_accelerator}, backend {self.backend}, "
                f"node {self.node_id or '-'}")


def current_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - informational only
        return ""


def choose_device() -> DeviceChoice:
    """Decide this process's device and DeepSpeed accelerator from the GPUs it can see; idempotent."""
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        name, device, backend = "cuda", f"cuda:{local}", "nccl"
    else:
        name, device, backend = "cpu", "cpu", "gloo"
    # an explicit DS_ACCELERATOR set on this node (e.g. a non-CUDA accelerator) wins over the probe
    name = os.environ.setdefault(DS_ACCELERATOR_ENV, name)
    return DeviceChoice(device=device, ds_accelerator=name, backend=backend, node_id=current_node_id())
