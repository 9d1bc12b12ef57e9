"""Two servers that answer every POST with the same bytes, no model, no decoding: what
the HTTP layers under gpserve's fast path cost alone, next to gpserve and Go's echo in
``perf/small.py --floors``.

``python``: the least a Python server can do per request (uvloop, httptools' parser,
the answer written when the request is whole). ``gpserve-http``: gpserve's own front
protocol (:class:`gpserve.connections.GuardedProtocol` on uvicorn, its guards and fast
path) with a ``fast_post`` that returns the answer at once: all of a front but the
request's decoding, the model's path and the response's encoding.

Each serves from ``--processes`` processes (as many as gpserve's fronts), each with its
own listening socket on the same port (``SO_REUSEPORT``: the kernel spreads
connections across them).

    python perf/floors.py python --port 9300 --answer-file answer.bin --processes 2
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
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


def serve_gpserve_http(port: int, answer: bytes) -> None:
    import uvicorn

    from gpserve.answer import Answer
    from gpserve.connections import guarded_protocol

    async def fast_post(body, client, url, headers) -> Answer:
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
        log_level="warning", http=guarded_protocol(10, fast_post=fast_post,
                                                   fast_limit=256 * 1024))
    uvicorn.Server(config).run(sockets=[listening_socket(port)])


SERVERS = {"python": serve_python, "gpserve-http": serve_gpserve_http}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(SERVERS))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--answer-file", type=Path, required=True)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args(argv)
    answer = args.answer_file.read_bytes()
    serve = SERVERS[args.kind]
    exit_cleanly_on_sigterm()        # so that exiting stops the daemon children too
    children = [mp.Process(target=serve, args=(args.port, answer), daemon=True)
                for _ in range(args.processes - 1)]
    for child in children:
        child.start()
    try:
        serve(args.port, answer)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
