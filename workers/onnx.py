"""ONNX Runtime backend: CUDA when a GPU is visible to this worker, the CPU otherwise."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from gpserve.modelspec import IOSpec, ModelSpec

from .devices import usable

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(string)": "object",
}


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _io(arg) -> IOSpec:
    kind = _ORT_TYPES.get(arg.type)
    if kind is None:
        raise ValueError(f"{arg.name}: ONNX type {arg.type} has no GraphPipe equivalent")
    return IOSpec(arg.name, np.dtype(kind), _dims(arg.shape))


def providers_for(device: str, available: list[str], chosen_by_user: bool) -> list:
    """ONNX Runtime providers for a worker's device (see devices.usable)."""
    device = usable(device, "CUDAExecutionProvider" in available, chosen_by_user,
                    "onnxruntime has no CUDA provider")
    if not device.startswith("cuda"):       # worker_device() says cpu when no GPU is visible
        return ["CPUExecutionProvider"]
    index = int(device.split(":")[1]) if ":" in device else 0
    # EXHAUSTIVE: cuDNN tries every convolution algorithm on the first run of each input
    # shape (0.6 s per shape for ResNet-50 on an H200) and keeps the fastest; the worker's
    # warm-up pays that for every batch size it forms, so no request does. TF32 stays at
    # ONNX Runtime's default.
    return [("CUDAExecutionProvider", {"device_id": index,
                                       "cudnn_conv_algo_search": "EXHAUSTIVE"}),
            "CPUExecutionProvider"]


class OnnxBackend:
    def __init__(self, path: str, device: str, threads: int, inputs: list[str],
                 outputs: list[str], device_chosen_by_user: bool = True):
        import onnxruntime as ort

        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spinning threads fight the fronts for cores; measured slower on small machines.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        providers = providers_for(device, ort.get_available_providers(), device_chosen_by_user)
        self.session = ort.InferenceSession(raw, opts, providers=providers)
        self.providers = self.session.get_providers()
        ins = [_io(a) for a in self.session.get_inputs()]
        outs = [_io(a) for a in self.session.get_outputs()]
        self.spec = ModelSpec(
            name=Path(path).name.removesuffix(".gz").removesuffix(".onnx"), backend="onnx",
            inputs=ins, outputs=outs,
            default_inputs=inputs, default_outputs=outputs,
            batchable=ModelSpec.batch_first(ins, outs),
            description=f"ONNX model {Path(path).name} on {self.providers[0]}")
        for name in inputs:
            if name not in {s.name for s in ins}:
                raise ValueError(f"--inputs names {name!r}, which the model lacks; it has "
                                 f"{[s.name for s in ins]}")
        for name in outputs:
            if name not in {s.name for s in outs}:
                raise ValueError(f"--outputs names {name!r}, which the model lacks; it has "
                                 f"{[s.name for s in outs]}")

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        return self.session.run(output_names, inputs)
