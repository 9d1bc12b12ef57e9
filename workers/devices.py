"""Which device a worker runs on: GPUs visible to this process, and one GPU per worker."""
from __future__ import annotations

import logging
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


def device_index(device: str) -> int:
    """The N of ``cuda:N`` (0 for ``cuda``): the one place a device name is parsed."""
    return int(device.split(":")[1]) if ":" in device else 0


def usable(device: str, runtime_has_cuda: bool, chosen_by_user: bool, why_not: str) -> str:
    """The device a backend really uses: a GPU that ``--device auto`` picked (one is
    visible) becomes the CPU, with a warning, when the runtime cannot use CUDA (a
    CPU-only package; ``why_not`` says so, e.g. "PyTorch cannot use CUDA"); a GPU the
    user asked for is then an error."""
    if not device.startswith("cuda") or runtime_has_cuda:
        return device
    if chosen_by_user:
        raise ValueError(f"--device {device}: this {why_not}")
    logging.getLogger("gpserve.worker").warning(
        "a GPU is visible but this %s: running on the CPU", why_not)
    return "cpu"


def worker_device(device: str, index: int) -> str:
    """``cpu`` or ``cuda:N`` for worker ``index``: with ``auto``/``cuda`` and several GPUs,
    worker i takes GPU i mod count; ``auto`` is the CPU when no GPU is visible."""
    if device == "cpu" or device.startswith("cuda:"):
        return device
    count = gpu_count()
    if count == 0:
        return "cpu" if device == "auto" else "cuda:0"
    return f"cuda:{index % count}"
