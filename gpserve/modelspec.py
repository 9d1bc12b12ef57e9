"""What a model takes and returns, and the checks a request must pass before it is queued."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import DtypeMismatch, ShapeMismatch, UnknownInput, UnknownOutput, WrongInputCount
from .protocol.messages import IOMetadata, MetadataResponse, type_name


@dataclass
class IOSpec:
    name: str
    dtype: np.dtype | None        # None: any dtype (echo)
    shape: list[int]              # -1: any size; [] a scalar

    def describe(self) -> str:
        return f"{self.name} {type_name(self.dtype)}{self.shape}"


@dataclass
class ModelSpec:
    name: str
    backend: str
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    default_inputs: list[str] = field(default_factory=list)
    default_outputs: list[str] = field(default_factory=list)
    batchable: bool = True        # rows independent along dim 0, every input and output
    echo: bool = False            # any inputs; outputs are the inputs
    description: str = ""
    batch_probe: dict | None = None   # workers/batch_check.py: does batching change answers?
    one_row_ms: float | None = None   # one made-up row, timed at load (for --placement auto)

    def __post_init__(self):
        self._inputs = {s.name: s for s in self.inputs}
        self._outputs = {s.name: s for s in self.outputs}
        self.default_inputs = self.default_inputs or [s.name for s in self.inputs]
        self.default_outputs = self.default_outputs or [s.name for s in self.outputs]

    @staticmethod
    def batch_first(inputs: list[IOSpec], outputs: list[IOSpec]) -> bool:
        """Batchable when every input and output has a dynamic first dimension."""
        return all(s.shape and s.shape[0] == -1 for s in inputs + outputs)

    def metadata(self, server: str, version: str) -> MetadataResponse:
        io = lambda specs: [IOMetadata(s.name, list(s.shape), s.dtype) for s in specs]
        return MetadataResponse(name=self.name, version=version, server=server,
                                description=self.description, inputs=io(self.inputs),
                                outputs=io(self.outputs))

    def check(self, tensors: list[np.ndarray], input_names: list[str],
              output_names: list[str]) -> tuple[Sequence[str], Sequence[str], int | None]:
        """Validate a request; returns (input names, output names, rows or None to run alone)."""
        if self.echo:
            return self._check_echo(tensors, input_names, output_names)
        if input_names:
            if len(input_names) != len(tensors):
                raise WrongInputCount(
                    f"{len(input_names)} input names for {len(tensors)} tensors; "
                    "give one name per tensor, or none to use the default inputs in order")
            for n in input_names:
                if n not in self._inputs:
                    raise UnknownInput(f"unknown input {n!r}; the model's inputs are "
                                       f"{', '.join(s.describe() for s in self.inputs)}")
            missing = [n for n in self._inputs if n not in input_names]
            if missing or len(set(input_names)) != len(input_names):
                raise WrongInputCount(
                    f"inputs {input_names} do not match the model's inputs "
                    f"{[s.name for s in self.inputs]} (each exactly once)")
        else:
            input_names = self.default_inputs
            if len(tensors) != len(input_names):
                raise WrongInputCount(
                    f"the request has {len(tensors)} tensors and no input names; the model "
                    f"takes {len(input_names)}: {', '.join(input_names)}")
        for n in output_names:
            if n not in self._outputs:
                raise UnknownOutput(f"unknown output {n!r}; the model's outputs are "
                                    f"{', '.join(s.describe() for s in self.outputs)}")
        output_names = output_names or self.default_outputs

        rows = None
        for name, arr in zip(input_names, tensors):
            spec = self._inputs[name]
            if spec.dtype is not None and arr.dtype != spec.dtype:
                raise DtypeMismatch(f"input {name!r} is {type_name(arr.dtype)}; the model "
                                    f"takes {type_name(spec.dtype)}")
            if len(arr.shape) != len(spec.shape) or any(
                    want not in (-1, got) for want, got in zip(spec.shape, arr.shape)):
                raise ShapeMismatch(f"input {name!r} has shape {list(arr.shape)}; the model "
                                    f"takes {spec.shape} (-1: any size)")
            if self.batchable:
                if rows is None:
                    rows = arr.shape[0]
                elif arr.shape[0] != rows:
                    raise ShapeMismatch(
                        f"inputs disagree on the batch size (dimension 0): input {name!r} "
                        f"has {arr.shape[0]} rows, an earlier input {rows}")
        return input_names, output_names, rows

    def _check_echo(self, tensors, input_names, output_names):
        if input_names and len(input_names) != len(tensors):
            raise WrongInputCount(f"{len(input_names)} input names for {len(tensors)} tensors")
        if not tensors:
            raise WrongInputCount("the echo model needs at least one input tensor")
        names = input_names or _echo_names("input", len(tensors))
        outs = output_names or _echo_names("output", len(tensors))
        if len(outs) != len(tensors):
            raise UnknownOutput(f"the echo model returns its {len(tensors)} inputs; "
                                f"{len(outs)} output names were asked for")
        rows = tensors[0].shape[0] if tensors[0].ndim else None    # all the same, or None
        for a in tensors:
            if not a.ndim or a.shape[0] != rows:
                rows = None
                break
        return names, outs, rows


@functools.lru_cache(maxsize=64)
def _echo_names(stem: str, count: int) -> tuple[str, ...]:
    """Echo's default names of ``count`` tensors: ``input``, ``input1``, ... (made once:
    a tuple, which no caller can change)."""
    return tuple(f"{stem}{i}" if i else stem for i in range(count))
