"""GraphPipe clients: graphpipe-1.0.4-style functions, a keep-alive ``Client``, an ``AsyncClient``.

Moving from the original package is a change of import::

    from gpserve.client import execute, execute_multi, metadata   # was graphpipe.remote

Differences that help: connections are kept alive across calls, server errors raise
typed exceptions (:mod:`gpserve.errors`) carrying the server's GraphPipe code, message
and HTTP status, and ``metadata`` returns a :class:`~gpserve.protocol.MetadataResponse`.
Output arrays view the received response body (no copy; read-only).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import urllib3

from . import protocol as P
from .errors import GraphPipeError, InternalError, ProtocolError, Unavailable, from_code

_HEADERS = {"Content-Type": "application/octet-stream"}


def _request_body(inputs, input_names, output_names, config) -> memoryview:
    return P.encode_request(P.InferRequest(
        inputs=[a if isinstance(a, np.ndarray) else np.asarray(a) for a in inputs],
        input_names=list(input_names or ()), output_names=list(output_names or ()),
        config=config or ""))


class ConnectionFailed(Unavailable):
    """No HTTP answer came back: the server is not up, or the connection broke.

    ``http_status`` is 0 (there was none); the message names the URL and the cause.
    """

    http_status = 0


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection failure, in a few words."""
    while True:
        inner = getattr(exc, "reason", None) or getattr(exc, "os_error", None) or exc.__cause__
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        text = os.strerror(exc.errno) if exc.errno else (exc.strerror or "")
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _connection_failed(uri: str, exc: BaseException) -> ConnectionFailed:
    return ConnectionFailed(f"cannot connect to {uri}: {_cause(exc)}")


def _raise_for(status: int, body: bytes, uri: str) -> None:
    """Turn a failed answer into the server's typed error (or a plain one for non-GraphPipe)."""
    try:
        errors = P.decode_response(body).errors
    except ProtocolError:
        errors = []
    if errors:
        err = from_code(int(errors[0].code), errors[0].message)
    else:
        text = body[:300].decode("utf-8", "replace")
        err = InternalError(f"HTTP {status} from {uri}: {text}")
    err.http_status = status
    raise err


def _outputs(status: int, body: bytes, uri: str) -> list[np.ndarray]:
    if status != 200:
        _raise_for(status, body, uri)
    resp = P.decode_response(body)
    if resp.errors:
        _raise_for(status, body, uri)
    return resp.outputs


def _metadata(status: int, body: bytes, uri: str) -> P.MetadataResponse:
    if status != 200:
        _raise_for(status, body, uri)
    return P.decode_metadata_response(body)


def _single(outputs: list[np.ndarray]):
    return outputs[0] if len(outputs) == 1 else outputs


class Client:
    """A GraphPipe client for one server that keeps its connections alive (thread-safe)."""

    def __init__(self, uri: str, timeout: float = 60.0, max_connections: int = 16):
        self.uri = uri
        self._pool = urllib3.PoolManager(
            maxsize=max_connections, block=False, retries=False,
            timeout=urllib3.Timeout(total=timeout))

    def _post(self, body) -> tuple[int, bytes]:
        try:
            resp = self._pool.request("POST", self.uri, body=body, headers=_HEADERS)
        except urllib3.exceptions.HTTPError as e:
            raise _connection_failed(self.uri, e) from None
        return resp.status, resp.data

    def execute(self, array, input_name: str | None = None, output_name: str | None = None):
        """One input, one output (or a list when the model returns several)."""
        return _single(self.execute_multi(
            [array], None if input_name is None else [input_name],
            None if output_name is None else [output_name]))

    def execute_multi(self, inputs: Sequence, input_names: Sequence[str] | None = None,
                      output_names: Sequence[str] | None = None,
                      config: str | None = None) -> list[np.ndarray]:
        return _outputs(*self._post(_request_body(inputs, input_names, output_names, config)),
                        self.uri)

    def metadata(self) -> P.MetadataResponse:
        return _metadata(*self._post(P.encode_request(P.MetadataRequest())), self.uri)

    def close(self) -> None:
        self._pool.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client` (aiohttp); use ``async with`` or ``await close()``."""

    def __init__(self, uri: str, timeout: float = 60.0, max_connections: int = 100):
        import aiohttp  # imported here: the sync client does not need it
        self.uri = uri
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=max_connections))

    async def _post(self, body) -> tuple[int, bytes]:
        import aiohttp
        try:
            async with self._session.post(self.uri, data=body, headers=_HEADERS) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise _connection_failed(self.uri, e) from None

    async def execute(self, array, input_name: str | None = None,
                      output_name: str | None = None):
        return _single(await self.execute_multi(
            [array], None if input_name is None else [input_name],
            None if output_name is None else [output_name]))

    async def execute_multi(self, inputs: Sequence, input_names: Sequence[str] | None = None,
                            output_names: Sequence[str] | None = None,
                            config: str | None = None) -> list[np.ndarray]:
        body = _request_body(inputs, input_names, output_names, config)
        return _outputs(*await self._post(body), self.uri)

    async def metadata(self) -> P.MetadataResponse:
        return _metadata(*await self._post(P.encode_request(P.MetadataRequest())), self.uri)

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


_clients: dict[str, Client] = {}


def _client(uri: str) -> Client:
    client = _clients.get(uri)
    if client is None:
        client = _clients.setdefault(uri, Client(uri))
    return client


def execute(uri: str, array, input_name: str | None = None, output_name: str | None = None):
    """As ``graphpipe.remote.execute``: one array in; the output (or list of outputs) back."""
    return _client(uri).execute(array, input_name, output_name)


def execute_multi(uri: str, inputs: Sequence, input_names: Sequence[str] | None,
                  output_names: Sequence[str] | None, config: str | None = None):
    """As ``graphpipe.remote.execute_multi``: lists in, the list of outputs back."""
    return _client(uri).execute_multi(inputs, input_names, output_names, config)


def metadata(uri: str) -> P.MetadataResponse:
    """As ``graphpipe.remote.metadata``, returning a :class:`~gpserve.protocol.MetadataResponse`."""
    return _client(uri).metadata()


__all__ = ["Client", "AsyncClient", "execute", "execute_multi", "metadata", "GraphPipeError",
           "ConnectionFailed"]
