"""The Open Inference Protocol's HTTP routes (``/v2/...``), on GraphPipe's port.

Served by the same front processes, over the same validation, row cache, batching and
workers as ``POST /``: a row sent by either protocol batches with, and is answered from
the cache for, the other. Routes (KServe's REST API, and what Triton's clients and
``perf_analyzer`` ask for): server live/ready/metadata, model metadata/ready/config,
infer, each model route also under ``/versions/{v}``. docs/open-inference-protocol.md.
"""
from __future__ import annotations

import orjson

from gpserve import __version__
from gpserve.answer import JSON, OCTETS, Answer
from gpserve.errors import GraphPipeError, ProtocolError

from .codec import decode_infer, encode_infer
from .datatypes import datatype_of
from .restricted import SHARED_MEMORY

VERSION = "1"              # the one version of the model a server serves
PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorflow": "tensorflow_savedmodel",
             "torch": "pytorch_libtorch"}


def extensions(cfg) -> list[str]:
    """The protocol extensions this server serves (shared memory only when allowed)."""
    return ["binary_tensor_data"] + (["system_shared_memory"] if cfg.shm_clients else [])


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class Refused(Exception):
    """A route that does not exist here (404) or a method it does not take (405): the
    protocol's own answers, with no GraphPipe error code."""

    def __init__(self, http_status: int, message: str):
        super().__init__(message)
        self.http_status, self.message = http_status, message


def _not_found(what: str) -> Refused:
    return Refused(404, what)


class RestApi:
    """``handle(scope, receive)`` -> (HTTP status, headers, body, kind) for a /v2 path."""

    def __init__(self, state):
        self.state, spec = state, state.spec
        self.model = spec.name
        self.metadata = orjson.dumps(model_metadata(spec))
        self.server_metadata = orjson.dumps(
            {"name": "gpserve", "version": __version__, "extensions": extensions(state.cfg)})
        self.config = orjson.dumps(_triton_config(state.cfg, spec))

    async def handle(self, scope, receive) -> Answer:
        method, parts = scope["method"], scope["path"].rstrip("/").split("/")[2:]
        try:
            if not parts:
                return self._get(method, self.server_metadata, "v2_server")
            if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
                self._method(method, "GET")
                up = not self.state.draining if parts[1] == "live" else self.state.ready
                return Answer(200 if up else 503, orjson.dumps({parts[1]: up}), "v2_health",
                              JSON)
            if parts[0] == "models" and len(parts) >= 2:
                return await self._model_route(method, parts[1:], scope, receive)
            if parts[0] == "systemsharedmemory":
                return await self._shm_route(method, parts[1:], scope, receive)
            if parts[0] == "cudasharedmemory":
                raise _not_found("CUDA shared memory is not served; system shared memory "
                                 "is (/v2/systemsharedmemory, with --shm-clients)")
            raise _no_route(scope)
        except (GraphPipeError, Refused) as e:
            return Answer(e.http_status, _error(e.message), "v2_error", JSON)

    async def _model_route(self, method, parts, scope, receive):
        name, rest = parts[0], parts[1:]
        if name != self.model:
            raise _not_found(f"unknown model {name!r}; this server serves {self.model!r}")
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or rest[1] != VERSION:
                raise _not_found(f"model {name!r} has no version "
                                 f"{rest[1] if len(rest) > 1 else ''!r}; it has {VERSION!r}")
            rest = rest[2:]
        if not rest:
            return self._get(method, self.metadata, "v2_metadata")
        if rest == ["ready"]:              # the status for Triton's clients, the body KServe's
            self._method(method, "GET")
            ready = self.state.ready
            return Answer(200 if ready else 503, orjson.dumps(
                {"name": self.model, "ready": ready}), "v2_health", JSON)
        if rest == ["config"]:
            return self._get(method, self.config, "v2_metadata")
        if rest == ["infer"]:
            self._method(method, "POST")
            return await self.infer(scope, receive)
        raise _no_route(scope)

    async def _shm_route(self, method, parts, scope, receive):
        """Triton's system shared-memory extension: ``status``, ``unregister`` (all), and
        ``region/{name}/status|register|unregister``."""
        regions = self.state.client_regions
        if regions.enabled:
            self.state.restrictions.check_http(SHARED_MEMORY, scope)
        if len(parts) == 3 and parts[0] == "region":
            name, action = parts[1], parts[2]
        elif len(parts) == 1:
            name, action = None, parts[0]
        else:
            raise _no_route(scope)
        if action == "status":
            self._method(method, "GET")
            return Answer(200, orjson.dumps(regions.status(name)), "v2_shm", JSON)
        if action == "unregister":
            self._method(method, "POST")
            regions.unregister(name)
            return Answer(200, b"", "v2_shm", JSON)
        if action == "register" and name is not None:
            self._method(method, "POST")
            async with self.state.request() as held:
                body = await self.state.body.read(scope, receive, held.regions)
                try:
                    args = orjson.loads(body)
                except orjson.JSONDecodeError as e:
                    raise ProtocolError(f"the register request's JSON is malformed: {e}") \
                        from None
                if not isinstance(args, dict):
                    raise ProtocolError("the register request must be a JSON object with "
                                        "'key', 'offset' and 'byte_size'")
                regions.register(parts[1], args.get("key"), args.get("offset", 0),
                                 args.get("byte_size"))
            return Answer(200, b"", "v2_shm", JSON, len(body))
        raise _no_route(scope)

    async def infer(self, scope, receive) -> Answer:
        async with self.state.request() as request:
            try:
                return await self._infer(scope, receive, request)
            except Exception as e:
                failure = request.fail(e)
                return Answer(failure.http_status, _error(failure.message), "v2_error", JSON)

    async def _infer(self, scope, receive, request) -> Answer:
        state, shm = self.state, self.state.client_regions

        def read_region(name, offset, nbytes, where):     # into the arena, for the worker
            state.restrictions.check_http(SHARED_MEMORY, scope)
            return shm.read(name, offset, nbytes, request.regions.alloc, where)  # 1 copy

        def write_region(name, offset, nbytes, data, where):   # the registration decoded
            shm.write(name, offset, nbytes, data, where, pinned[name])
        header_length = _header_length(scope)
        body = await state.body.read(scope, receive, request.regions, align_at=header_length)
        call = decode_infer(body, header_length, *state.string_limit, read_region)
        if call.to_regions:
            state.restrictions.check_http(SHARED_MEMORY, scope)
        pinned = {region: shm.registration(region) for region, _, _ in call.to_regions.values()}
        names, arrays = await state.run(call.tensors, call.input_names, call.output_names,
                                        call.config, request)
        out, json_length = encode_infer(self.model, VERSION, call, names, arrays, write_region)
        if json_length is None:
            return Answer(200, out, "v2_infer", JSON, len(body))
        return Answer(200, out, "v2_infer", OCTETS + (
            (b"inference-header-content-length", b"%d" % json_length),), len(body))

    def _get(self, method, body: bytes, kind: str) -> Answer:
        self._method(method, "GET")
        return Answer(200, body, kind, JSON)

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            raise Refused(405, f"{method} is not allowed here; use {allowed}")


def _no_route(scope) -> Refused:
    return _not_found(f"no route {scope['path']!r}; see docs/open-inference-protocol.md")


def _header_length(scope) -> int | None:
    for k, v in scope["headers"]:
        if k == b"inference-header-content-length":
            try:
                return int(v)
            except ValueError:
                raise ProtocolError(f"Inference-Header-Content-Length {v!r} is not a "
                                    "number") from None
    return None


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})


def platform(spec) -> str:
    return PLATFORMS.get(spec.backend, f"gpserve_{spec.backend}")


def model_metadata(spec) -> dict:
    """The protocol's model metadata (REST's JSON; gRPC's message has the same fields)."""
    io = lambda specs: [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": s.shape}
                        for s in specs]
    return {"name": spec.name, "versions": [VERSION], "platform": platform(spec),
            "inputs": io(spec.inputs), "outputs": io(spec.outputs)}


def _triton_config(cfg, spec) -> dict:
    """Triton's model configuration (its ``/config`` extension), the part that is true
    here: what ``perf_analyzer`` reads to drive a model (``max_batch_size``; dims without
    the batch dimension when it is > 0)."""
    batching = spec.batchable and cfg.batching != "off"
    max_batch = cfg.max_batch if batching else 0

    def io(s):
        dims = s.shape[1:] if max_batch else s.shape
        return {"name": s.name, "data_type": "TYPE_" + _triton_type(s.dtype), "dims": dims}
    config = {"name": spec.name, "platform": platform(spec), "max_batch_size": max_batch,
              "input": [io(s) for s in spec.inputs], "output": [io(s) for s in spec.outputs]}
    if batching:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(cfg.max_delay_ms * 1000)}
    return config


def _triton_type(dtype) -> str:
    name = datatype_of(dtype)
    return "STRING" if name == "BYTES" else name
