"""The built-in echo model: returns its inputs (the original ``graphpipe-echo``).

It is the reference for protocol and overhead measurements: everything but a model.
"""
from __future__ import annotations

import numpy as np

from gpserve.modelspec import IOSpec, ModelSpec


class EchoBackend:
    def __init__(self):
        self.spec = ModelSpec(
            name="echo", backend="echo", echo=True, batchable=True,
            inputs=[IOSpec("input", None, [-1])], outputs=[IOSpec("output", None, [-1])],
            description="returns its inputs; any number, any type and shape")

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        return list(inputs.values())
