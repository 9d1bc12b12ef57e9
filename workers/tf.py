"""TensorFlow backend: SavedModel directories and frozen GraphDefs (TF1 style).

Only worker processes import TensorFlow (and the short-lived inspector the supervisor
starts to read the model's spec); fronts never do. GPU memory grows on demand instead
of being taken whole, so several workers can share a GPU.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from gpserve.modelspec import IOSpec, ModelSpec

from .devices import device_index, usable

log = logging.getLogger("gpserve.worker.tf")


def _import_tf(threads: int, device: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:   # already initialised in this process
        pass
    return tf


def tf_device(device: str, has_gpu: bool, chosen_by_user: bool) -> str:
    """TensorFlow's name for a worker's device (see devices.usable): a GPU that
    ``--device auto`` picked becomes the CPU, with a warning, when TensorFlow sees none
    (``tensorflow-cpu``, or no CUDA libraries); one the user asked for is an error."""
    device = usable(device, has_gpu, chosen_by_user,
                    "TensorFlow sees no GPU (tensorflow-cpu, or CUDA libraries missing)")
    return f"/GPU:{device_index(device)}" if device.startswith("cuda") else "/CPU:0"


def _np_dtype(tf_dtype) -> np.dtype:
    return np.dtype(object) if tf_dtype.name == "string" else np.dtype(tf_dtype.as_numpy_dtype)


def _dims(shape) -> list[int]:
    if shape.rank is None:
        return [-1]
    return [-1 if d is None else int(d) for d in shape.as_list()]


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def _public_name(tensor_name: str) -> str:
    return tensor_name[:-2] if tensor_name.endswith(":0") else tensor_name


class SavedModelBackend:
    def __init__(self, path: str, device: str, threads: int, signature: str,
                 inputs: list[str], outputs: list[str], device_chosen_by_user: bool = True):
        tf = _import_tf(threads, device)
        self.tf = tf
        self.device = tf_device(device, bool(tf.config.list_physical_devices("GPU")),
                                device_chosen_by_user)
        self.model = tf.saved_model.load(path)
        if signature not in self.model.signatures:
            raise ValueError(f"the SavedModel has no signature {signature!r}; it has "
                             f"{sorted(self.model.signatures)} (choose with --signature)")
        self.fn = self.model.signatures[signature]
        ins = self.fn.structured_input_signature[1]
        outs = self.fn.structured_outputs
        in_specs = [IOSpec(n, _np_dtype(s.dtype), _dims(s.shape)) for n, s in sorted(ins.items())]
        out_specs = [IOSpec(n, _np_dtype(s.dtype), _dims(s.shape)) for n, s in sorted(outs.items())]
        self.spec = ModelSpec(
            name=Path(path).name, backend="tensorflow", inputs=in_specs, outputs=out_specs,
            default_inputs=inputs, default_outputs=outputs,
            batchable=ModelSpec.batch_first(in_specs, out_specs),
            description=f"TensorFlow SavedModel {Path(path).name}, signature {signature}")
        _check_names(self.spec, inputs, outputs)

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        tf = self.tf
        with tf.device(self.device):
            result = self.fn(**{n: tf.constant(a) for n, a in inputs.items()})
        return [result[n].numpy() for n in output_names]


class FrozenGraphBackend:
    def __init__(self, path: str, device: str, threads: int, inputs: list[str],
                 outputs: list[str]):
        tf = _import_tf(threads, device)
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(Path(path).read_bytes())
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        ops = graph.get_operations()
        if inputs:
            in_names = [_tensor_name(n) for n in inputs]
        else:
            in_names = [op.outputs[0].name for op in ops if op.type == "Placeholder"]
        if outputs:
            out_names = [_tensor_name(n) for n in outputs]
        else:
            consumed = {t.name for op in ops for t in op.inputs}
            out_names = [t.name for op in ops if op.type not in ("Placeholder", "Const", "NoOp",
                                                                   "Assert")
                         for t in op.outputs if t.name not in consumed]
        try:
            in_tensors = [graph.get_tensor_by_name(n) for n in in_names]
            out_tensors = [graph.get_tensor_by_name(n) for n in out_names]
        except (KeyError, ValueError) as e:
            raise ValueError(f"--inputs/--outputs name a tensor the graph lacks: {e}") from None
        if not in_tensors or not out_tensors:
            raise ValueError("could not tell the graph's inputs and outputs; name them with "
                             "--inputs and --outputs")
        if not (inputs and outputs):
            log.warning("frozen graph %s: serving inputs %s and outputs %s (override with "
                        "--inputs/--outputs)", Path(path).name,
                        [_public_name(n) for n in in_names], [_public_name(n) for n in out_names])
        cfg = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads,
                                       inter_op_parallelism_threads=1)
        cfg.gpu_options.allow_growth = True
        self.session = tf.compat.v1.Session(graph=graph, config=cfg)
        spec_of = lambda t: IOSpec(_public_name(t.name), _np_dtype(t.dtype), _dims(t.shape))
        in_specs = [spec_of(t) for t in in_tensors]
        out_specs = [spec_of(t) for t in out_tensors]
        self.feeds = {s.name: t for s, t in zip(in_specs, in_tensors)}
        self.fetches = {s.name: t for s, t in zip(out_specs, out_tensors)}
        self.spec = ModelSpec(
            name=Path(path).name.removesuffix(".pb"), backend="tensorflow", inputs=in_specs,
            outputs=out_specs, batchable=ModelSpec.batch_first(in_specs, out_specs),
            description=f"TensorFlow frozen graph {Path(path).name}")

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str],
            config: str) -> list[np.ndarray]:
        return self.session.run([self.fetches[n] for n in output_names],
                                {self.feeds[n]: a for n, a in inputs.items()})


def _check_names(spec: ModelSpec, inputs: list[str], outputs: list[str]) -> None:
    for flag, given, have in (("--inputs", inputs, spec.inputs), ("--outputs", outputs,
                                                                   spec.outputs)):
        names = {s.name for s in have}
        for n in given:
            if n not in names:
                raise ValueError(f"{flag} names {n!r}, which the model lacks; it has "
                                 f"{sorted(names)}")
