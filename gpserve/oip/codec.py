"""Open Inference Protocol (KServe v2) inference messages over HTTP: JSON tensors and the
binary data extension, to and from the arrays every protocol of gpserve hands a model.

A request body is a JSON header, then (binary extension) the raw bytes of each input
with a ``binary_data_size``, in input order; the header's length comes in the
``Inference-Header-Content-Length`` HTTP header. Copies of tensor bytes: binary inputs
are views of the body (0 copies; the body sits in shared memory when it streamed in,
see :class:`gpserve.body.BodyReader`); JSON inputs are parsed into new arrays. Outputs:
1 copy into the response body, as GraphPipe's encoder makes.

Like GraphPipe's decoder, this trusts nothing: every shape, size and datatype is
checked against the body before an array is made, and every failure names the tensor.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import orjson

from gpserve.errors import BadConfig, DtypeMismatch, ProtocolError, UnknownOutput

from . import header_cache
from .datatypes import DTYPES, datatype_of, decode_bytes, dtype_of, encode_bytes
from .json_tensors import MAX_DIMS, from_json, has_booleans


class InferCall(NamedTuple):
    """An inference request, decoded: what :meth:`FrontState.run` takes, and how to answer."""

    id: str | None
    tensors: list[np.ndarray]
    input_names: list[str]
    output_names: list[str]       # empty: the model's default outputs
    binary: dict[str, bool]       # per requested output: answer in binary?
    binary_default: bool          # for outputs not named (``binary_data_output``)
    config: str                   # gpserve's request options, as GraphPipe's config
    to_regions: dict[str, tuple]  # output -> (region, offset, byte size): system shm


def decode_infer(body, header_length: int | None, max_strings: int, why: str,
                 read_region=None) -> InferCall:
    """Decode an infer request's body (``header_length`` None: all JSON).
    ``read_region(region, offset, nbytes, where)``: the bytes of an input sent by
    reference to a client's shared-memory region (see :mod:`gpserve.oip.sharedmem`)."""
    view = memoryview(body)
    plan = header_cache.planned(view, header_length)
    if plan is not None:
        c = plan.call
        return InferCall(c.id, plan.tensors(view), list(c.input_names), list(c.output_names),
                         c.binary, c.binary_default, c.config, {})
    call = _decode(view, body, header_length, max_strings, why, read_region)
    header_cache.keep(call, view, header_length)
    return call


def _decode(view: memoryview, body, header_length: int | None, max_strings: int, why: str,
            read_region) -> InferCall:
    head, header_length = _head(view, header_length)
    params = _object(head.get("parameters"), "the request's 'parameters'")
    tensors, names = _inputs(head, body, view, header_length, max_strings, why, read_region)
    binary_default = _flag(params.get("binary_data_output", False), "binary_data_output")
    output_names, binary, to_regions = _outputs(head, binary_default)
    return InferCall(head.get("id"), tensors, names, output_names, binary, binary_default,
                     request_config(params), to_regions)


def _head(view: memoryview, header_length: int | None) -> tuple[dict, int]:
    """The request's JSON (checked to be an object with a string 'id', if any) and its
    length."""
    size = len(view)
    if header_length is None:
        header_length = size
    elif not 0 < header_length <= size:
        raise ProtocolError(f"Inference-Header-Content-Length {header_length} does not fit "
                            f"the body of {size} bytes")
    try:
        head = orjson.loads(view[:header_length])
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"the request's JSON is malformed: {e}") from None
    if not isinstance(head, dict):
        raise ProtocolError("the request's JSON must be an object with an 'inputs' list")
    req_id = head.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ProtocolError(f"'id' must be a string, not {type(req_id).__name__}")
    return head, header_length


def _inputs(head: dict, body, view: memoryview, header_length: int, max_strings: int,
            why: str, read_region) -> tuple[list[np.ndarray], list[str]]:
    """The input tensors (from JSON, from the binary data after the JSON, or from a
    client's shared memory) and their names; every binary byte must be an input's."""
    size = len(view)
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs 'inputs': a non-empty list of tensors")
    tensors, names = [], []
    pos, strings_left = header_length, max_strings
    literals = None        # whether the JSON has true/false anywhere (looked for once)
    for k, spec in enumerate(inputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f"input {k} must be an object with a 'name'")
        name = spec["name"]
        where = f"input {name!r}"
        dtype = dtype_of(spec.get("datatype"), where)
        shape = shape_of(spec.get("shape"), where, size)
        count = math.prod(shape)
        p = _object(spec.get("parameters"), f"{where}'s 'parameters'")
        strings_left = count_strings(strings_left, dtype, shape, where, max_strings, why)
        nbytes = p.get("binary_data_size")
        if "shared_memory_region" in p:
            if "data" in spec or nbytes is not None:
                raise ProtocolError(f"{where} names a shared-memory region and also "
                                    "carries data")
            if read_region is None:
                raise ProtocolError(f"{where}: shared-memory inputs are not served here")
            raw = read_region(p["shared_memory_region"], p.get("shared_memory_offset", 0),
                              p.get("shared_memory_byte_size"), where)
            arr = from_raw(raw, dtype, shape, count, where)
        elif nbytes is not None:
            if "data" in spec:
                raise ProtocolError(f"{where} has both 'data' and 'binary_data_size'")
            if type(nbytes) is not int or nbytes < 0 or pos + nbytes > size:
                raise ProtocolError(f"{where}: binary_data_size {nbytes!r} does not fit the "
                                    f"{size - pos} bytes left in the body")
            raw = view[pos:pos + nbytes]
            pos += nbytes
            arr = from_raw(raw, dtype, shape, count, where)
        elif "data" in spec:
            if literals is None and dtype.kind in "iuf":
                literals = has_booleans(body, view, header_length)
            arr = from_json(spec["data"], dtype, shape, count, where, bool(literals))
        else:
            raise ProtocolError(f"{where} has neither 'data' nor 'binary_data_size'")
        tensors.append(arr)
        names.append(name)
    if pos != size:
        raise ProtocolError(f"the body has {size - pos} bytes after its inputs' binary data "
                            f"(header {header_length} bytes + binary_data_size of the inputs)")
    return tensors, names


def _outputs(head: dict, binary_default: bool) -> tuple[list[str], dict, dict]:
    """The outputs asked for, whether each comes as binary data, and those to write
    into a client's shared-memory region."""
    output_names: list[str] = []
    binary: dict[str, bool] = {}
    to_regions: dict[str, tuple] = {}
    for k, spec in enumerate(_list(head.get("outputs"), "'outputs'")):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f"requested output {k} must be an object with a 'name'")
        p = _object(spec.get("parameters"), f"output {spec['name']!r}'s 'parameters'")
        if "shared_memory_region" in p:
            to_regions[spec["name"]] = (p["shared_memory_region"],
                                        p.get("shared_memory_offset", 0),
                                        p.get("shared_memory_byte_size"))
        if "classification" in p:
            raise UnknownOutput(f"output {spec['name']!r}: the classification extension is "
                                "not served; ask for the output itself")
        output_names.append(spec["name"])
        binary[spec["name"]] = _flag(p.get("binary_data", binary_default), "binary_data")
    return output_names, binary, to_regions


def encode_infer(model: str, version: str, call: InferCall, names: list[str],
                 arrays: list[np.ndarray], write_region=None) -> tuple[bytes, int | None]:
    """The response body, and its JSON header's length when binary outputs follow it.
    ``write_region(region, offset, nbytes, data, where)`` writes an output asked for in
    a client's shared-memory region."""
    if not call.to_regions:
        header = header_cache.answer_header(model, version, call, names, arrays)
        if header is not None:
            return b"".join([header, *map(raw_bytes, arrays)]), len(header)  # 1 copy each
    outputs, blobs = [], []
    for name, arr in zip(names, arrays):
        out: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype),
                               "shape": list(arr.shape)}
        if name in call.to_regions:
            region, offset, nbytes = call.to_regions[name]
            data = raw_bytes(arr)
            write_region(region, offset, nbytes, data, f"output {name!r}")     # 1 copy
            out["parameters"] = {"shared_memory_region": region,
                                 "shared_memory_byte_size": len(data)}
        elif call.binary.get(name, call.binary_default):
            blob = raw_bytes(arr)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif arr.dtype == object:
            try:
                out["data"] = [b.decode() if isinstance(b, bytes) else b for b in arr.ravel()]
            except UnicodeDecodeError:
                raise DtypeMismatch(f"output {name!r} holds bytes that are not UTF-8, which "
                                    "JSON cannot carry; ask for it with binary_data") from None
        else:
            out["data"] = np.ascontiguousarray(arr).reshape(-1)
        outputs.append(out)
    head = {"model_name": model, "model_version": version, "outputs": outputs}
    if call.id is not None:
        head["id"] = call.id
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)          # 1 copy of each output


def raw_bytes(arr: np.ndarray) -> memoryview | bytes:
    """A tensor's bytes as the binary extension sends them (no copy when contiguous)."""
    if arr.dtype.kind == "O":
        return encode_bytes(arr)
    return memoryview(np.ascontiguousarray(arr)).cast("B")  # type: ignore[arg-type]  # ndarray exports the buffer protocol (no 3.11 stub)


def count_strings(left: int, dtype: np.dtype, shape: list[int], where: str,
                  max_strings: int, why: str) -> int:
    """BYTES elements a request may still carry, after this tensor's (each becomes a
    Python object: bounded before any is decoded, as GraphPipe's decoder does)."""
    if dtype.kind != "O":
        return left
    left -= math.prod(shape)
    if left < 0:
        raise ProtocolError(f"{where}: a BYTES tensor of shape {shape} takes the request "
                            f"to more BYTES elements than this server takes in one request "
                            f"({max_strings}: {why})")
    return left


def from_raw(raw, dtype: np.dtype, shape: list[int], count: int, where: str) -> np.ndarray:
    """A tensor from its raw bytes (the binary extension's, or gRPC's raw contents):
    a view of them, 0 copies; BYTES elements unframed into an object array."""
    if dtype.kind == "O":
        return decode_bytes(raw, count, where).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"{where}: binary_data_size is {len(raw)} bytes; shape {shape} "
                            f"of {datatype_of(dtype)} takes {count * dtype.itemsize}")
    arr = np.frombuffer(raw, dtype).reshape(shape)            # a view: 0 copies
    if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise ProtocolError(f"{where}: BOOL bytes must be 0 or 1")
    return arr


def shape_of(shape, where: str, message_bytes: int) -> list[int]:
    """A checked shape. A tensor with no elements may have no dimension larger than the
    message (GraphPipe's decoder has the same rule), or a few bytes (``[1e11, 3, 0,
    192]``) would claim 1e11 rows for per-row work later; a tensor with elements is
    bounded by its data, checked where the data is."""
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise ProtocolError(f"{where}: 'shape' must be a list of at most {MAX_DIMS} "
                            f"non-negative integers, not {shape!r}")
    if 0 in shape and any(d > message_bytes for d in shape):
        raise ProtocolError(f"{where}: shape {shape} has a dimension larger than the "
                            f"request itself ({message_bytes} bytes)")
    return shape


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _list(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be a JSON list")
    return value


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter {what!r} must be true or false, not {value!r}")
    return value


def request_config(params: dict) -> str:
    """gpserve's request options from the request's ``parameters``: ``cache`` and
    ``batch`` (true/false, as GraphPipe's ``cache=off``/``batch=off``) and ``config``
    (text passed to the model, as GraphPipe's config). Other parameters (Triton's
    ``priority``, ``timeout``, sequence ids) do not apply to gpserve and are ignored."""
    config = params.get("config", "")
    if not isinstance(config, str):
        raise BadConfig(f"parameter 'config' must be a string, not {config!r}")
    tokens = [config] if config else []
    for option in ("cache", "batch"):
        if option in params:
            value = params[option]
            if isinstance(value, str) and value in ("on", "off"):
                value = value == "on"
            if not isinstance(value, bool):
                raise BadConfig(f"parameter {option!r} takes true or false, not {value!r}")
            if not value:
                tokens.append(f"{option}=off")
    return ";".join(tokens)


__all__ = ["DTYPES", "InferCall", "decode_infer", "encode_infer"]
