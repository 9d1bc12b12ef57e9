"""The supervisor's control socket: how a front asks it to load or unload a model (the
repository API, ``--model-control explicit``).

One request per connection: a JSON line ``{"op": "load"|"unload", "name": ...}`` from
the front, and one JSON line back once it is done (``{"ok": true}``, or ``{"ok": false,
"error": why}``). A load answers once the model is ready in every front, so it can take
as long as a model's load and warm-up. The socket is an abstract Unix socket named after
the run, and only processes of the server's own user may connect (``SO_PEERCRED``), as
for the links between fronts and workers (:mod:`gpserve.ipc`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket

from .ipc import same_user

log = logging.getLogger("gpserve.supervisor")
MAX_REQUEST_BYTES = 4096
READ_S = 1.0                 # a connected front sends its line at once


def address(run_id: str) -> str:
    return f"\0gpserve-{run_id}-control"


def listen(run_id: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address(run_id))
    sock.listen(64)
    sock.setblocking(False)
    return sock


class Call:
    """One front's request, held by the supervisor until it is answered."""

    def __init__(self, conn: socket.socket, message: dict):
        self.conn, self.message = conn, message

    def answer(self, ok: bool, error: str = "") -> None:
        try:
            self.conn.sendall(json.dumps({"ok": ok, "error": error}).encode() + b"\n")
        except OSError:
            pass                                  # the front went away: nothing to tell
        finally:
            self.conn.close()


def accept(sock: socket.socket) -> Call | None:
    """The request waiting on ``sock`` (None: none, or one to drop)."""
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return None
    if not same_user(conn):
        log.warning("refused a control connection from another user's process")
        conn.close()
        return None
    conn.settimeout(READ_S)
    try:
        line = conn.makefile("rb").readline(MAX_REQUEST_BYTES)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        log.warning("a malformed control request (%s): dropped", e)
        conn.close()
        return None
    return Call(conn, message)


async def ask(run_id: str, op: str, name: str) -> dict:
    """A front's request to the supervisor; the supervisor's answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:                       # (uvloop takes an abstract address only as a socket)
        await asyncio.get_running_loop().sock_connect(sock, address(run_id))
        if not same_user(sock):
            raise PermissionError("the control socket's process is another user's")
    except OSError:
        sock.close()
        raise
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        writer.write(json.dumps({"op": op, "name": name}).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line:
        return {"ok": False, "error": "the supervisor closed the request unanswered "
                                      "(it is stopping)"}
    return json.loads(line)
