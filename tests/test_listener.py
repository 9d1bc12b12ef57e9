"""Connections spread evenly over the fronts that share the listening socket."""
import socket

import numpy as np

from gpserve import protocol as P
from gpserve.testing import Server, eventually


def test_connections_opened_at_once_spread_over_the_fronts():
    """16 keep-alive connections opened together (a client pool's start): each front
    takes its share. Left to the event loop, the first front to wake took all 16 in
    half the runs, and served them alone."""
    body = bytes(P.encode_request(P.InferRequest([np.ones((1, 4), np.float32)])))
    request = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    with Server("--model", "echo", "--fronts", "2") as s:
        port = int(s.url.rsplit(":", 1)[1])
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
        try:
            for c in conns:
                c.sendall(request)
            for c in conns:                        # answered: accepted, and kept open
                assert c.recv(65536).startswith(b"HTTP/1.1 200")
            eventually(lambda: sum(s.info()["processes"]["connections"]) >= 16, 10,
                       "16 connections counted")
            counts = s.info()["processes"]["connections"]
            assert min(counts) >= 4, counts
        finally:
            for c in conns:
                c.close()
        # closed: counted down (the one left may be this GET's own connection)
        eventually(lambda: sum(s.info()["processes"]["connections"]) <= 1, 10, "closed")
