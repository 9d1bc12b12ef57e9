"""The GraphPipe messages as plain Python objects, and the tensor type table.

Numeric tensors are numpy arrays; ``String`` tensors are numpy object arrays whose
elements are ``bytes`` (``str`` elements are accepted when encoding and sent as UTF-8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

# GraphPipe's enum Type (uint8) -> little-endian numpy dtype. 12 is String.
NULL, STRING = 0, 12
TYPE_TO_DTYPE: dict[int, np.dtype] = {
    1: np.dtype("<u1"), 2: np.dtype("<i1"), 3: np.dtype("<u2"), 4: np.dtype("<i2"),
    5: np.dtype("<u4"), 6: np.dtype("<i4"), 7: np.dtype("<u8"), 8: np.dtype("<i8"),
    9: np.dtype("<f2"), 10: np.dtype("<f4"), 11: np.dtype("<f8"),
    STRING: np.dtype(object),
}
TYPE_NAMES: dict[int, str] = {
    0: "Null", 1: "Uint8", 2: "Int8", 3: "Uint16", 4: "Int16", 5: "Uint32", 6: "Int32",
    7: "Uint64", 8: "Int64", 9: "Float16", 10: "Float32", 11: "Float64", 12: "String",
}
_KIND_SIZE_TO_TYPE: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): t for t, dt in TYPE_TO_DTYPE.items() if t != STRING
}


def type_of(dtype: np.dtype) -> int:
    """GraphPipe ``Type`` for a numpy dtype; raises ``TypeError`` for dtypes GraphPipe lacks."""
    if dtype.kind in "OSU":
        return STRING
    t = _KIND_SIZE_TO_TYPE.get((dtype.kind, dtype.itemsize))
    if t is None:
        raise TypeError(
            f"numpy dtype {dtype} has no GraphPipe type; use one of uint8..uint64, "
            "int8..int64, float16/32/64, or bytes/str for String (cast bool to uint8)")
    return t


def type_name(dtype: np.dtype | None) -> str:
    """The GraphPipe type name of a dtype (``Float32``), for messages and metadata."""
    if dtype is None:
        return "Null"
    try:
        return TYPE_NAMES[type_of(dtype)]
    except TypeError:
        return str(dtype)


@dataclass
class InferRequest:
    """Run the model on ``inputs``; empty name lists mean the model's defaults, in order."""

    inputs: Sequence[np.ndarray]
    input_names: Sequence[str] = ()
    output_names: Sequence[str] = ()
    config: str = ""


@dataclass
class MetadataRequest:
    """Ask for the model's name, inputs and outputs."""


Request = Union[InferRequest, MetadataRequest]


@dataclass
class Error:
    code: int
    message: str


@dataclass
class InferResponse:
    """Either ``outputs`` (one per requested output, in order) or ``errors``."""

    outputs: list[np.ndarray] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)


@dataclass
class IOMetadata:
    """One model input or output; ``-1`` in ``shape`` means any size; ``dtype`` None is Null."""

    name: str
    shape: list[int]
    dtype: np.dtype | None
    description: str = ""


@dataclass
class MetadataResponse:
    name: str = ""
    version: str = ""
    server: str = ""
    description: str = ""
    inputs: list[IOMetadata] = field(default_factory=list)
    outputs: list[IOMetadata] = field(default_factory=list)
