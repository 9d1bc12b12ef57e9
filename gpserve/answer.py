"""What a protocol's route answers, in one shape for every door: the HTTP status, the
body, the headers, and what the access log and metrics say of it."""
from __future__ import annotations

from dataclasses import dataclass

Headers = tuple[tuple[bytes, bytes], ...]
OCTETS: Headers = ((b"content-type", b"application/octet-stream"),)
JSON: Headers = ((b"content-type", b"application/json"),)


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes | memoryview
    kind: str                    # infer, metadata, error, v2_infer...: the access log's
    headers: Headers = OCTETS    # besides Content-Length, which the sender adds
    received: int = 0            # the request's body, in bytes (for the access log)
