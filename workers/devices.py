"""Which device a worker runs on: GPUs visible to this process, and one GPU per worker."""
from __future__ import annotations

import os


def gpu_count() -> int:
    """NVIDIA GPUs visible here (CUDA_VISIBLE_DEVICES if set, else the driver's list)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def worker_device(device: str, index: int) -> str:
    """``cpu`` or ``cuda:N`` for worker ``index``: with ``auto``/``cuda`` and several GPUs,
    worker i takes GPU i mod count; ``auto`` is the CPU when no GPU is visible."""
    if device == "cpu" or device.startswith("cuda:"):
        return device
    count = gpu_count()
    if count == 0:
        return "cpu" if device == "auto" else "cuda:0"
    return f"cuda:{index % count}"
