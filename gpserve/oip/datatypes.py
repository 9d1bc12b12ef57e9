"""The Open Inference Protocol's tensor datatypes, and its BYTES element framing.

Every datatype the protocol defines maps to a little-endian numpy dtype; BYTES maps to
object arrays of ``bytes``, as GraphPipe's ``String`` does, so both protocols hand the
same arrays to a model. (BF16, a Triton addition, has no numpy dtype: refused by name.)
"""
from __future__ import annotations

import struct

import numpy as np

from gpserve.errors import DtypeMismatch, ProtocolError

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_NAMES = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items() if name != "BYTES"}
_LENGTH = struct.Struct("<I")


def dtype_of(datatype, where: str) -> np.dtype:
    """The numpy dtype of a protocol datatype name; a clear error for any other."""
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise DtypeMismatch(f"{where}: datatype {datatype!r} is not one gpserve serves; use "
                            f"one of {', '.join(DTYPES)}")
    return dtype


def datatype_of(dtype: np.dtype | None) -> str:
    """The protocol's name for a numpy dtype (``None``, any dtype: the echo model's,
    reported as BYTES, the one datatype every tensor can be sent as)."""
    if dtype is None or dtype.kind in "OSU":
        return "BYTES"
    name = _NAMES.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise DtypeMismatch(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return name


def decode_bytes(raw, count: int, where: str) -> np.ndarray:
    """BYTES elements as the binary extension frames them (a 4-byte little-endian length,
    then the bytes), exactly ``count`` of them filling ``raw``: an object array."""
    raw = memoryview(raw)
    out, pos, end = np.empty(count, dtype=object), 0, len(raw)
    for i in range(count):
        if pos + 4 > end:
            raise ProtocolError(f"{where}: the binary data ends after {i} of {count} BYTES "
                                "elements")
        (n,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise ProtocolError(f"{where}: BYTES element {i} says {n} bytes; only "
                                f"{end - pos} remain")
        out[i] = bytes(raw[pos:pos + n])
        pos += n
    if pos != end:
        raise ProtocolError(f"{where}: {end - pos} bytes left over after its {count} BYTES "
                            "elements")
    return out


def encode_bytes(arr: np.ndarray) -> bytes:
    """An object array of ``bytes`` (or ``str``, sent as UTF-8) in the binary framing."""
    parts = []
    for item in arr.ravel():
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(b)))
        parts.append(b)
    return b"".join(parts)
