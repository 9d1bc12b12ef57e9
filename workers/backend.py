"""The interface every model backend implements, and which backend serves a model file.

Backends: ``onnx`` (ONNX Runtime), ``tensorflow`` (SavedModel directory or frozen
GraphDef), ``torch`` (TorchScript or torch.export), ``echo``. Each imports its runtime
only when loaded, in the process that runs it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from gpserve.config import Config
from gpserve.modelspec import ModelSpec

BACKENDS = ("onnx", "tensorflow", "torch", "echo", "standin")


class Backend(Protocol):
    spec: ModelSpec

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        """Outputs in the order of ``output_names``."""

    # Optional: ``prepare_batch_size(rows)``, called by the worker's warm-up before its
    # runs of each batch size it forms (ONNX Runtime on CUDA: a session per size).


def backend_name(model_path: str) -> str:
    """Tell the backend by file type and contents: SavedModel directory, zip archive
    (TorchScript / torch.export), ONNX ModelProto or TensorFlow GraphDef protobuf."""
    if model_path == "echo":
        return "echo"
    if model_path.startswith("standin:"):
        return "standin"
    p = Path(model_path)
    if p.is_dir():
        if (p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists():
            return "tensorflow"
        raise ValueError(f"{model_path} is a directory without saved_model.pb: not a "
                         "TensorFlow SavedModel")
    if zipfile.is_zipfile(p):
        return "torch"
    with open(p, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b" or p.suffix.lower() == ".onnx":
        return "onnx"
    # Protobuf's first byte is the first field's tag: ModelProto starts with ir_version
    # (field 1, varint: 0x08); GraphDef with its nodes (field 1, length-delimited: 0x0a).
    if head[:1] == b"\x08":
        return "onnx"
    if head[:1] == b"\x0a" or p.suffix.lower() == ".pb":
        return "tensorflow"
    raise ValueError(f"cannot tell which backend serves {model_path!r}: expected an ONNX "
                     "model, a TensorFlow SavedModel or frozen graph (.pb), a TorchScript or "
                     "torch.export file, or 'echo' (or name one with --backend)")


def load(cfg: Config, device: str, threads: int) -> Backend:
    """Load the model in this process (a worker, or the supervisor's inspector)."""
    if cfg.backend == "echo":
        from .echo import EchoBackend
        return EchoBackend()
    if cfg.backend == "standin":
        from .standin import StandinBackend
        return StandinBackend(cfg.model_path)
    if cfg.backend == "onnx":
        from .onnx import OnnxBackend
        return OnnxBackend(cfg.model_path, device, threads, cfg.inputs, cfg.outputs,
                           device_chosen_by_user=cfg.device != "auto")
    if cfg.backend == "tensorflow":
        from . import tf
        if Path(cfg.model_path).is_dir():
            return tf.SavedModelBackend(cfg.model_path, device, threads, cfg.signature,
                                        cfg.inputs, cfg.outputs,
                                        device_chosen_by_user=cfg.device != "auto")
        return tf.FrozenGraphBackend(cfg.model_path, device, threads, cfg.inputs, cfg.outputs)
    if cfg.backend == "torch":
        from .torchscript import TorchBackend
        return TorchBackend(cfg.model_path, device, threads, cfg.inputs, cfg.outputs,
                            cfg.shapes, device_chosen_by_user=cfg.device != "auto")
    raise ValueError(f"unknown backend {cfg.backend!r}; expected one of {', '.join(BACKENDS)}")


def inspect(cfg: Config) -> ModelSpec:
    """The model's spec, read on the CPU (run by the supervisor in a short-lived process),
    with what the batching probe found (see batch_check.py)."""
    from .batch_check import probe
    backend = load(cfg, "cpu", 1)
    spec = backend.spec
    spec.batch_probe = probe(backend).as_dict()
    if cfg.placement == "auto" and cfg.backend == "onnx":    # all the timing decides
        spec.one_row_ms = _one_row_ms(backend)
    return spec


def _one_row_ms(backend) -> float | None:
    """The best of a few runs of one made-up row, on one CPU thread (None: not timed)."""
    import time

    from .batch_check import made_up_rows
    spec = backend.spec
    feed = made_up_rows(spec, 1) if spec.batchable else None
    if feed is None:
        return None
    outputs = [s.name for s in spec.outputs]
    best = float("inf")
    try:
        for _ in range(5):
            t0 = time.perf_counter()
            backend.run(feed, outputs, "")
            best = min(best, time.perf_counter() - t0)
    except Exception:
        return None
    return best * 1e3
