"""The Open Inference Protocol's gRPC messages (package ``inference``), built at import.

The protocol's wire contract is its field numbers and types; this module states them
as a table and builds the protobuf descriptors from it in a private pool: no ``.proto``
compiled at build time, no generated code tied to one protobuf release, and no clash
with clients (tritonclient) that register their own ``inference.*`` messages in the
default pool of the same process. Only what gpserve serves is here: the health,
metadata and infer calls (KServe's ``grpc_predict_v2``), and Triton's statistics, model
configuration, shared-memory and repository calls (Triton's service is a superset with the same
numbers, so its clients work unchanged; of its model configuration, the fields gpserve
fills in).
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"
_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES,
            "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32,
            "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE}

# message: [(field, number, type, "" | "repeated" | "map" | "oneof")]; a map has
# string keys and values of its type; nested messages' names have a dot.
_TENSOR = [  # an input tensor of a request and an output tensor of a response alike
    ("name", 1, "string", ""), ("datatype", 2, "string", ""),
    ("shape", 3, "int64", "repeated"), ("parameters", 4, "InferParameter", "map"),
    ("contents", 5, "InferTensorContents", "")]
MESSAGES: dict[str, list[tuple]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool", "")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool", "")],
    "ModelReadyRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "ModelReadyResponse": [("ready", 1, "bool", "")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string", ""), ("version", 2, "string", ""),
                               ("extensions", 3, "string", "repeated")],
    "ModelMetadataRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "ModelMetadataResponse.TensorMetadata": [
        ("name", 1, "string", ""), ("datatype", 2, "string", ""),
        ("shape", 3, "int64", "repeated")],
    "ModelMetadataResponse": [
        ("name", 1, "string", ""), ("versions", 2, "string", "repeated"),
        ("platform", 3, "string", ""),
        ("inputs", 4, "ModelMetadataResponse.TensorMetadata", "repeated"),
        ("outputs", 5, "ModelMetadataResponse.TensorMetadata", "repeated")],
    "InferParameter": [("bool_param", 1, "bool", "oneof"), ("int64_param", 2, "int64", "oneof"),
                       ("string_param", 3, "string", "oneof")],
    "InferTensorContents": [
        ("bool_contents", 1, "bool", "repeated"), ("int_contents", 2, "int32", "repeated"),
        ("int64_contents", 3, "int64", "repeated"), ("uint_contents", 4, "uint32", "repeated"),
        ("uint64_contents", 5, "uint64", "repeated"),
        ("fp32_contents", 6, "float", "repeated"), ("fp64_contents", 7, "double", "repeated"),
        ("bytes_contents", 8, "bytes", "repeated")],
    "ModelInferRequest.InferInputTensor": _TENSOR,
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, "string", ""), ("parameters", 2, "InferParameter", "map")],
    "ModelInferRequest": [
        ("model_name", 1, "string", ""), ("model_version", 2, "string", ""),
        ("id", 3, "string", ""), ("parameters", 4, "InferParameter", "map"),
        ("inputs", 5, "ModelInferRequest.InferInputTensor", "repeated"),
        ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor", "repeated"),
        ("raw_input_contents", 7, "bytes", "repeated")],
    "ModelInferResponse.InferOutputTensor": _TENSOR,
    "ModelInferResponse": [
        ("model_name", 1, "string", ""), ("model_version", 2, "string", ""),
        ("id", 3, "string", ""), ("parameters", 4, "InferParameter", "map"),
        ("outputs", 5, "ModelInferResponse.InferOutputTensor", "repeated"),
        ("raw_output_contents", 6, "bytes", "repeated")],
    # Triton's extensions: statistics, model configuration, shared memory
    "ModelStatisticsRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "StatisticDuration": [("count", 1, "uint64", ""), ("ns", 2, "uint64", "")],
    "InferStatistics": [(name, number, "StatisticDuration", "") for number, name in
                        enumerate(("success", "fail", "queue", "compute_input",
                                   "compute_infer", "compute_output", "cache_hit",
                                   "cache_miss"), 1)],
    "InferResponseStatistics": [(name, number, "StatisticDuration", "") for number, name in
                                enumerate(("compute_infer", "compute_output", "success",
                                           "fail", "empty_response", "cancel"), 1)],
    "InferBatchStatistics": [
        ("batch_size", 1, "uint64", ""), ("compute_input", 2, "StatisticDuration", ""),
        ("compute_infer", 3, "StatisticDuration", ""),
        ("compute_output", 4, "StatisticDuration", "")],
    "MemoryUsage": [("type", 1, "string", ""), ("id", 2, "int64", ""),
                    ("byte_size", 3, "uint64", "")],
    "ModelStatistics": [
        ("name", 1, "string", ""), ("version", 2, "string", ""),
        ("last_inference", 3, "uint64", ""), ("inference_count", 4, "uint64", ""),
        ("execution_count", 5, "uint64", ""), ("inference_stats", 6, "InferStatistics", ""),
        ("batch_stats", 7, "InferBatchStatistics", "repeated"),
        ("memory_usage", 8, "MemoryUsage", "repeated"),
        ("response_stats", 9, "InferResponseStatistics", "map")],
    "ModelStatisticsResponse": [("model_stats", 1, "ModelStatistics", "repeated")],
    # model_config.proto's enums (DataType) travel as their numbers: int32 on the wire
    "ModelInput": [("name", 1, "string", ""), ("data_type", 2, "int32", ""),
                   ("dims", 4, "int64", "repeated")],
    "ModelOutput": [("name", 1, "string", ""), ("data_type", 2, "int32", ""),
                    ("dims", 3, "int64", "repeated")],
    "ModelDynamicBatching": [("preferred_batch_size", 1, "int32", "repeated"),
                             ("max_queue_delay_microseconds", 2, "uint64", "")],
    "ModelConfig": [
        ("name", 1, "string", ""), ("platform", 2, "string", ""),
        ("max_batch_size", 4, "int32", ""), ("input", 5, "ModelInput", "repeated"),
        ("output", 6, "ModelOutput", "repeated"),
        ("dynamic_batching", 11, "ModelDynamicBatching", ""), ("backend", 17, "string", "")],
    "ModelConfigRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "ModelConfigResponse": [("config", 1, "ModelConfig", "")],
    "SystemSharedMemoryStatusRequest": [("name", 1, "string", "")],
    "SystemSharedMemoryStatusResponse.RegionStatus": [
        ("name", 1, "string", ""), ("key", 2, "string", ""), ("offset", 3, "uint64", ""),
        ("byte_size", 4, "uint64", "")],
    "SystemSharedMemoryStatusResponse": [
        ("regions", 1, "SystemSharedMemoryStatusResponse.RegionStatus", "map")],
    "SystemSharedMemoryRegisterRequest": [
        ("name", 1, "string", ""), ("key", 2, "string", ""), ("offset", 3, "uint64", ""),
        ("byte_size", 4, "uint64", "")],
    "SystemSharedMemoryRegisterResponse": [],
    "SystemSharedMemoryUnregisterRequest": [("name", 1, "string", "")],
    "SystemSharedMemoryUnregisterResponse": [],
    "CudaSharedMemoryStatusRequest": [("name", 1, "string", "")],
    "CudaSharedMemoryStatusResponse.RegionStatus": [
        ("name", 1, "string", ""), ("device_id", 2, "uint64", ""),
        ("byte_size", 3, "uint64", "")],
    "CudaSharedMemoryStatusResponse": [
        ("regions", 1, "CudaSharedMemoryStatusResponse.RegionStatus", "map")],
    "CudaSharedMemoryRegisterRequest": [
        ("name", 1, "string", ""), ("raw_handle", 2, "bytes", ""),
        ("device_id", 3, "int64", ""), ("byte_size", 4, "uint64", "")],
    "CudaSharedMemoryRegisterResponse": [],
    "CudaSharedMemoryUnregisterRequest": [("name", 1, "string", "")],
    "CudaSharedMemoryUnregisterResponse": [],
    # the repository extension
    "RepositoryIndexRequest": [("repository_name", 1, "string", ""), ("ready", 2, "bool", "")],
    "RepositoryIndexResponse.ModelIndex": [
        ("name", 1, "string", ""), ("version", 2, "string", ""), ("state", 3, "string", ""),
        ("reason", 4, "string", "")],
    "RepositoryIndexResponse": [("models", 1, "RepositoryIndexResponse.ModelIndex",
                                 "repeated")],
    "ModelRepositoryParameter": [
        ("bool_param", 1, "bool", "oneof"), ("int64_param", 2, "int64", "oneof"),
        ("string_param", 3, "string", "oneof"), ("bytes_param", 4, "bytes", "oneof")],
    "RepositoryModelLoadRequest": [
        ("repository_name", 1, "string", ""), ("model_name", 2, "string", ""),
        ("parameters", 3, "ModelRepositoryParameter", "map")],
    "RepositoryModelLoadResponse": [],
    "RepositoryModelUnloadRequest": [
        ("repository_name", 1, "string", ""), ("model_name", 2, "string", ""),
        ("parameters", 3, "ModelRepositoryParameter", "map")],
    "RepositoryModelUnloadResponse": [],
}
# rpc: (request, response)
METHODS = {name: (f"{name}Request", f"{name}Response") for name in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
    "ModelInfer", "ModelStatistics", "ModelConfig", "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "RepositoryIndex",
    "RepositoryModelLoad", "RepositoryModelUnload")}


def _build() -> descriptor_pool.DescriptorPool:
    fd = descriptor_pb2.FileDescriptorProto(name="gpserve/oip/inference.proto",
                                            package="inference", syntax="proto3")
    made: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full, fields in sorted(MESSAGES.items(), key=lambda m: m[0].count(".")):  # outer first
        outer, _, inner = full.rpartition(".")
        msg = (made[outer].nested_type if outer else fd.message_type).add(name=inner)
        made[full] = msg
        for name, number, kind, label in fields:
            field = msg.field.add(name=name, number=number)
            if label == "map":                  # map<string, kind>: entries on the wire
                entry = msg.nested_type.add(name=name.title().replace("_", "") + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=_F.TYPE_STRING,
                                label=_F.LABEL_OPTIONAL)
                entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE,
                                type_name=f".inference.{kind}", label=_F.LABEL_OPTIONAL)
                field.type, field.label = _F.TYPE_MESSAGE, _F.LABEL_REPEATED
                field.type_name = f".inference.{full}.{entry.name}"
                continue
            field.label = _F.LABEL_REPEATED if label == "repeated" else _F.LABEL_OPTIONAL
            if kind in _SCALARS:
                field.type = _SCALARS[kind]
            else:
                field.type, field.type_name = _F.TYPE_MESSAGE, f".inference.{kind}"
            if label == "oneof":
                if not msg.oneof_decl:
                    msg.oneof_decl.add(name="parameter_choice")
                field.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return pool


_POOL = _build()


def message(name: str):
    """The message class of ``name`` (e.g. ``ModelInferRequest``)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"inference.{name}"))
