"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), served by
every front on ``--grpc-listen`` (grpcio's asyncio server, in the front's event loop).

The fronts share the port with ``SO_REUSEPORT`` (grpcio sets it by default on Linux),
so the kernel spreads connections over them; the supervisor holds a socket bound to
the port for the run's life, so a port in use fails at start with a clear message and
no other user's process can join the group. Requests go through the same
:meth:`FrontState.run` as GraphPipe and HTTP: same checks, cache, batching, workers.

Copies of tensor bytes: protobuf parses each ``raw_input_contents`` into a ``bytes``
object (1 copy, protobuf's), a worker needs them in shared memory (1 copy, as for a
GraphPipe body that did not stream). Outputs: 1 copy to ``bytes``, 1 into the
serialized response (protobuf's). Large tensors are cheaper over HTTP's binary
extension, which streams into shared memory.
"""
from __future__ import annotations

import inspect
import math
import time

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from gpserve import __version__
from gpserve.errors import DtypeMismatch, GraphPipeError, ProtocolError, UnknownModel
from gpserve.inflight import ModelState

from . import repository_api
from .codec import count_strings, from_raw, raw_bytes, request_config, shape_of
from .datatypes import datatype_of, dtype_of
from .grpc_messages import METHODS, SERVICE, message
from .json_tensors import check_range
from .rest import (
    NO_CUDA,
    extensions,
    model_metadata,
    no_cuda_region,
    triton_config,
    versions,
)
from .restricted import MODEL_REPOSITORY, SHARED_MEMORY, grpc_peer_host
from .statistics import model_statistics

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED,
          404: grpc.StatusCode.NOT_FOUND,
          408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
# the contents field that carries each datatype when it is not sent raw
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
            "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
            "BYTES": "bytes_contents"}
_M = {name: message(name) for pair in METHODS.values() for name in pair}
DATA_TYPES = ("TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32",
              "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64",
              "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16")


class InferenceService:
    """The service's calls, on a front's :class:`FrontState`."""

    def __init__(self, state):
        self.state = state
        # grpcio reads a whole message before its call runs, and a call holds about 4x
        # its size (protobuf's bytes, shared memory, the output, its serialisation):
        # HTTP bodies are bounded by the arena, gRPC requests by this
        cfg = state.cfg
        self.budget = int((cfg.grpc_inflight_mb or cfg.max_body_mb) * (1 << 20))
        self.held = 0                 # bytes of the requests whose calls are running

    def handlers(self) -> grpc.GenericRpcHandler:
        calls = {name: grpc.unary_unary_rpc_method_handler(
            self._refusing_malformed(name), request_deserializer=_parser(_M[req]),
            response_serializer=_M[resp].SerializeToString)
            for name, (req, resp) in METHODS.items()}
        return grpc.method_handlers_generic_handler(SERVICE, calls)

    async def ServerLive(self, request, context):
        return _M["ServerLiveResponse"](live=not self.state.draining)

    async def ServerReady(self, request, context):
        return _M["ServerReadyResponse"](ready=self.state.ready)

    async def ServerMetadata(self, request, context):
        return _M["ServerMetadataResponse"](name="gpserve", version=__version__,
                                            extensions=extensions(self.state.cfg))

    async def ModelReady(self, request, context):
        model = await self._model(request.name, request.version, context)
        return _M["ModelReadyResponse"](ready=model.ready)

    async def ModelMetadata(self, request, context):
        model = await self._model(request.name, request.version, context)
        return _M["ModelMetadataResponse"](**model_metadata(model.spec,
                                                             versions(self.state, model)))

    async def ModelConfig(self, request, context):
        model = await self._model(request.name, request.version, context)
        config = triton_config(model.cfg, model.spec)
        for tensor in config["input"] + config["output"]:     # the enum's number
            tensor["data_type"] = DATA_TYPES.index(tensor["data_type"])
        return json_format.ParseDict({"config": config}, _M["ModelConfigResponse"]())

    async def ModelStatistics(self, request, context):
        models = ([await self._model(request.name, request.version, context)]
                  if request.name else self.state.served)
        stats = [model_statistics(m.name, m.version, m.counters.statistics())
                 for m in models]
        return json_format.ParseDict({"model_stats": stats},
                                     _M["ModelStatisticsResponse"]())

    # -- Triton's shared-memory extensions ---------------------------------------------
    async def SystemSharedMemoryStatus(self, request, context):
        regions = await self._shm(context, lambda r: r.status(request.name or None))
        response = _M["SystemSharedMemoryStatusResponse"]()
        for region in regions:
            json_format.ParseDict(region, response.regions[region["name"]])
        return response

    async def SystemSharedMemoryRegister(self, request, context):
        await self._shm(context, lambda r: r.register(request.name, request.key,
                                                      request.offset, request.byte_size))
        return _M["SystemSharedMemoryRegisterResponse"]()

    async def SystemSharedMemoryUnregister(self, request, context):
        await self._shm(context, lambda r: r.unregister(request.name or None))
        return _M["SystemSharedMemoryUnregisterResponse"]()

    async def _shm(self, context, call):
        """``call(ClientRegions)``, behind the API restriction (once shared memory is on)."""
        regions = self.state.client_regions
        group = SHARED_MEMORY if regions.enabled else None
        return await self._restricted(context, lambda: call(regions), group)

    async def _restricted(self, context, action, group: str | None = MODEL_REPOSITORY):
        """``action()`` (awaited if a coroutine) behind the restriction of API ``group``;
        an error aborts the call with its message."""
        try:
            if group is not None:
                self.state.restrictions.check_grpc(group, context)
            result = action()
            return await result if inspect.isawaitable(result) else result
        except GraphPipeError as e:
            await context.abort(STATUS.get(e.http_status, grpc.StatusCode.INTERNAL),
                                e.message)

    # -- the repository extension (repository_api.py) ---------------------------------
    async def RepositoryIndex(self, request, context):
        models = await self._restricted(
            context, lambda: repository_api.index(self.state, request.ready))
        return json_format.ParseDict({"models": models}, _M["RepositoryIndexResponse"]())

    async def RepositoryModelLoad(self, request, context):
        await self._restricted(context, lambda: repository_api.load(
            self.state, request.model_name, request.parameters))
        return _M["RepositoryModelLoadResponse"]()

    async def RepositoryModelUnload(self, request, context):
        await self._restricted(context, lambda: repository_api.change(
            self.state, "unload", request.model_name))
        return _M["RepositoryModelUnloadResponse"]()

    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:          # as a server without GPUs answers: none is registered
            await context.abort(grpc.StatusCode.NOT_FOUND, no_cuda_region(request.name).message)
        return _M["CudaSharedMemoryStatusResponse"]()

    async def CudaSharedMemoryRegister(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_CUDA)

    async def CudaSharedMemoryUnregister(self, request, context):
        return _M["CudaSharedMemoryUnregisterResponse"]()

    async def ModelInfer(self, request, context):
        model = await self._model(request.model_name, request.model_version, context)
        size = request.ByteSize()
        if self.held and self.held + size > self.budget:
            self._record(context, "ModelInfer", 413, "grpc_error", size, time.perf_counter())
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"this front holds {self.held} bytes of gRPC requests; with this one's "
                f"{size} it would pass its bound of {self.budget} (--grpc-inflight-mb); "
                "retry later"))
        self.held += size
        try:
            return await self._infer(model, request, context, size)
        finally:
            self.held -= size

    async def _infer(self, model: ModelState, request, context, size: int):
        state, started = self.state, time.perf_counter()
        with state.request() as held:
            try:
                response = await self._answer(model, request, context, held)
            except Exception as e:
                failure = held.fail(e)
            else:
                self._record(context, "ModelInfer", 200, "grpc_infer", size, started,
                             response.ByteSize())
                return response
        self._record(context, "ModelInfer", failure.http_status, "grpc_error", size,
                     started)
        await context.abort(STATUS.get(failure.http_status, grpc.StatusCode.INTERNAL),
                            failure.message)

    async def _answer(self, model: ModelState, request, context, held):
        """The ModelInferResponse (raises what fails); ``held``: the front's request."""
        state = self.state
        to_regions = {o.name: _region(o.parameters) for o in request.outputs
                      if "shared_memory_region" in o.parameters}
        if to_regions or any("shared_memory_region" in t.parameters for t in request.inputs):
            state.restrictions.check_grpc(SHARED_MEMORY, context)
        tensors, names = self._inputs(request, held.regions, model.string_limit)
        params = {k: _value(v) for k, v in request.parameters.items()}
        outputs = [o.name for o in request.outputs]
        pinned = {region: state.client_regions.registration(region)
                  for region, _, _ in to_regions.values()}
        out_names, arrays = await model.run(tensors, names, outputs, request_config(params),
                                            held)
        response = _M["ModelInferResponse"](
            model_name=model.name, model_version=model.version, id=request.id)
        for name, arr in zip(out_names, arrays):
            out = response.outputs.add(name=name, datatype=datatype_of(arr.dtype),
                                       shape=arr.shape)
            if name in to_regions:                  # into the client's region
                region, offset, nbytes = to_regions[name]
                data = raw_bytes(arr)
                state.client_regions.write(region, offset, nbytes, data,
                                           f"output {name!r}", pinned[region])
                out.parameters["shared_memory_region"].string_param = region
                out.parameters["shared_memory_byte_size"].int64_param = len(data)
                response.raw_output_contents.append(b"")   # keeps positions
            else:
                response.raw_output_contents.append(bytes(raw_bytes(arr)))  # 1 copy
        return response

    def _inputs(self, request, regions, string_limit: tuple[int, str]
                ) -> tuple[list[np.ndarray], list[str]]:
        raw = request.raw_input_contents
        by_value = [t for t in request.inputs if "shared_memory_region" not in t.parameters]
        if raw and len(raw) != len(by_value):
            raise ProtocolError(f"{len(raw)} raw_input_contents for {len(by_value)} inputs "
                                "(not counting those in shared memory); send one per "
                                "input, in order, or none")
        max_strings, why = string_limit
        left, tensors, names, next_raw = max_strings, [], [], 0
        message_bytes = request.ByteSize()
        if not request.inputs:
            raise ProtocolError("the request has no inputs")
        for t in request.inputs:
            where = f"input {t.name!r}"
            dtype = dtype_of(t.datatype, where)
            shape = shape_of(list(t.shape), where, message_bytes)
            count = math.prod(shape)
            left = count_strings(left, dtype, shape, where, max_strings, why)
            if "shared_memory_region" in t.parameters:        # into the arena: 1 copy
                data = self.state.client_regions.read(*_region(t.parameters),
                                                      regions.alloc, where)
                tensors.append(from_raw(data, dtype, shape, count, where))
            elif raw:
                if t.HasField("contents"):
                    raise ProtocolError(f"{where} has contents, and the request "
                                        "raw_input_contents: use one or the other")
                tensors.append(from_raw(raw[next_raw], dtype, shape, count, where))
                next_raw += 1
            else:
                tensors.append(_from_contents(t, dtype, shape, count, where))
            names.append(t.name)
        return tensors, names

    def _refusing_malformed(self, name: str):
        """The call ``name``, answering INVALID_ARGUMENT to a request that did not parse."""
        call = getattr(self, name)

        async def handle(request, context):
            if type(request) is Malformed:
                self._record(context, name, 400, "grpc_error", 0, time.perf_counter())
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await call(request, context)
        return handle

    def _record(self, context, method: str, status: int, kind: str, size: int,
                started: float, sent: int = 0) -> None:
        """Metrics and the access-log line of a call, as for an HTTP request."""
        self.state.access.record(grpc_peer_host(context.peer()), "gRPC", f"{SERVICE}/{method}",
                                 status, kind, size, sent, time.perf_counter() - started)

    async def _model(self, name: str, version: str, context) -> ModelState:
        """The model version a call names; NOT_FOUND, worded as Triton's, if none."""
        try:
            return self.state.model(name, version)
        except UnknownModel as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, e.message)
            raise                                        # abort raises; for the checker


class Malformed:
    """A request whose bytes are not its message: the call answers INVALID_ARGUMENT (a
    deserializer that raises makes grpcio answer UNKNOWN, "Unexpected DecodeError")."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(f"the request is not a well-formed {cls.DESCRIPTOR.name} "
                             f"({len(data)} bytes): {e}")
    return parse


def _from_contents(t, dtype: np.dtype, shape: list[int], count: int,
                   where: str) -> np.ndarray:
    field = CONTENTS.get(t.datatype)
    if field is None:
        raise DtypeMismatch(f"{where}: {t.datatype} has no contents field; send it in "
                            "raw_input_contents")
    values = getattr(t.contents, field)
    if len(values) != count:
        raise ProtocolError(f"{where}: {field} has {len(values)} elements; shape {shape} "
                            f"takes {count}")
    if dtype.kind == "O":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    wide = np.array(values)
    check_range(wide, dtype, where)
    return wide.astype(dtype).reshape(shape)


def _region(params) -> tuple:
    """(region, offset, byte size) of a tensor's shared-memory parameters."""
    get = lambda k, default=None: _value(params[k]) if k in params else default
    return get("shared_memory_region"), get("shared_memory_offset", 0), \
        get("shared_memory_byte_size")


def _value(p):
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


async def start(state, address: str, max_message_bytes: int) -> grpc.aio.Server:
    """A started gRPC server for this front (stop it with ``await server.stop(grace)``)."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((InferenceService(state).handlers(),))
    server.add_insecure_port(address)
    await server.start()
    return server
