"""A response leaves in one write (gpserve.connections.OneWrite): in-process with a
stand-in transport, and over raw sockets against a real server for the cases it must
not hold back (100 Continue, HEAD, pipelined requests)."""
import socket

import numpy as np

from gpserve import protocol as P
from gpserve.connections import CONTINUE, OneWrite
from gpserve.testing import Server


class Transport:
    """A stand-in for the connection's transport: records what is written."""

    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        self.writes.append(bytes(data))

    def writelines(self, parts):
        self.writes.append(tuple(bytes(p) for p in parts))

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


def test_the_head_leaves_with_the_body_in_one_write():
    t = Transport()
    w = OneWrite(t)
    w.write(HEAD)
    assert t.writes == []                       # held for the body
    w.write(memoryview(b"hello"))
    assert t.writes == [HEAD + b"hello"]
    w.write(b"more")                            # what follows goes as it comes
    assert t.writes[-1] == b"more"


def test_continue_passes_and_a_large_body_is_not_copied_onto_the_head():
    t = Transport()
    w = OneWrite(t)
    w.write(CONTINUE)
    assert t.writes == [CONTINUE]               # the client waits for it: never held
    w.write(HEAD)
    big = b"x" * OneWrite.JOIN_BELOW
    w.write(big)
    assert t.writes[1] == (HEAD, big)


def test_a_response_cut_short_still_sends_its_head_before_closing():
    t = Transport()
    w = OneWrite(t)
    w.write(HEAD)
    w.close()
    assert t.writes == [HEAD] and t.closed


def raw_exchange(port: int, chunks: list, bodiless: list[bool]) -> list[tuple[bytes, bytes]]:
    """Send ``chunks`` one after another (a chunk that is a callable is called with the
    bytes read so far and must return True before the next chunk goes), then read one
    whole response per entry of ``bodiless`` (True: it answers a HEAD, no body follows
    its head): [(head, body)]."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        got = b""
        for chunk in chunks:
            if callable(chunk):
                while not chunk(got):
                    data = s.recv(65536)
                    assert data, "the server closed the connection"
                    got += data
            else:
                s.sendall(chunk)
        out = []
        while len(out) < len(bodiless):
            if b"\r\n\r\n" in got:
                head, rest = got.split(b"\r\n\r\n", 1)
                if head.startswith(b"HTTP/1.1 100 "):
                    got = rest
                    continue
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                n = 0 if bodiless[len(out)] else length
                if len(rest) >= n:
                    out.append((head, rest[:n]))
                    got = rest[n:]
                    continue
            data = s.recv(65536)
            assert data, f"the server closed the connection after {len(out)} responses"
            got += data
        return out


def post(body: bytes, expect: bool = False) -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n" +
            (b"Expect: 100-continue\r\n" if expect else b"") +
            b"Content-Length: %d\r\n\r\n" % len(body))


def test_continue_head_and_pipelined_requests_over_a_real_connection():
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    body = bytes(P.encode_request(P.InferRequest([x])))
    with Server("--model", "echo", "--fronts", "1") as s:
        # Expect: the body goes only once 100 Continue came back
        [(head, answer)] = raw_exchange(
            s.port, [post(body, expect=True), lambda got: CONTINUE in got, body], [False])
        assert head.startswith(b"HTTP/1.1 200 ")
        np.testing.assert_array_equal(P.decode_response(answer).outputs[0], x)
        # HEAD: the head alone; the connection then serves the next request
        (h1, b1), (h2, b2) = raw_exchange(
            s.port, [b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + post(body) + body], [True, False])
        assert h1.startswith(b"HTTP/1.1 200 ") and b1 == b""
        np.testing.assert_array_equal(P.decode_response(b2).outputs[0], x)
        # three requests in one write: three whole answers, in order
        ys = [x + k for k in range(3)]
        requests = b"".join(post(bytes(P.encode_request(P.InferRequest([y])))) +
                            bytes(P.encode_request(P.InferRequest([y]))) for y in ys)
        answers = raw_exchange(s.port, [requests], [False] * 3)
        for (h, b), y in zip(answers, ys):
            assert h.startswith(b"HTTP/1.1 200 ")
            np.testing.assert_array_equal(P.decode_response(b).outputs[0], y)
