"""A stand-in for a GPU model, for benchmarks on any machine (``--model standin:A,B``).

A batch of n rows costs ``A + B*n`` milliseconds of wall time during which the GIL is
released (as a runtime's kernel launch and device sync release it), and its inputs are
copied in and its outputs out as to and from a device. The fixed cost ``A`` is what
makes batching pay on a GPU; on a CPU model it is small. ``perf/standin.py`` serves it
and compares with its ideal rows/s. Input ``x`` float32 [-1, 16], output ``y`` the same.
"""
from __future__ import annotations

import time

import numpy as np

from gpserve.modelspec import IOSpec, ModelSpec

PREFIX = "standin:"


def parse(model: str) -> tuple[float, float]:
    """``standin:8,0.05`` -> (0.008, 0.00005) seconds: fixed, and per row."""
    try:
        fixed, per_row = (float(v) for v in model[len(PREFIX):].split(","))
    except ValueError:
        raise ValueError(f"--model {model!r}: expected standin:FIXED_MS,PER_ROW_MS, e.g. "
                         "standin:8,0.05") from None
    if fixed < 0 or per_row < 0:
        raise ValueError(f"--model {model!r}: costs must not be negative")
    return fixed / 1e3, per_row / 1e3


class StandinBackend:
    def __init__(self, model: str):
        self.fixed_s, self.per_row_s = parse(model)
        self.spec = ModelSpec(
            name="standin", backend="standin", batchable=True,
            inputs=[IOSpec("x", np.dtype(np.float32), [-1, 16])],
            outputs=[IOSpec("y", np.dtype(np.float32), [-1, 16])],
            description=f"a stand-in costing {self.fixed_s * 1e3:g} ms + "
                        f"{self.per_row_s * 1e3:g} ms per row")

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        x = inputs["x"]
        on_device = np.array(x, copy=True)                  # "host to device"
        time.sleep(self.fixed_s + self.per_row_s * len(x))  # the kernels; no GIL held
        return [on_device * 2.0]                            # "device to host"
