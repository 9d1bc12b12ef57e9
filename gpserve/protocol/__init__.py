"""The GraphPipe wire format: messages, a validating zero-copy decoder, a one-copy encoder.

Public API (stable)::

    encode_request(InferRequest | MetadataRequest) -> memoryview
    decode_request(buf) -> InferRequest | MetadataRequest
    encode_response(InferResponse) -> memoryview
    decode_response(buf) -> InferResponse
    encode_error(code, message) -> memoryview          # an InferResponse with one Error
    encode_metadata_response(MetadataResponse) -> memoryview
    decode_metadata_response(buf) -> MetadataResponse

Encoders return a ``memoryview`` of bytes: send it as it is (sockets, uvicorn, urllib3,
aiohttp accept it) or call ``bytes()`` on it. Decoders accept any bytes-like object and
raise only :class:`gpserve.errors.ProtocolError`; decoded numeric arrays view the buffer,
so keep it alive and unchanged while they are in use (bytes input gives read-only views).
"""
from ..errors import ProtocolError, UnsupportedRequest
from .decode import (
    MAX_RANK,
    MAX_TENSORS,
    decode_metadata_response,
    decode_request,
    decode_response,
)
from .encode import (
    encode_error,
    encode_metadata_response,
    encode_request,
    encode_response,
)
from .messages import (
    TYPE_NAMES,
    TYPE_TO_DTYPE,
    Error,
    InferRequest,
    InferResponse,
    IOMetadata,
    MetadataRequest,
    MetadataResponse,
    Request,
    type_name,
    type_of,
)

__all__ = [
    "ProtocolError", "UnsupportedRequest", "MAX_RANK", "MAX_TENSORS",
    "decode_request", "decode_response", "decode_metadata_response",
    "encode_request", "encode_response", "encode_error", "encode_metadata_response",
    "Error", "InferRequest", "InferResponse", "IOMetadata", "MetadataRequest",
    "MetadataResponse", "Request", "TYPE_NAMES", "TYPE_TO_DTYPE", "type_name", "type_of",
]
