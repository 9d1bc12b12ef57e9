"""A front's connections (gpserve.connections): a response leaves in one write
(OneWrite), and a small GraphPipe request whose body came whole with its headers is
answered on the fast path, without ASGI. In-process with a stand-in transport (and a
stand-in handler), and over raw sockets against a real server: the cases OneWrite must
not hold back (100 Continue, HEAD, pipelined requests), and the fast path and uvicorn's
path answering alike."""
import asyncio
import json
import socket
import time

import numpy as np
import uvicorn
from uvicorn.server import ServerState

from gpserve import errors as E
from gpserve import protocol as P
from gpserve.answer import Answer
from gpserve.connections import guarded_protocol
from gpserve.fastpath import CONTINUE, OneWrite, ResponseHead, fast_path_takes
from gpserve.testing import Server, eventually


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

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 80)}.get(
            name, default)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


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
        return read_responses(s, bodiless, got)


def read_responses(s: socket.socket, bodiless: list[bool], got: bytes = b""):
    """One whole response per entry of ``bodiless`` from ``s``: [(head, body)]."""
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


# The fast path ---------------------------------------------------------------------

def test_which_requests_the_fast_path_takes():
    ok = dict(method=b"POST", url=b"/", version="1.1", keep_alive=True,
              headers=[(b"host", b"x"), (b"content-length", b"100")], expect_continue=False,
              limit=1000)
    assert fast_path_takes(**ok)
    binary = [(b"content-length", b"100"), (b"inference-header-content-length", b"60")]
    for url in (b"/v2/models/m/infer", b"/v2/models/m/versions/1/infer"):
        assert fast_path_takes(**{**ok, "url": url, "headers": binary})   # binary v2
        assert not fast_path_takes(**{**ok, "url": url})                  # JSON only
    assert not fast_path_takes(**{**ok, "url": b"/v2/models/m/infer?x=1", "headers": binary})
    for change in ({"method": b"GET"}, {"url": b"/?x=1"}, {"url": b"/v2/models"},
                   {"version": "1.0"}, {"keep_alive": False}, {"expect_continue": True},
                   {"limit": 99},
                   {"headers": [(b"host", b"x")]},                           # no length
                   {"headers": [(b"content-length", b"100"), (b"content-length", b"100")]},
                   {"headers": [(b"content-length", b"+100")]},
                   {"headers": [(b"content-length", b"100"),
                                (b"transfer-encoding", b"chunked")]}):
        assert not fast_path_takes(**{**ok, **change}), change


def test_the_response_head_carries_uvicorn_s_default_headers_of_the_moment():
    head = ResponseHead(b"application/octet-stream")
    defaults = [(b"date", b"Sat, 28 Nov 2026 07:00:00 GMT")]
    assert head(200, 52, defaults, True) == (
        b"HTTP/1.1 200 OK\r\ndate: Sat, 28 Nov 2026 07:00:00 GMT\r\n"
        b"content-type: application/octet-stream\r\ncontent-length: 52\r\n\r\n")
    typed = ((b"content-type", b"application/json"), (b"inference-header-content-length",
                                                       b"12"))
    assert head(200, 12, defaults, True, typed) == (                  # an answer's own headers
        b"HTTP/1.1 200 OK\r\ndate: Sat, 28 Nov 2026 07:00:00 GMT\r\n"
        b"content-type: application/json\r\ninference-header-content-length: 12\r\n"
        b"content-length: 12\r\n\r\n")
    later = [(b"date", b"Sat, 28 Nov 2026 07:00:01 GMT")]       # uvicorn's next second
    assert head(400, 0, later, False) == (
        b"HTTP/1.1 400 Bad Request\r\ndate: Sat, 28 Nov 2026 07:00:01 GMT\r\n"
        b"content-type: application/octet-stream\r\ncontent-length: 0\r\n"
        b"connection: close\r\n\r\n")


def _connection(seen: list):
    """A connection of a front whose fast path and ASGI app record what they get."""
    async def fast_post(body, client, url, headers):
        if url != b"/":                                   # a v2 infer: its url and header
            seen.append(("fast", url, dict(headers)[b"inference-header-content-length"]))
        seen.append(("fast", bytes(body)))
        return Answer(200, b"answer:" + body, "infer")

    async def app(scope, receive, send):
        message = await receive()
        seen.append(("asgi", message["body"]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn.Config(app, access_log=False, log_config=None)
    config.load()
    protocol = guarded_protocol(10.0, fast_post=fast_post, fast_limit=64)(
        config=config, server_state=ServerState(), app_state={},
        _loop=asyncio.get_running_loop())
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


def _until(condition):
    async def wait():
        while not condition():
            await asyncio.sleep(0)
    return asyncio.wait_for(wait(), 5)


def test_a_whole_small_request_takes_the_fast_path_and_anything_else_uvicorn_s():
    async def scenario():
        seen = []
        protocol, transport = _connection(seen)
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
        protocol.data_received(request + b"hello")               # whole: the fast path
        await _until(lambda: len(transport.writes) == 1)
        assert seen == [("fast", b"hello")]
        assert transport.writes[0].endswith(b"content-length: 12\r\n\r\nanswer:hello")
        protocol.data_received(request + b"he")                  # split: uvicorn's path
        protocol.data_received(b"llo")
        await _until(lambda: len(transport.writes) == 2)
        assert seen[1] == ("asgi", b"hello") and transport.writes[1].endswith(b"\r\n\r\nok")
        big = b"x" * 65                                          # over the limit
        protocol.data_received(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n" + big)
        await _until(lambda: len(transport.writes) == 3)
        assert seen[2] == ("asgi", big)
        # pipelined behind a fast-path request: answered after it, in order
        protocol.data_received(request + b"first" + request + b"secnd")
        await _until(lambda: len(transport.writes) == 5)
        assert seen[3:] == [("fast", b"first"), ("asgi", b"secnd")]
        assert transport.writes[3].endswith(b"answer:first")
        assert transport.writes[4].endswith(b"ok") and not transport.closed
        # a v2 infer with binary data: the fast path, with its own url and headers
        v2 = b"POST /v2/models/m/infer HTTP/1.1\r\nInference-Header-Content-Length: 3\r\n"
        protocol.data_received(v2 + b"Content-Length: 5\r\n\r\nhello")
        await _until(lambda: len(transport.writes) == 6)
        assert seen[5:] == [("fast", b"/v2/models/m/infer", b"3"), ("fast", b"hello")]
        protocol.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 2\r\n"
                               b"\r\n{}")                   # JSON only: uvicorn's path
        await _until(lambda: len(transport.writes) == 7)
        assert seen[7] == ("asgi", b"{}")
        protocol.connection_lost(None)
    asyncio.run(scenario())


def test_the_fast_path_and_uvicorn_s_answer_alike_over_a_real_connection():
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    body = bytes(P.encode_request(P.InferRequest([x])))
    bad = body[:-3]
    with Server("--model", "echo", "--fronts", "1") as s:
        def exchange(*chunks, gap=0.0):
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i, chunk in enumerate(chunks):
                    if i:
                        time.sleep(gap)      # the rest in a later read: uvicorn's path
                    sock.sendall(chunk)
                [(head, answer)] = read_responses(sock, [False])
                return head, answer
        fast = exchange(post(body) + body)
        split = exchange(post(body) + body[:50], body[50:], gap=0.2)
        chunked = exchange(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        for head, answer in (fast, split, chunked):
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert _header_names(head) == [b"date", b"content-type", b"content-length"]
            assert answer == fast[1]
        np.testing.assert_array_equal(P.decode_response(fast[1]).outputs[0], x)
        # a malformed body: the same GraphPipe error either way
        errors = [exchange(post(bad) + bad), exchange(post(bad) + bad[:50], bad[50:], gap=0.2)]
        for head, answer in errors:
            assert head.startswith(b"HTTP/1.1 400 ") and answer == errors[0][1]
        [error] = P.decode_response(errors[0][1]).errors
        assert error.code == E.ProtocolError.code and "malformed" in error.message, error
        eventually(lambda: s.metric("gpserve_requests_total", status="200",
                                    kind="infer") == 3, 10, "the answers counted")
        assert s.metric("gpserve_requests_total", status="400", kind="error") == 2


def test_v2_binary_answers_alike_on_the_fast_path_and_uvicorn_s():
    """The same binary-extension infer request whole (the fast path) and split over two
    reads (uvicorn's): the same status, headers and body; a wrong model the same 404."""
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": 64}}],
                         "outputs": [{"name": "x", "parameters": {"binary_data": True}}]})
    body = header.encode() + x.tobytes()
    with Server("--model", "echo", "--fronts", "1") as s:
        def exchange(path: bytes, split: bool):
            head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                    b"Inference-Header-Content-Length: %d\r\n\r\n" % (len(body), len(header)))
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(head + (body[:20] if split else body))
                if split:
                    time.sleep(0.2)                  # the rest in a later read
                    sock.sendall(body[20:])
                [(got_head, answer)] = read_responses(sock, [False])
                status, *lines = got_head.split(b"\r\n")
                return status, dict(line.lower().split(b": ", 1) for line in lines
                                    if not line.lower().startswith(b"date:")), answer
        fast = exchange(b"/v2/models/echo/infer", split=False)
        assert exchange(b"/v2/models/echo/infer", split=True) == fast
        status, headers, answer = fast
        assert status == b"HTTP/1.1 200 OK"
        length = int(headers[b"inference-header-content-length"])
        assert json.loads(answer[:length])["outputs"][0]["shape"] == [1, 16]
        assert np.frombuffer(answer[length:], np.float32).tolist() == x.ravel().tolist()
        wrong = exchange(b"/v2/models/other/infer", split=False)
        assert wrong == exchange(b"/v2/models/other/infer", split=True)
        assert wrong[0] == b"HTTP/1.1 404 Not Found" and b"other" in wrong[2]
        eventually(lambda: s.metric("gpserve_requests_total", status="200",
                                    kind="v2_infer") == 2, 10, "both answers counted")


def _header_names(head: bytes) -> list[bytes]:
    return [line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:]]
