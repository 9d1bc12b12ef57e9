"""Every error gpserve reports, with its GraphPipe code and HTTP status, in one place.

A client receives these as a GraphPipe ``InferResponse`` whose ``errors`` hold one
``Error(code, message)``, sent with the HTTP status below. ``docs/errors.md`` is the
table for users; keep the two in step.
"""
from __future__ import annotations


class GraphPipeError(Exception):
    """An error with a GraphPipe code, an HTTP status and a message a person can act on."""

    code: int = 13
    http_status: int = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, message={self.message!r})"


class ProtocolError(GraphPipeError, ValueError):
    """The bytes are not a well-formed GraphPipe message (the only error the codec raises)."""

    code, http_status = 1, 400


class UnsupportedRequest(ProtocolError):
    """A well-formed message that is not an ``InferRequest`` or ``MetadataRequest``."""

    code, http_status = 2, 400


class UnknownInput(GraphPipeError):
    code, http_status = 3, 400


class UnknownOutput(GraphPipeError):
    code, http_status = 4, 400


class WrongInputCount(GraphPipeError):
    code, http_status = 5, 400


class DtypeMismatch(GraphPipeError):
    code, http_status = 6, 400


class ShapeMismatch(GraphPipeError):
    code, http_status = 7, 400


class BodyTooLarge(GraphPipeError):
    code, http_status = 8, 413


class QueueFull(GraphPipeError):
    code, http_status = 9, 503


class DeadlineExceeded(GraphPipeError):
    code, http_status = 10, 504


class ModelError(GraphPipeError):
    """The model's runtime raised while running a batch."""

    code, http_status = 11, 500


class Unavailable(GraphPipeError):
    """The server is starting, draining, or has no worker for the model."""

    code, http_status = 12, 503


class InternalError(GraphPipeError):
    code, http_status = 13, 500


class BadConfig(GraphPipeError):
    """The request's ``config`` string is not one gpserve understands."""

    code, http_status = 14, 400


class TooManyRows(GraphPipeError):
    """A request with more rows than the queue holds: it could never be queued."""

    code, http_status = 15, 413


class RequestTimeout(GraphPipeError):
    """The request's body stopped arriving."""

    code, http_status = 16, 408


class InvalidString(GraphPipeError):
    """A String element the model's runtime cannot take as it is (ONNX Runtime's strings
    are UTF-8 text: bytes that are not UTF-8 would reach it garbled)."""

    code, http_status = 17, 400


class UnsupportedEncoding(GraphPipeError):
    """A ``Content-Encoding`` gpserve does not decode (it takes gzip and deflate)."""

    code, http_status = 18, 415


class Forbidden(GraphPipeError):
    """A restricted API called without what the operator requires (``--restricted-api``)."""

    code, http_status = 19, 403


class ModelControlFailed(GraphPipeError):
    """A repository API call (load, unload) that could not be done: the message says
    why (the model's load error, a control mode that takes no such call)."""

    code, http_status = 21, 400


class UnknownModel(GraphPipeError):
    """A model name (or version) this server does not serve, in Triton's words (clients
    match on them)."""

    code, http_status = 20, 404

    @classmethod
    def named(cls, name: str, version: str | None = None) -> "UnknownModel":
        return cls(f"Request for unknown model: '{name}'"
                   + (f" version {version}" if version else "") + " is not found")


ALL_ERRORS: tuple[type[GraphPipeError], ...] = (
    ProtocolError, UnsupportedRequest, UnknownInput, UnknownOutput, WrongInputCount,
    DtypeMismatch, ShapeMismatch, BodyTooLarge, QueueFull, DeadlineExceeded,
    ModelError, Unavailable, InternalError, BadConfig, TooManyRows, RequestTimeout,
    InvalidString, UnsupportedEncoding, Forbidden, UnknownModel,
)
BY_CODE: dict[int, type[GraphPipeError]] = {e.code: e for e in ALL_ERRORS}


def from_code(code: int, message: str) -> GraphPipeError:
    """Rebuild the typed error for a code received from a server (unknown codes stay generic)."""
    cls = BY_CODE.get(code)
    if cls is None:
        err = GraphPipeError(message)
        err.code = code
        return err
    return cls(message)
