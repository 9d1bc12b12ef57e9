"""The interface every model backend implements, and how a model file picks its backend."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from gpserve.modelspec import ModelSpec


class Backend(Protocol):
    spec: ModelSpec

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        """Outputs in the order of ``output_names``."""


def backend_name(model_path: str) -> str:
    if model_path == "echo":
        return "echo"
    suffix = Path(model_path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    raise ValueError(f"cannot tell which backend serves {model_path!r}: expected an .onnx "
                     "file or 'echo'")


def load(backend: str, model_path: str, device: str, threads: int,
         inputs: list[str], outputs: list[str]) -> Backend:
    """Load a model in this process (workers; the supervisor to check it and read its spec)."""
    if backend == "echo":
        from .echo import EchoBackend
        return EchoBackend()
    if backend == "onnx":
        from .onnx import OnnxBackend
        return OnnxBackend(model_path, device, threads, inputs, outputs)
    raise ValueError(f"unknown backend {backend!r}")
