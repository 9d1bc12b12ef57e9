"""Tensors written as JSON values (the Open Inference Protocol's ``data``), checked as a
binary tensor is: element count against the shape, each value's kind against the
datatype (numpy would take ``true`` as 1 beside numbers, ``1.5`` as a float for an
integer tensor), and each number against the datatype's range.
"""
from __future__ import annotations

import numpy as np

from gpserve.errors import DtypeMismatch, ProtocolError

from .datatypes import datatype_of

MAX_DIMS = 32                 # as GraphPipe's decoder allows


_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}     # JSON values each datatype takes


def has_booleans(body, view: memoryview, end: int) -> bool:
    """Whether the JSON head holds ``true`` or ``false`` anywhere (numpy would take them as
    1 and 0 beside numbers). A body that came whole is ``bytes``: searched in place (0
    copies, memmem speed); one streamed into shared memory is copied once to search it
    (a regular expression over the view, 0 copies, was 4x slower than copy and search)."""
    text = body if isinstance(body, bytes) else bytes(view[:end])
    return text.find(b"true", 0, end) >= 0 or text.find(b"false", 0, end) >= 0


def from_json(data, dtype: np.dtype, shape: list[int], count: int,
               where: str, literals: bool = True) -> np.ndarray:
    """A tensor from JSON ``data``. ``literals``: the JSON holds ``true`` or ``false``
    somewhere, so a numeric tensor's values are checked for them one by one (numpy
    would take ``true`` as 1 beside other numbers)."""
    if not isinstance(data, list):
        data = [data]
    if dtype.kind == "O":
        flat = _flatten(data, where)
        if len(flat) != count:
            raise ProtocolError(f"{where}: 'data' has {len(flat)} elements; shape {shape} "
                                f"takes {count}")
        if not all(isinstance(s, str) for s in flat):
            raise DtypeMismatch(f"{where}: BYTES data in JSON must be strings")
        out = np.empty(count, dtype=object)
        out[:] = [s.encode() for s in flat]
        return out.reshape(shape)
    try:
        arr = np.asarray(data)
    except (ValueError, OverflowError) as e:
        raise ProtocolError(f"{where}: 'data' is not a list of numbers: {e}") from None
    if dtype.kind in "iu" and arr.dtype.kind in "fO":
        # numpy found no one integer type for them all (UINT64 values past int64's
        # range beside small ones): integers still, if every element is one
        flat = _flatten(data, where)
        if flat and all(type(v) is int for v in flat):
            info = np.iinfo(dtype)
            if min(flat) < info.min or max(flat) > info.max:
                raise ProtocolError(f"{where}: a value is out of {datatype_of(dtype)}'s "
                                    f"range [{info.min}, {info.max}]")
            arr = np.array(flat, dtype=dtype)
    if arr.size != count:
        raise ProtocolError(f"{where}: 'data' has {arr.size} elements; shape {shape} takes "
                            f"{count}")
    if arr.ndim > MAX_DIMS:
        raise ProtocolError(f"{where}: 'data' is nested deeper than {MAX_DIMS} levels")
    if literals and dtype.kind in "iuf" and arr.dtype.kind in "iuf" and any(
            type(v) is bool for v in (_flatten(data, where) if arr.ndim > 1 else data)):
        raise DtypeMismatch(f"{where}: 'data' holds true/false beside numbers; a "
                            f"{datatype_of(dtype)} tensor takes numbers")
    if count and arr.dtype.kind not in _KINDS[dtype.kind]:
        raise DtypeMismatch(f"{where}: 'data' holds {_kind_name(arr.dtype)} values; a "
                            f"{datatype_of(dtype)} tensor takes "
                            f"{'true/false' if dtype.kind == 'b' else 'numbers'}"
                            f"{' (integers)' if dtype.kind in 'iu' else ''}")
    check_range(arr, dtype, where)
    return arr.astype(dtype).reshape(shape)


def check_range(values: np.ndarray, dtype: np.dtype, where: str) -> None:
    """Numbers given wider (JSON numbers, gRPC's int32 contents) fit ``dtype``: an integer
    in its range, a finite number below its largest (FP32 3.5e38 would become inf)."""
    if not values.size:
        return
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ProtocolError(f"{where}: a value is out of {datatype_of(dtype)}'s range "
                                f"[{info.min}, {info.max}]")
    elif dtype.kind == "f" and values.dtype.itemsize > dtype.itemsize:
        largest = float(np.finfo(dtype).max)
        if np.abs(values).max() > largest:
            raise ProtocolError(f"{where}: a value is out of {datatype_of(dtype)}'s range "
                                f"(at most {largest:g} in magnitude)")


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "true/false", "i": "integer", "u": "integer", "f": "fractional",
            "U": "string", "O": "mixed"}.get(dtype.kind, str(dtype))


def _flatten(data: list, where: str, depth: int = 0) -> list:
    if depth > MAX_DIMS:
        raise ProtocolError(f"{where}: 'data' is nested deeper than {MAX_DIMS} levels")
    if not any(isinstance(x, list) for x in data):
        return data
    flat = []
    for x in data:
        flat.extend(_flatten(x, where, depth + 1) if isinstance(x, list) else [x])
    return flat
