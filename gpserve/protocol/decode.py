"""Validating, zero-copy decoder for GraphPipe messages.

(Over 350 lines on purpose: the reader and the layout shortcut for repeated requests,
``_Layout``, rest on the same bounds checks; one module keeps every check in one place.)

Every offset, vector length, union tag, string and data length is checked against
the buffer before it is used; any violation raises :class:`ProtocolError`, and no
other exception escapes. Numeric tensors come back as numpy arrays that *view* the
received buffer (0 copies); the one exception is data that is misaligned for its
dtype, which is copied once so that kernels downstream get aligned memory.

Limits on untrusted input (each violation is a ``ProtocolError``):
- at most ``MAX_TENSORS`` tensors and names per list, rank at most ``MAX_RANK``;
- every dimension is non-negative and the element count (ignoring zero dimensions)
  is below 2**48;
- no dimension is larger than the message: a tensor that holds data cannot have one,
  and a tensor with no elements must not either, or ``[1e11, 3, 0, 192]`` in 152 bytes
  would claim 1e11 rows for any per-row work downstream;
- tensor data and string bytes together can never exceed the message's own size, and
  each String element costs ``STRING_OVERHEAD`` bytes besides its own, so aliased
  offsets (many entries pointing at one string, even an empty one) cannot amplify
  memory or time: an honest String element takes at least that much of the message;
- at most ``max_strings`` String elements in all (a caller's limit: each becomes a
  Python object), checked before any element is read.
"""
from __future__ import annotations

import struct
from typing import NoReturn

import numpy as np

from ..errors import ProtocolError, UnsupportedRequest
from .messages import (
    NULL,
    STRING,
    TYPE_NAMES,
    TYPE_TO_DTYPE,
    Error,
    InferRequest,
    InferResponse,
    IOMetadata,
    MetadataRequest,
    MetadataResponse,
)

MAX_TENSORS = 4096
MAX_RANK = 32
MAX_ELEMENTS = 1 << 48
STRING_OVERHEAD = 8      # an element's offset (4) and length prefix (4) in the message

_u8 = struct.Struct("<B").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_i64 = struct.Struct("<q").unpack_from
_u16x2 = struct.Struct("<HH").unpack_from
_u16 = struct.Struct("<H").unpack_from
_EMPTY_SHAPE: tuple[int, ...] = ()


def _bytes_like(buf) -> bytes | memoryview:
    """``buf`` as bytes, or a flat memoryview of bytes (the decoder's one buffer type)."""
    if isinstance(buf, bytes):
        return buf
    try:
        view = memoryview(buf)
    except TypeError:
        raise ProtocolError(
            f"expected a bytes-like message, got {type(buf).__name__}") from None
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _Reader:
    """Bounds-checked access to FlatBuffers tables, vectors and strings in one buffer."""

    __slots__ = ("buf", "n", "budget", "strings_left", "strings_limit", "read", "data")

    def __init__(self, buf, max_strings: int | None = None, why: str = "",
                 record: bool = False):
        buf = _bytes_like(buf)
        self.buf = buf
        self.n = len(buf)
        # Tensor data and string bytes may add up to at most the message size.
        self.budget = self.n
        self.strings_left = max_strings
        self.strings_limit = (max_strings, why)
        # With ``record``: every byte range read for the message's structure, and each
        # tensor's data range (None once a String tensor makes the layout unusable).
        self.read: list[tuple[int, int]] | None = [] if record else None
        self.data: list[tuple[int, int]] | None = [] if record else None

    def fail(self, what: str, problem: str) -> NoReturn:
        raise ProtocolError(f"malformed GraphPipe message ({self.n} bytes): {what}: {problem}")

    def spend(self, nbytes: int, what: str) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            self.fail(what, "tensor data and strings add up to more bytes than the message "
                            "holds (offsets that alias one another)")

    def root(self, what: str) -> tuple:
        if self.n < 8:
            self.fail(what, "too short to hold a root table (need at least 8 bytes)")
        if self.read is not None:
            self.read.append((0, 4))
        return self.table(_u32(self.buf, 0)[0], what)

    def table(self, pos: int, what: str) -> tuple:
        """(position, vtable position, vtable size, table size), all checked."""
        n = self.n
        if pos + 4 > n:
            self.fail(what, f"table offset {pos} is past the end")
        vt = pos - _i32(self.buf, pos)[0]
        if vt < 0 or vt + 4 > n:
            self.fail(what, f"vtable offset {vt} is outside the message")
        vtsize, tsize = _u16x2(self.buf, vt)
        if vtsize < 4 or vtsize & 1 or vt + vtsize > n:
            self.fail(what, f"vtable size {vtsize} is invalid or runs past the end")
        if tsize < 4 or pos + tsize > n:
            self.fail(what, f"table size {tsize} is invalid or runs past the end")
        if self.read is not None:
            self.read += ((vt, vt + vtsize), (pos, pos + tsize))
        return pos, vt, vtsize, tsize

    def field(self, table: tuple, slot: int, size: int, what: str) -> int:
        """Absolute position of a field, or 0 when the field is absent."""
        pos, vt, vtsize, tsize = table
        entry = 4 + 2 * slot
        if entry >= vtsize:
            return 0
        voff = _u16(self.buf, vt + entry)[0]
        if voff == 0:
            return 0
        if voff < 4 or voff + size > tsize:
            self.fail(what, f"field at table offset {voff} lies outside its {tsize}-byte table")
        return pos + voff

    def u8_field(self, table: tuple, slot: int, what: str) -> int:
        at = self.field(table, slot, 1, what)
        return _u8(self.buf, at)[0] if at else 0

    def i64_field(self, table: tuple, slot: int, what: str) -> int:
        at = self.field(table, slot, 8, what)
        return _i64(self.buf, at)[0] if at else 0

    def follow(self, at: int, what: str) -> int:
        """Target of the uoffset stored at ``at`` (uoffsets point forward)."""
        target = at + _u32(self.buf, at)[0]
        if target + 4 > self.n:
            self.fail(what, f"offset points to byte {target}, past the end")
        return target

    def offset_field(self, table: tuple, slot: int, what: str) -> int:
        at = self.field(table, slot, 4, what)
        return self.follow(at, what) if at else 0

    def vector(self, pos: int, elem_size: int, what: str,
               holds_data: bool = False) -> tuple[int, int]:
        """(start of elements, element count) of the vector at ``pos``; ``holds_data``:
        its elements are a tensor's data, not structure."""
        count = _u32(self.buf, pos)[0]
        start = pos + 4
        if count * elem_size > self.n - start:
            self.fail(what, f"vector of {count} elements x {elem_size} bytes runs past the end")
        if self.read is not None:
            self.read.append((pos, start if holds_data else start + count * elem_size))
        return start, count

    def raw_string(self, pos: int, what: str) -> bytes:
        start, length = self.vector(pos, 1, what)
        self.spend(length, what)
        return bytes(self.buf[start:start + length])

    def text(self, pos: int, what: str) -> str:
        raw = self.raw_string(pos, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(what, f"string is not valid UTF-8 ({e.reason} at byte {e.start})")

    def text_field(self, table: tuple, slot: int, what: str) -> str:
        pos = self.offset_field(table, slot, what)
        return self.text(pos, what) if pos else ""

    def element_positions(self, table: tuple, slot: int, what: str,
                          limit: int | None = MAX_TENSORS) -> list[int]:
        """Targets of a vector of offsets (tables or strings); [] when absent."""
        pos = self.offset_field(table, slot, what)
        if not pos:
            return []
        start, count = self.vector(pos, 4, what)
        if limit is not None and count > limit:
            self.fail(what, f"{count} entries; at most {limit} are allowed")
        follow = self.follow
        return [follow(start + 4 * i, what) for i in range(count)]

    def text_vector(self, table: tuple, slot: int, what: str) -> list[str]:
        return [self.text(p, what) for p in self.element_positions(table, slot, what)]

    def shape(self, table: tuple, slot: int, what: str) -> tuple[int, ...]:
        pos = self.offset_field(table, slot, what)
        if not pos:
            return _EMPTY_SHAPE
        start, rank = self.vector(pos, 8, what)
        if rank > MAX_RANK:
            self.fail(what, f"rank {rank} exceeds the maximum of {MAX_RANK}")
        return struct.unpack_from(f"<{rank}q", self.buf, start)

    def tensor(self, pos: int, what: str) -> np.ndarray:
        table = self.table(pos, what)
        ttype = self.u8_field(table, 0, what)
        shape = self.shape(table, 1, what)
        count = 1
        for dim in shape:
            if dim < 0:
                self.fail(what, f"shape {list(shape)} has a negative dimension")
            if dim:
                count *= dim
                if count >= MAX_ELEMENTS:
                    self.fail(what, f"shape {list(shape)} has too many elements")
        if 0 in shape:
            count = 0
            if max(shape) > self.n:
                self.fail(what, f"shape {list(shape)} has no elements but a dimension larger "
                                f"than the message itself")
        data_pos = self.offset_field(table, 2, what)
        data_start, data_len = self.vector(data_pos, 1, what, True) if data_pos else (0, 0)
        if self.data is not None:
            self.data.append((data_start, data_len))

        if ttype == STRING:
            if data_len:
                self.fail(what, f"String tensor carries {data_len} bytes of numeric data")
            return self.strings(table, shape, count, what)
        return self.numeric(table, ttype, shape, count, data_start, data_len, what)

    def strings(self, table: tuple, shape: tuple[int, ...], count: int,
                what: str) -> np.ndarray:
        """A String tensor's elements (bytes objects), within the request's bound."""
        self.data = None                    # its elements are structure: no layout
        if self.strings_left is not None:
            self.strings_left -= count
            if self.strings_left < 0:
                limit, why = self.strings_limit
                raise ProtocolError(
                    f"{what}: a String tensor of shape {list(shape)} takes the request "
                    f"to more String elements than this server takes in one request "
                    f"({limit}{': ' + why if why else ''})")
        self.spend(STRING_OVERHEAD * count, what)
        strings = self.element_positions(table, 3, what, limit=None)
        if len(strings) != count:
            self.fail(what, f"String tensor of shape {list(shape)} needs {count} strings, "
                            f"has {len(strings)}")
        out = np.empty(count, dtype=object)
        out[:] = [self.raw_string(p, what) for p in strings]
        return out.reshape(shape)

    def numeric(self, table: tuple, ttype: int, shape: tuple[int, ...], count: int,
                data_start: int, data_len: int, what: str) -> np.ndarray:
        """A numeric tensor: a view of its data in the message (0 copies)."""
        dtype = TYPE_TO_DTYPE.get(ttype)
        if dtype is None or ttype == NULL:
            self.fail(what, f"tensor type {ttype} ({TYPE_NAMES.get(ttype, 'unknown')}) is not "
                            "a valid tensor type (expected 1..12, Uint8..String)")
        strings_pos = self.offset_field(table, 3, what)
        if strings_pos and self.vector(strings_pos, 4, what)[1]:
            self.fail(what, f"{TYPE_NAMES[ttype]} tensor carries string_val entries")
        expected = count * dtype.itemsize
        if data_len != expected:
            self.fail(what, f"{TYPE_NAMES[ttype]} tensor of shape {list(shape)} needs "
                            f"{expected} data bytes, has {data_len}")
        if count == 0:
            return np.empty(shape, dtype=dtype)
        self.spend(data_len, what)
        arr = np.frombuffer(self.buf, dtype, count, data_start)  # a view: 0 copies
        if not arr.flags.aligned:
            arr = arr.copy()  # the only copy: data misaligned for its dtype
        return arr.reshape(shape)

    def tensors(self, table: tuple, slot: int, what: str) -> list[np.ndarray]:
        return [self.tensor(p, f"{what}[{i}]")
                for i, p in enumerate(self.element_positions(table, slot, what))]

    def io_metadata(self, pos: int, what: str) -> IOMetadata:
        table = self.table(pos, what)
        ttype = self.u8_field(table, 3, what)
        if ttype not in TYPE_NAMES:
            self.fail(what, f"type {ttype} is not a GraphPipe type")
        pos_shape = self.offset_field(table, 2, what)
        shape: list[int] = []
        if pos_shape:
            start, rank = self.vector(pos_shape, 8, what)
            if rank > MAX_RANK:
                self.fail(what, f"rank {rank} exceeds the maximum of {MAX_RANK}")
            shape = list(struct.unpack_from(f"<{rank}q", self.buf, start))
        return IOMetadata(
            name=self.text_field(table, 0, what), shape=shape,
            dtype=None if ttype == NULL else TYPE_TO_DTYPE[ttype],
            description=self.text_field(table, 1, what))


def decode_request(buf, max_strings: int | None = None,
                   why: str = "") -> InferRequest | MetadataRequest:
    """Decode a GraphPipe ``Request``; numeric input tensors view ``buf``. ``max_strings``
    bounds the String elements of all its tensors together (None: only by size), checked
    before any is read; ``why`` explains the limit in the error.

    A request laid out as one decoded before (see :class:`_Layout`) is answered from
    that layout: its structure was validated then, and is the same now."""
    buf = _bytes_like(buf)
    key = _layout_key(buf)
    layout = _LAYOUTS.get(key)
    if layout is not None:
        req = layout.apply(buf)
        if req is not None:
            return req
    r = _Reader(buf, max_strings, why, record=True)
    root = r.root("Request")
    tag = r.u8_field(root, 0, "Request.req_type")
    if tag == 2:
        return MetadataRequest()
    if tag != 1:
        raise UnsupportedRequest(
            f"Request.req_type is {tag}; expected 1 (InferRequest) or 2 (MetadataRequest)")
    pos = r.offset_field(root, 1, "Request.req")
    if not pos:
        r.fail("Request.req", "req_type is InferRequest but the request table is missing")
    table = r.table(pos, "InferRequest")
    req = InferRequest(
        config=r.text_field(table, 0, "InferRequest.config"),
        input_names=r.text_vector(table, 1, "InferRequest.input_names"),
        inputs=r.tensors(table, 2, "InferRequest.input_tensors"),
        output_names=r.text_vector(table, 3, "InferRequest.output_names"),
    )
    layout = _Layout.of(r, req)
    if layout is not None:
        if len(_LAYOUTS) >= MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return req


MAX_LAYOUTS = 256
MAX_LAYOUT_BYTES = 4096       # a layout's structure bytes kept, at most


def _layout_key(buf) -> tuple:
    return len(buf), bytes(buf[:16])


class _Layout:
    """What a decoded request's bytes determine, apart from its tensors' data.

    The decoder's every decision (offsets, lengths, types, shapes, names, each check)
    comes from the bytes it read for structure. When those never overlap a tensor's
    data, a message equal to this one outside the data ranges decodes to the same
    request with other data: the same reads find the same bytes. So a request whose
    structure bytes match one decoded before is built from this, after comparing
    those bytes (a few hundred bytes, compared in C), without the Python-level walk:
    a third of the time of a [1,16] request. Not kept: requests with String tensors
    (their elements are read as structure), structure that overlaps data, or more
    than MAX_LAYOUT_BYTES of structure."""

    __slots__ = ("n", "fixed", "tensors", "config", "input_names", "output_names")
    n: int
    fixed: list[tuple[int, int, bytes]]          # structure: (start, end, its bytes)
    tensors: list[tuple[int, np.dtype, int, tuple[int, ...]]]   # (start, dtype, size, shape)
    config: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @classmethod
    def of(cls, r: _Reader, req: InferRequest) -> "_Layout | None":
        if r.data is None or r.read is None or len(r.data) != len(req.inputs):
            return None
        data = sorted((s, s + n) for s, n in r.data if n)
        for a, b in r.read:
            for s, e in data:
                if a < e and s < b:
                    return None                   # structure read inside data
        fixed, at = [], 0
        for s, e in data:
            if s > at:
                fixed.append((at, s))
            at = max(at, e)
        if at < r.n:
            fixed.append((at, r.n))
        if sum(e - s for s, e in fixed) > MAX_LAYOUT_BYTES:
            return None
        layout = cls()
        layout.n = r.n
        layout.fixed = [(s, e, bytes(r.buf[s:e])) for s, e in fixed]
        layout.tensors = [(start, arr.dtype, arr.size, arr.shape)
                          for (start, _), arr in zip(r.data, req.inputs)]
        layout.config = req.config
        layout.input_names = tuple(req.input_names)
        layout.output_names = tuple(req.output_names)
        return layout

    def apply(self, buf) -> InferRequest | None:
        """The request ``buf`` holds, if it is laid out as this one; else None."""
        if len(buf) != self.n:
            return None
        for s, e, raw in self.fixed:
            if buf[s:e] != raw:
                return None
        inputs = []
        for start, dtype, count, shape in self.tensors:
            if not count:
                inputs.append(np.empty(shape, dtype=dtype))
                continue
            arr = np.frombuffer(buf, dtype, count, start)            # a view: 0 copies
            if not arr.flags.aligned:
                arr = arr.copy()                # as the decoder does: misaligned data
            inputs.append(arr.reshape(shape))
        return InferRequest(inputs=inputs, input_names=list(self.input_names),
                            output_names=list(self.output_names), config=self.config)


_LAYOUTS: dict[tuple, _Layout] = {}


def decode_response(buf) -> InferResponse:
    """Decode an ``InferResponse``; numeric output tensors view ``buf``."""
    r = _Reader(buf)
    root = r.root("InferResponse")
    outputs = r.tensors(root, 0, "InferResponse.output_tensors")
    errors = []
    for p in r.element_positions(root, 1, "InferResponse.errors"):
        table = r.table(p, "InferResponse.errors")
        errors.append(Error(code=r.i64_field(table, 0, "Error.code"),
                            message=r.text_field(table, 1, "Error.message")))
    return InferResponse(outputs=outputs, errors=errors)


def decode_metadata_response(buf) -> MetadataResponse:
    """Decode a ``MetadataResponse``."""
    r = _Reader(buf)
    root = r.root("MetadataResponse")
    return MetadataResponse(
        name=r.text_field(root, 0, "MetadataResponse.name"),
        version=r.text_field(root, 1, "MetadataResponse.version"),
        server=r.text_field(root, 2, "MetadataResponse.server"),
        description=r.text_field(root, 3, "MetadataResponse.description"),
        inputs=[r.io_metadata(p, "MetadataResponse.inputs")
                for p in r.element_positions(root, 4, "MetadataResponse.inputs")],
        outputs=[r.io_metadata(p, "MetadataResponse.outputs")
                 for p in r.element_positions(root, 5, "MetadataResponse.outputs")],
    )
