"""The Open Inference Protocol's HTTP routes (``/v2/...``), on GraphPipe's port.

Served by the same front processes, over the same validation, row cache, batching and
workers as ``POST /``: a row sent by either protocol batches with, and is answered from
the cache for, the other. Routes (KServe's REST API, and what Triton's clients and
``perf_analyzer`` ask for): server live/ready/metadata, model metadata/ready/config,
infer, each model route also under ``/versions/{v}``, and Triton's extensions:
statistics, system shared memory, and CUDA shared memory as a server without GPUs
answers it; one table of them in ``RestApi.router`` (:mod:`.routes`).
docs/open-inference-protocol.md.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import orjson

from gpserve import __version__
from gpserve.answer import JSON, OCTETS, Answer
from gpserve.errors import GraphPipeError, ProtocolError, UnknownModel

from . import repository_api
from .codec import decode_infer, encode_infer
from .datatypes import datatype_of
from .restricted import MODEL_REPOSITORY, SHARED_MEMORY
from .routes import Handler, Refused, Router
from .sharedmem import NoSuchRegion, SharedMemoryError
from .statistics import model_statistics

if TYPE_CHECKING:
    from gpserve.inflight import ModelState

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorflow": "tensorflow_savedmodel",
             "torch": "pytorch_libtorch"}


def extensions(cfg) -> list[str]:
    """The protocol extensions this server serves (shared memory only when allowed)."""
    return ["binary_tensor_data", "model_configuration", "statistics"] + (
        ["system_shared_memory"] if cfg.shm_clients else []) + (
        ["model_repository"] if cfg.model_repository else [])


def versions(state, model) -> list[str]:
    """The versions served of ``model``'s model, oldest first."""
    return [str(v) for v in sorted(state.models[model.name])]


def unknown_model(name: str, version: str | None = None) -> str:
    return UnknownModel.named(name, version).message


def no_cuda_region(name: str) -> NoSuchRegion:
    return NoSuchRegion(f"no registered CUDA shared memory region {name!r}: this server "
                        "has no GPU memory for clients and registers none")


NO_CUDA = ("CUDA shared memory is not served: this server registers no GPU memory for "
           "clients; use system shared memory (/v2/systemsharedmemory, with --shm-clients)")




def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class RestApi:
    """``handle(scope, receive)`` -> the Answer for a /v2 path."""

    def __init__(self, state):
        self.state = state
        self.server_metadata = orjson.dumps(
            {"name": "gpserve", "version": __version__, "extensions": extensions(state.cfg)})

        model: list[tuple[str, str, Handler]] = [
            ("POST", "infer", self.infer), ("GET", "", self._model_metadata),
            ("GET", "ready", self._model_ready), ("GET", "config", self._model_config),
            ("GET", "stats", self._stats)]
        shm, cuda = "/v2/systemsharedmemory", "/v2/cudasharedmemory"
        stats: list[tuple[str, str, Handler]] = [("GET", "/v2/models/stats", self._stats)]
        self.router = Router(
            stats                                 # before /v2/models/{model} takes it
            + [(method, f"{base}/{tail}", handler) for method, tail, handler in model
               for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")]
            + [("GET", "/v2", self._server_metadata),
               ("GET", "/v2/health/live", self._live), ("GET", "/v2/health/ready", self._ready),
               ("GET", f"{shm}/status", self._shm_status),
               ("POST", f"{shm}/unregister", self._shm_unregister),
               ("GET", f"{shm}/region/{{region}}/status", self._shm_status),
               ("POST", f"{shm}/region/{{region}}/register", self._shm_register),
               ("POST", f"{shm}/region/{{region}}/unregister", self._shm_unregister),
               ("GET", f"{cuda}/status", self._cuda_status),
               ("GET", f"{cuda}/region/{{region}}/status", self._cuda_status),
               ("POST", f"{cuda}/unregister", self._cuda_unregister),
               ("POST", f"{cuda}/region/{{region}}/unregister", self._cuda_unregister),
               ("POST", f"{cuda}/region/{{region}}/register", self._cuda_register),
               ("POST", "/v2/repository/index", self._repository_index),
               ("POST", "/v2/repository/models/{name}/load", self._repository_load),
               ("POST", "/v2/repository/models/{name}/unload", self._repository_unload)],
            not_found="see docs/open-inference-protocol.md")
        # an infer URL's model and version, matched once per path (~2 us a request)
        self._infer_route = functools.lru_cache(maxsize=1024)(self._match_infer)

    async def handle(self, scope, receive) -> Answer:
        try:
            handler, params = self.router.find(scope["method"], scope["path"])
            if "model" in params:
                params["model"] = self.state.model(params["model"], params.pop("version", None))
            return await handler(scope, receive, **params)
        except (GraphPipeError, Refused) as e:
            return Answer(e.http_status, _error(e.message), "v2_error", JSON)

    # -- server and model: metadata and health ------------------------------------------
    async def _server_metadata(self, scope, receive) -> Answer:
        return Answer(200, self.server_metadata, "v2_server", JSON)

    async def _live(self, scope, receive) -> Answer:
        up = not self.state.draining
        return Answer(200 if up else 503, orjson.dumps({"live": up}), "v2_health", JSON)

    async def _ready(self, scope, receive) -> Answer:
        up = self.state.ready
        return Answer(200 if up else 503, orjson.dumps({"ready": up}), "v2_health", JSON)

    async def _model_metadata(self, scope, receive, model: ModelState) -> Answer:
        return Answer(200, orjson.dumps(model_metadata(model.spec, versions(self.state, model))),
                      "v2_metadata", JSON)

    async def _model_config(self, scope, receive, model: ModelState) -> Answer:
        return Answer(200, orjson.dumps(triton_config(model.cfg, model.spec)), "v2_metadata",
                      JSON)

    async def _model_ready(self, scope, receive, model: ModelState) -> Answer:
        """The status for Triton's clients, the body KServe's."""
        ready = model.ready
        return Answer(200 if ready else 503, orjson.dumps(
            {"name": model.name, "ready": ready}), "v2_health", JSON)

    # -- Triton's statistics extension -------------------------------------------------
    async def _stats(self, scope, receive, model: ModelState | None = None) -> Answer:
        """One model version's statistics, or (``/v2/models/stats``) every one's."""
        stats = [model_statistics(m.name, m.version, m.counters.statistics())
                 for m in ([model] if model is not None else self.state.served)]
        return Answer(200, orjson.dumps({"model_stats": stats}), "v2_stats", JSON)

    # -- CUDA shared memory, as a server without GPUs answers it -----------------------
    async def _cuda_status(self, scope, receive, region: str | None = None) -> Answer:
        if region is not None:
            raise no_cuda_region(region)
        return Answer(200, b"[]", "v2_shm", JSON)

    async def _cuda_unregister(self, scope, receive, region: str | None = None) -> Answer:
        return Answer(200, b"", "v2_shm", JSON)      # none is registered: done already

    async def _cuda_register(self, scope, receive, region: str) -> Answer:
        raise SharedMemoryError(NO_CUDA)

    # -- Triton's system shared-memory extension ---------------------------------------
    def _shm(self, scope):
        regions = self.state.client_regions
        if regions.enabled:
            self.state.restrictions.check_http(SHARED_MEMORY, scope)
        return regions

    async def _shm_status(self, scope, receive, region: str | None = None) -> Answer:
        return Answer(200, orjson.dumps(self._shm(scope).status(region)), "v2_shm", JSON)

    async def _shm_unregister(self, scope, receive, region: str | None = None) -> Answer:
        self._shm(scope).unregister(region)
        return Answer(200, b"", "v2_shm", JSON)

    async def _shm_register(self, scope, receive, region: str) -> Answer:
        regions = self._shm(scope)
        args, size = await self._json_object(scope, receive, "the register request",
                                             "'key', 'offset' and 'byte_size'")
        regions.register(region, args.get("key"), args.get("offset", 0),
                         args.get("byte_size"))
        return Answer(200, b"", "v2_shm", JSON, size)

    async def _json_object(self, scope, receive, what: str, fields: str,
                           empty_ok: bool = False) -> tuple[dict, int]:
        """A small request body read as a JSON object (and its size)."""
        with self.state.request() as held:
            body = await self.state.body.read(scope, receive, held.regions)
            if empty_ok and not len(body):
                return {}, 0
            try:
                args = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise ProtocolError(f"{what}'s JSON is malformed: {e}") from None
        if not isinstance(args, dict):
            raise ProtocolError(f"{what} must be a JSON object with {fields}")
        return args, len(body)

    # -- the repository extension (gpserve/oip/repository_api.py) ----------------------
    async def _repository_index(self, scope, receive) -> Answer:
        self.state.restrictions.check_http(MODEL_REPOSITORY, scope)
        args, size = await self._json_object(scope, receive, "the index request",
                                             "'ready'", empty_ok=True)
        return Answer(200, orjson.dumps(repository_api.index(self.state, bool(
            args.get("ready")))), "v2_repository", JSON, size)

    async def _repository_load(self, scope, receive, name: str) -> Answer:
        return await self._repository_change(scope, receive, "load", name)

    async def _repository_unload(self, scope, receive, name: str) -> Answer:
        return await self._repository_change(scope, receive, "unload", name)

    async def _repository_change(self, scope, receive, op: str, name: str) -> Answer:
        self.state.restrictions.check_http(MODEL_REPOSITORY, scope)
        args, size = await self._json_object(scope, receive, f"the {op} request",
                                             "'parameters'", empty_ok=True)
        if op == "load":
            await repository_api.load(self.state, name, args.get("parameters") or {})
        else:
            await repository_api.change(self.state, op, name)
        return Answer(200, b"", "v2_repository", JSON, size)

    # -- inference ---------------------------------------------------------------------
    async def infer(self, scope, receive, model: ModelState) -> Answer:
        with self.state.request() as request:
            try:
                header_length = _header_length(scope)
                body = await self.state.body.read(scope, receive, request.regions,
                                                  align_at=header_length)
                return await self._infer(model, body, header_length, scope, request)
            except Exception as e:
                return _failed(request, e)

    async def infer_whole(self, path: str, body: bytes, scope: dict) -> Answer:
        """A binary-extension infer request whose whole body is in hand (the connection's
        fast path; ``scope`` holds its client and headers). Its answer is what
        :meth:`handle` would give."""
        try:
            model = self.state.model(*self._infer_route(path))
        except (GraphPipeError, Refused) as e:
            return Answer(e.http_status, _error(e.message), "v2_error", JSON)
        with self.state.request() as request:
            try:
                return await self._infer(model, body, _header_length(scope), scope, request)
            except Exception as e:
                return _failed(request, e)

    def _match_infer(self, path: str) -> tuple[str, str | None]:
        """An infer URL's model name and version (raises, and is not remembered, for a
        path that is no infer route)."""
        _, params = self.router.find("POST", path)
        return params["model"], params.get("version")

    async def _infer(self, model: ModelState, body, header_length: int | None, scope,
                     request) -> Answer:
        state, shm = self.state, self.state.client_regions

        def read_region(name, offset, nbytes, where):     # into the arena, for the worker
            state.restrictions.check_http(SHARED_MEMORY, scope)
            return shm.read(name, offset, nbytes, request.regions.alloc, where)  # 1 copy

        def write_region(name, offset, nbytes, data, where):   # the registration decoded
            shm.write(name, offset, nbytes, data, where, pinned[name])
        max_strings, why = model.string_limit
        call = decode_infer(body, header_length, max_strings, why, read_region)
        if call.to_regions:
            state.restrictions.check_http(SHARED_MEMORY, scope)
        pinned = {region: shm.registration(region) for region, _, _ in call.to_regions.values()}
        names, arrays = await model.run(call.tensors, call.input_names, call.output_names,
                                        call.config, request)
        out, json_length = encode_infer(model.name, model.version, call, names, arrays,
                                        write_region)
        if json_length is None:
            return Answer(200, out, "v2_infer", JSON, len(body))
        return Answer(200, out, "v2_infer", _binary_headers(json_length), len(body))


def _failed(request, e: Exception) -> Answer:
    failure = request.fail(e)
    return Answer(failure.http_status, _error(failure.message), "v2_error", JSON)


@functools.lru_cache(maxsize=256)
def _binary_headers(json_length: int) -> tuple:
    """A binary answer's headers, one tuple per JSON length: the fast path writes the
    head of the same tuple as last time without formatting it again."""
    return OCTETS + ((b"inference-header-content-length", b"%d" % json_length),)


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


def model_metadata(spec, versions: list[str]) -> dict:
    """The protocol's model metadata (REST's JSON; gRPC's message has the same fields);
    ``versions``: the model's versions served."""
    io = lambda specs: [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": s.shape}
                        for s in specs]
    return {"name": spec.name, "versions": versions, "platform": platform(spec),
            "inputs": io(spec.inputs), "outputs": io(spec.outputs)}


def triton_config(cfg, spec) -> dict:
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
