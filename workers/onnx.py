"""ONNX Runtime backend: CUDA when a GPU is visible to this worker, the CPU otherwise."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from gpserve.errors import InvalidString
from gpserve.modelspec import IOSpec, ModelSpec

from .devices import device_index, usable

log = logging.getLogger("gpserve.worker")

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


def as_text(name: str, strings: np.ndarray) -> np.ndarray:
    """A String input as ONNX Runtime takes it: an object array of ``str``. Its strings
    are UTF-8 text; handed a Python ``bytes`` element it stores the element's ``repr``
    (``b"hi"`` becomes ``"b'hi'"``), so every element is decoded here (1 copy of the
    strings, into new Python objects), and bytes that are not UTF-8 are the client's
    error, naming the input, rather than a garbled answer. NUL and any other UTF-8
    round-trip byte-exact (ONNX Runtime's outputs come back as ``str``, which the
    encoders write as UTF-8)."""
    flat = strings.reshape(-1)
    try:
        text = [x.decode() if type(x) is bytes else x for x in flat.tolist()]
    except UnicodeDecodeError:
        for i, x in enumerate(flat.tolist()):
            try:
                x.decode() if type(x) is bytes else x
            except UnicodeDecodeError as e:
                raise InvalidString(
                    f"input {name!r}: String element {i} is not valid UTF-8 ({e.reason} at "
                    f"byte {e.start}); this ONNX model takes its strings as UTF-8 text"
                ) from None
        raise
    out = np.empty(len(text), dtype=object)
    out[:] = text
    return out.reshape(strings.shape)


def providers_for(device: str, available: list[str], chosen_by_user: bool) -> list:
    """ONNX Runtime providers for a worker's device (see devices.usable)."""
    device = usable(device, "CUDAExecutionProvider" in available, chosen_by_user,
                    "onnxruntime has no CUDA provider")
    if not device.startswith("cuda"):       # worker_device() says cpu when no GPU is visible
        return ["CPUExecutionProvider"]
    index = device_index(device)
    # HEURISTIC: cuDNN's heuristics pick each convolution's algorithm on a session's first
    # run (0.2 s for ResNet-50 on an H200). EXHAUSTIVE, ONNX Runtime's default, times every
    # algorithm instead, and again whenever the input shape changes (0.8 s a change);
    # the worker gives each batch size a session of its own (prepare_batch_size), so
    # shapes never change within one, and at one size both ran within 6% of each other.
    # TF32 stays at ONNX Runtime's default.
    return [("CUDAExecutionProvider", {"device_id": index,
                                       "cudnn_conv_algo_search": "HEURISTIC"}),
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
        self._new_session = lambda: ort.InferenceSession(raw, opts, providers=providers)
        self.session = self._new_session()
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.per_size: dict[int, object] = {}     # batch size -> a session of its own
        self.per_size_failed = False
        ins = [_io(a) for a in self.session.get_inputs()]
        outs = [_io(a) for a in self.session.get_outputs()]
        self.text_inputs = {s.name for s in ins if s.dtype == object}
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

    def prepare_batch_size(self, rows: int) -> None:
        """On CUDA, a session of its own for each batch size the worker forms. ONNX
        Runtime's CUDA convolutions re-plan whenever their input shape changes, not once
        per shape (ResNet-50 on an H200: 165-790 ms a run with sizes alternating, 18 ms
        at one size, with either cuDNN search), so one session fed a batcher's varied
        sizes re-plans on every batch; a session per size never sees its shape change.
        The cost: the weights once per size in device memory (``--batch-sizes pow2``
        makes fewer sizes)."""
        if not (self.on_cuda and self.spec.batchable) or rows in self.per_size \
                or self.per_size_failed:
            return
        try:
            self.per_size[rows] = self._new_session()
        except Exception as e:          # device memory, most likely: keep what we have
            self.per_size_failed = True
            log.warning("no session of its own for batch size %d (%s: %s); sizes without "
                        "one share the first session, whose convolutions re-plan at each "
                        "change of size (fewer sizes: --batch-sizes pow2 or a list)",
                        rows, type(e).__name__, str(e)[:200])

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        session = self.session
        if self.per_size:
            rows = len(next(iter(inputs.values())))
            session = self.per_size.get(rows, session)   # other sizes: the first session
        if self.text_inputs:
            inputs = {name: as_text(name, arr) if name in self.text_inputs else arr
                      for name, arr in inputs.items()}
        return session.run(output_names, inputs)
