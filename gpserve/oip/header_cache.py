"""JSON headers a v2 client sends again and again, decoded (and answered) once.

Clients send the same JSON header with every request of a shape (tritonclient, a load
generator): decoding it was most of a small binary request's decoding (a dict walk and
its checks: 5.2 us of a request's decoding, 2.3 with its plan kept, on 2 cores), and an
answer's header, made afresh, ~2 us more. So:

- a request header whose inputs are all numeric binary data is decoded once and its
  *plan* kept (the call without its tensors, and where each input lies in a body of its
  size), keyed by the header's bytes: the same bytes pass the same checks; a body of
  another size is decoded afresh (and refused as before). Strings, booleans, JSON data
  and shared-memory regions need their bytes read each time: never planned;
- an answer whose outputs are all numeric binary data keeps its JSON header, by model,
  version, id, output names, types and shapes.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import orjson

from .datatypes import datatype_of

KEPT_MAX = 512            # plans, and answer headers, kept each (the oldest goes first)
HEADER_MAX = 2048         # bytes; a longer request header is decoded every time


class Plan(NamedTuple):
    """A request header, decoded once: the call it makes (an ``InferCall`` without its
    tensors) and where each input lies in a body of ``size`` bytes."""

    size: int                                             # the body's bytes
    call: Any                                             # an InferCall, tensors []
    inputs: tuple[tuple[np.dtype, tuple, int, int], ...]  # dtype, shape, count, offset

    def tensors(self, view: memoryview) -> list[np.ndarray]:
        """The inputs, views of ``view`` (0 copies)."""
        return [np.frombuffer(view, dtype, count, offset).reshape(shape)
                for dtype, shape, count, offset in self.inputs]


_PLANS: dict[bytes, Plan] = {}
_HEADS: dict[tuple, bytes] = {}


def _key(view: memoryview, header_length: int | None) -> bytes | None:
    if header_length is None or not 0 < header_length <= min(HEADER_MAX, len(view)):
        return None
    return bytes(view[:header_length])


def planned(view: memoryview, header_length: int | None) -> Plan | None:
    """The plan of a body whose header was seen before in a body of its size, else None
    (decode it)."""
    key = _key(view, header_length)
    plan = _PLANS.get(key) if key is not None else None
    return plan if plan is not None and plan.size == len(view) else None


def keep(call, view: memoryview, header_length: int | None) -> None:
    """Keep the plan of a call just decoded from ``view`` if its inputs are all numeric
    binary data, each a view of the body where a plan would put it."""
    key = _key(view, header_length)
    if key is None or key in _PLANS or call.to_regions or not call.tensors:
        return
    start = np.frombuffer(view, np.uint8).ctypes.data
    inputs, offset = [], len(key)
    for arr in call.tensors:
        if arr.dtype.kind not in "iuf" or not arr.size or arr.ctypes.data - start != offset:
            return
        inputs.append((arr.dtype, arr.shape, arr.size, offset))
        offset += arr.nbytes
    if offset != len(view):
        return
    _bounded(_PLANS)[key] = Plan(len(view), call._replace(tensors=[]), tuple(inputs))


def answer_header(model: str, version: str, call, names: list[str],
                  arrays: list[np.ndarray]) -> bytes | None:
    """The answer's JSON header when every output goes as numeric binary data, kept
    (None otherwise: the caller makes the whole answer)."""
    binary, default = call.binary, call.binary_default
    key = (model, version, call.id, *names,
           *[(a.dtype, a.shape) if a.dtype.kind in "iufb" and binary.get(n, default)
             else None for n, a in zip(names, arrays)])
    header = _HEADS.get(key)
    if header is None:
        if not names or None in key[3 + len(names):]:
            return None
        header = orjson.dumps({"model_name": model, "model_version": version, "outputs": [
            {"name": n, "datatype": datatype_of(a.dtype), "shape": list(a.shape),
             "parameters": {"binary_data_size": a.nbytes}} for n, a in zip(names, arrays)],
            **({} if call.id is None else {"id": call.id})})
        _bounded(_HEADS)[key] = header
    return header


def _bounded(kept: dict) -> dict:
    if len(kept) >= KEPT_MAX:
        del kept[next(iter(kept))]
    return kept
