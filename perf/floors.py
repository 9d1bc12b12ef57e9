"""Two servers that answer every POST with the same bytes, no model, no decoding: what
the HTTP layers under gpserve's fast path cost alone, next to gpserve and Go's echo in
``perf/small.py --floors``.

``python``: the least a Python server can do per request (uvloop, httptools' parser,
the answer written when the request is whole). ``gpserve-http``: gpserve's own front
protocol (:class:`gpserve.connections.GuardedProtocol` on uvicorn, its guards and fast
path) with a ``fast_post`` that returns the answer at once: all of a front but the
request's decoding, the model's path and the response's encoding. ``hop``:
``gpserve-http`` whose every request first crosses to one more process and back, the
least a front -> worker -> front hop can cost in Python: the body's bytes over a Unix
socket, every message a side queued in one event-loop turn in one write, nothing else
(no decoding, no shared memory, no batching policy, no deadlines, no deaths watched).
What ``--placement workers`` adds to it is what gpserve's hop costs beyond the two
wake-ups and four system calls a batch of requests must pay.

Each serves from ``--processes`` processes (as many as gpserve's fronts), each with its
own listening socket on the same port (``SO_REUSEPORT``: the kernel spreads
connections across them).

    python perf/floors.py python --port 9300 --answer-file answer.bin --processes 2
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import os
import socket
import struct
import sys
from pathlib import Path

from _common import exit_cleanly_on_sigterm


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve_python(port: int, answer: bytes) -> None:
    import httptools
    import uvloop
    response = (b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"content-length: %d\r\n\r\n" % len(answer)) + answer

    class Answering(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(response)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            Answering, sock=listening_socket(port))
        await server.serve_forever()
    uvloop.run(main())


def serve_gpserve_http(port: int, answer: bytes, fast_post=None) -> None:
    import uvicorn

    from gpserve.answer import Answer
    from gpserve.connections import guarded_protocol

    async def answer_at_once(body, client, url, headers) -> Answer:
        return Answer(200, answer, "infer", received=len(body))

    async def other(scope, receive, send) -> None:    # what the fast path leaves (no
        if scope["type"] != "http":                     # keep-alive, say): the same answer
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})
    config = uvicorn.Config(
        other, loop="uvloop", lifespan="off", access_log=False, log_config=None, ws="none",
        log_level="warning", http=guarded_protocol(10, fast_post=fast_post or answer_at_once,
                                                   fast_limit=256 * 1024))
    uvicorn.Server(config).run(sockets=[listening_socket(port)])


class Frames(asyncio.Protocol):
    """One end of the hop: ``uint32 length | (uint32 id, bytes)...`` frames, everything
    ``send`` queued in one event-loop turn written at its end in one write."""

    def __init__(self, on_message):
        self.on_message, self.out, self.buf = on_message, [], b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()     # once: each call is a getpid()

    def send(self, req_id: int, data: bytes) -> None:
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(HOP_MESSAGE.pack(req_id, len(data)) + data)

    def flush(self) -> None:
        payload = b"".join(self.out)
        self.out.clear()
        self.transport.write(HOP_LEN.pack(len(payload)) + payload)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            (size,) = HOP_LEN.unpack_from(self.buf)
            if len(self.buf) < 4 + size:
                return
            at, end = 4, 4 + size
            while at < end:
                req_id, n = HOP_MESSAGE.unpack_from(self.buf, at)
                at += HOP_MESSAGE.size
                self.on_message(self, req_id, self.buf[at:at + n])
                at += n
            self.buf = self.buf[end:]


HOP_LEN, HOP_MESSAGE = struct.Struct("<I"), struct.Struct("<II")


def serve_hop_peer(sock: socket.socket) -> None:
    """The other process of ``hop``: sends every message back as it came."""
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: Frames(lambda end, req_id, data: end.send(req_id, data)), sock=sock)
        await server.serve_forever()
    uvloop.run(main())


def serve_hop(port: int, answer: bytes, peer: str) -> None:
    """``gpserve-http`` whose requests go to ``serve_hop_peer`` and back first."""
    from gpserve.answer import Answer
    waiting: dict[int, asyncio.Future] = {}
    ids = itertools.count()
    link: list[asyncio.Task] = []           # connected by the first request

    def arrived(end, req_id: int, data: bytes) -> None:
        waiting.pop(req_id).set_result(data)

    async def fast_post(body, client, url, headers) -> Answer:
        if not link:                        # uvloop takes no abstract address: a socket
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(peer)
            loop = asyncio.get_running_loop()
            link.append(loop.create_task(loop.create_unix_connection(
                lambda: Frames(arrived), sock=sock)))
        _, end = await link[0]
        req_id = next(ids)
        waiting[req_id] = future = end.loop.create_future()
        end.send(req_id, bytes(body))
        await future
        return Answer(200, answer, "infer", received=len(body))
    serve_gpserve_http(port, answer, fast_post)


SERVERS = {"python": serve_python, "gpserve-http": serve_gpserve_http, "hop": serve_hop}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(SERVERS))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--answer-file", type=Path, required=True)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args(argv)
    answer = args.answer_file.read_bytes()
    serve, extra = SERVERS[args.kind], ()
    exit_cleanly_on_sigterm()        # so that exiting stops the daemon children too
    children = []
    if args.kind == "hop":           # the peer listens before any front connects
        extra = (f"\0gpserve-floor-hop-{os.getpid()}",)
        peer = socket.socket(socket.AF_UNIX)
        peer.bind(extra[0])
        peer.listen(64)
        peer.setblocking(False)
        children.append(mp.Process(target=serve_hop_peer, args=(peer,), daemon=True))
    children += [mp.Process(target=serve, args=(args.port, answer, *extra), daemon=True)
                 for _ in range(args.processes - 1)]
    for child in children:
        child.start()
    try:
        serve(args.port, answer, *extra)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
