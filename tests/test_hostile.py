"""Hostile clients, crashes and a full cache: each defect found by trying gpserve as an
attacker and as an operator would, kept fixed. Bounded in time and size; synchronised
on what the server says, never on sleeps. Runs on echo, the default model and models
the tests build, so a fresh clone runs all of it."""
import collections
import contextlib
import http.client
import os
import signal
import socket
import threading
import time

import flatbuffers
import numpy as np
import pytest
from fbuild import finish_request, tensor_table
from test_cache import scale_model
from test_errors import assert_error, slow_model

from gpserve import errors as E
from gpserve import protocol as P
from gpserve.client import Client
from gpserve.shm import hold_run_lock, remove_stale_segments, run_is_alive, segment_path
from gpserve.testing import Server, eventually


def raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(data)
    return s


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = s.recv(1 << 16)
        except (ConnectionResetError, socket.timeout):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def read_all_once(s: socket.socket) -> bytes:
    """One answer on a keep-alive connection: its head and its Content-Length of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(1 << 16)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += s.recv(1 << 16)
    s.close()
    return head + b"\r\n\r\n" + rest


def post_head(length: int) -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: gpserve\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def shape_only_body(shape) -> bytes:
    """A Float32 tensor with this shape and no data (valid only if the shape is empty)."""
    b = flatbuffers.Builder(0)
    return finish_request(b, [tensor_table(b, 10, shape, data=b"")])


# 1. A full row cache keeps caching --------------------------------------------------

def test_a_full_cache_keeps_caching_through_a_server(tmp_path):
    model = scale_model(tmp_path / "wide.onnx", 2.0, width=4096)        # 16 KiB rows
    with Server("--model", str(model), "--cache", "--cache-dir", str(tmp_path / "rows"),
                "--cache-size-mb", "1", "--fronts", "1") as s, Client(s.url) as c:
        rng = np.random.default_rng(0)
        for _ in range(40):                                # 10 MiB through a 1 MiB cache
            c.execute(rng.standard_normal((16, 4096)).astype(np.float32), output_name="y")
        writes = s.info()["cache"]["writes"]
        eventually(lambda: s.info()["cache"]["writes"] >= 640, 60, "the writes")
        last = rng.standard_normal((8, 4096)).astype(np.float32)
        first = c.execute(last, output_name="y")
        eventually(lambda: s.info()["cache"]["writes"] >= 648, 60, "the last rows' write")
        before = s.rows_computed()
        np.testing.assert_array_equal(c.execute(last, output_name="y"), first)
        assert s.rows_computed() == before                 # still caching: all 8 were hits
        cache = s.info()["cache"]
    assert writes <= 640 and cache["errors"] == 0 and cache["last_error"] == ""
    assert cache["rotations"] >= 3 and cache["evictions"] > 0
    assert cache["file_bytes"] <= 1 << 20


# 2. An empty tensor that claims 1e11 rows -------------------------------------------

@pytest.mark.parametrize("cache", [True, False])
def test_an_empty_tensor_with_a_huge_dimension_is_refused_at_once(tmp_path, cache):
    flags = ["--cache", "--cache-dir", str(tmp_path)] if cache else []
    body = shape_only_body([10 ** 11, 3, 0, 192])
    assert len(body) < 200
    with Server("--model", "echo", *flags) as s:
        assert_error(s.url, body, 400, E.ProtocolError, "no elements but a dimension larger")
        with Client(s.url) as c:
            assert c.execute(np.ones((2, 2), np.float32)).tolist() == [[1, 1], [1, 1]]


# 3. Idle clients that announce large bodies ------------------------------------------

def test_idle_clients_announcing_huge_bodies_cannot_shut_others_out():
    """16 idle clients each announcing a 256 MiB body made 1-2 of every 8 ordinary 110 KB
    requests (in more than one read) fail 503 "held by bodies still arriving". A body
    now reserves arena memory only once 1 MiB of it has come: the idle ones hold none,
    and even clients that send 1 MiB and stall can refuse other large bodies, never the
    ordinary ones."""
    row = np.random.default_rng(0).random((1, 3, 48, 192), np.float32)     # 110 KB
    body = bytes(P.encode_request(P.InferRequest([row])))

    def ordinary() -> bytes:                     # in two pieces: not the fast path
        sock = raw(s.port, post_head(len(body)) + body[:16 << 10])
        sock.sendall(body[16 << 10:])
        return read_all_once(sock)
    with Server("--model", "echo", "--fronts", "1", "--body-timeout-s", "3") as s:
        idle = [raw(s.port, post_head(256 << 20) + b"0123456789") for _ in range(16)]
        stalled = [raw(s.port, post_head(256 << 20) + bytes(1 << 20) + bytes(64 << 10))
                   for _ in range(2)]            # past 1 MiB: these reserve, then stall
        try:
            eventually(lambda: s.metric("gpserve_connections_refused_total",
                                        reason="memory_held_by_slow_bodies") >= 1, 30,
                       "the second stalled body refused: the first holds half the arena")
            for _ in range(16):
                reply = ordinary()
                assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
                np.testing.assert_array_equal(
                    P.decode_response(reply.split(b"\r\n\r\n", 1)[1]).outputs[0], row)
            answers = [read_all(sock) for sock in idle + stalled]   # within --body-timeout-s
        finally:
            for sock in idle + stalled:
                sock.close()
        assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) == 17, answers
        assert sum(b"held by bodies still arriving" in a for a in answers) == 1
        big = np.random.default_rng(1).random((1024, 1024), np.float32)   # 4 MiB: streams
        with Client(s.url) as c:                 # once they are gone, large bodies pass
            np.testing.assert_array_equal(c.execute(big), big)
        assert s.metric("gpserve_connections_refused_total", reason="body_timeout") == 17
        assert s.stats()["errors"]["RequestTimeout"] == 17
    assert "body stopped arriving" in s.output()


# 4 and 10. String tensors that amplify ----------------------------------------------

def test_aliased_empty_strings_are_refused_before_any_is_read():
    b = flatbuffers.Builder(0)
    one = b.CreateString("")
    n = 1_000_000                                       # 4 MB of offsets to one string
    body = finish_request(b, [tensor_table(b, 12, [n], strings=[one] * n)])
    with Server("--model", "echo", "--max-strings", str(2 * n)) as s:   # past the count bound
        assert_error(s.url, body, 400, E.ProtocolError, "more bytes than the message holds")


def test_many_honest_strings_are_bounded_and_refused_early():
    many = np.array([[b""] * 100_000], dtype=object)            # one row of 100,000
    body = P.encode_request(P.InferRequest([many]))
    with Server("--model", "echo", "--max-strings", "65536") as s:
        assert_error(s.url, body, 400, E.ProtocolError, "more String elements",
                     "65536: --max-strings")
        with Client(s.url) as c:                        # up to the bound: served
            assert c.execute(many[:, :65536]).shape == (1, 65536)
    with Server() as s:                                 # a model with no String inputs
        assert_error(s.url, P.encode_request(P.InferRequest([many[:, :4]])), 400,
                     E.ProtocolError, "the model takes no String inputs",
                     "point Float32[-1, 2]")


# 5. kill -9 of the supervisor ---------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_children_die_with_a_killed_supervisor_and_their_segments_go_next_start():
    s = Server("--model", "echo", "--fronts", "2", "--placement", "workers")
    run, children = s.proc.pid, s.children()
    if len(children) < 4:           # 2 fronts, a worker, the resource tracker
        s.stop()
        raise AssertionError(f"expected 4 children, found {children}")
    os.kill(run, signal.SIGKILL)
    s.proc.wait()
    s.log.close()
    eventually(lambda: not any(_alive(p) for p in children), 30, "the orphans to die")
    assert not run_is_alive(str(run))
    with Server("--model", "echo", "--fronts", "1"):
        assert [p for p in os.listdir("/dev/shm") if p.startswith(f"gpserve-{run}-")] == []


def test_a_start_never_removes_the_segments_of_a_live_run():
    run = "4000001"                  # above any pid: only the lock can say it is alive
    lock, seg = segment_path(run, "lock"), segment_path(run, "front0-1")
    fd = hold_run_lock(run)
    try:
        open(seg, "wb").close()
        assert run_is_alive(run)
        remove_stale_segments()
        assert os.path.exists(seg) and os.path.exists(lock)
    finally:
        os.close(fd)                 # the last process of the run is gone
    assert not run_is_alive(run)
    remove_stale_segments()
    assert not os.path.exists(seg) and not os.path.exists(lock)


def test_another_user_s_lock_file_is_left_alone_and_the_start_goes_on():
    """Any local user can create a gpserve-*-lock file in /dev/shm: for a server of another
    user it is unreadable, and a start died of PermissionError; now it is skipped."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as two users")
    run = "4000002"
    lock, seg = segment_path(run, "lock"), segment_path(run, "front0-1")
    for path in (lock, seg):
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))     # root's, mode 0600
    try:
        os.seteuid(65534)                          # as nobody, in this process
        try:
            removed, foreign = remove_stale_segments()
            with pytest.raises(PermissionError):   # what the start used to die of
                run_is_alive(run)
        finally:
            os.seteuid(0)
        assert foreign >= 1 and os.path.exists(lock) and os.path.exists(seg)
    finally:
        for path in (lock, seg):
            os.unlink(path)


# 6. A dead child's shared memory ----------------------------------------------------

def test_a_dead_front_s_shared_memory_goes_when_it_is_restarted():
    with Server("--model", "echo", "--fronts", "1") as s, Client(s.url) as c:
        big = np.random.default_rng(1).random((256, 1024), np.float32)   # 1 MiB, streamed
        np.testing.assert_array_equal(c.execute(big), big)
        front = s.info()["processes"]["pids"]["fronts"][0]
        assert f"gpserve-{s.proc.pid}-front0-{front}" in s.segments()
        os.kill(front, signal.SIGKILL)
        eventually(lambda: s.stats()["front_restarts"] == 1, 30, "the front's restart")
        s.wait_ready(30)
        assert f"gpserve-{s.proc.pid}-front0-{front}" not in s.segments()
        new = s.info()["processes"]["pids"]["fronts"][0]
        assert new != front and f"gpserve-{s.proc.pid}-front0-{new}" in s.segments()


# 8. The drain refuses new connections instead of resetting them ----------------------

def test_the_drain_refuses_new_connections_and_resets_none():
    s = Server("--model", "echo", "--fronts", "2")
    body = bytes(P.encode_request(P.InferRequest([np.ones((1, 4), np.float32)])))
    request = post_head(len(body)) + body
    outcomes: dict[str, int] = {}
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                sock = raw(s.port, request)
                head = sock.recv(64)
                sock.close()
                kind = "ok" if head.startswith(b"HTTP/1.1 200") else f"other {head[:16]!r}"
            except ConnectionRefusedError:
                kind = "refused"
            except (ConnectionResetError, BrokenPipeError):
                kind = "reset"
            outcomes[kind] = outcomes.get(kind, 0) + 1
    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: outcomes.get("ok", 0) >= 200, 60, "requests flow")
        s.proc.send_signal(signal.SIGTERM)
        eventually(lambda: outcomes.get("refused", 0) >= 50, 60, "refused connections")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        s.stop()
    # Connections already in the kernel's accept queue at the instant listening stops
    # are reset: at most one per client thread. Before the fix, every connection that
    # came during the drain was accepted into a queue nobody read, then reset (16-22 a run).
    assert outcomes.get("reset", 0) <= len(threads), outcomes
    assert set(outcomes) <= {"ok", "refused", "reset"}, outcomes


def keep_alive_client(port: int, body: bytes, outcomes: list, stop: threading.Event) -> None:
    """Requests on one keep-alive connection until told to stop, reconnecting when an
    answer says ``connection: close``; every outcome recorded: ok, refused (no server
    listening: a load balancer tries another) or reset (a request lost)."""
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.connect()
            conn.request("POST", "/", body, {"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            r.read()
            outcomes.append("ok" if r.status == 200 else f"http{r.status}")
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except ConnectionRefusedError:
            outcomes.append("refused")
            return
        except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
            outcomes.append("reset")
            conn = None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_drains_cleanly_under_load(sig):
    """Ctrl-C in a terminal, and systemd's KillMode=control-group, signal every process
    of the group: every front died with a traceback (ValueError in the listener, a
    CancelledError from the lifespan), and under load connections were reset and a front
    waited out the whole graceful timeout. Now children leave those signals to the
    supervisor, which drains in order."""
    body = bytes(P.encode_request(P.InferRequest([np.ones((1, 16), np.float32)])))
    s = Server("--model", "standin:5,0", "--placement", "workers", "--workers", "2",
               "--fronts", "2", own_group=True)
    outcomes, stop = [], threading.Event()
    threads = [threading.Thread(target=keep_alive_client, args=(s.port, body, outcomes, stop))
               for _ in range(8)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: outcomes.count("ok") >= 200, 60, "requests flowing")
        os.killpg(s.proc.pid, sig)
        assert s.proc.wait(60) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        s.stop()
    output = s.output()
    assert "Traceback" not in output and "Error" not in output, output[-3000:]
    assert set(outcomes) <= {"ok", "refused"}, collections.Counter(outcomes)
    assert outcomes.count("refused") == len(threads)        # each saw the socket close


def test_an_idle_keep_alive_connection_s_next_request_is_answered_during_the_drain():
    """uvicorn's drain closes idle keep-alive connections at once: a client's next
    request on one was reset (3 of 4 runs). It now gets a moment to arrive, and is
    answered with connection: close."""
    body = bytes(P.encode_request(P.InferRequest([np.ones((1, 4), np.float32)])))
    for _ in range(3):
        s = Server("--model", "echo", "--fronts", "1")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            conn.request("POST", "/", body)
            assert conn.getresponse().read() and True
            s.proc.send_signal(signal.SIGTERM)

            def refused(port=s.port) -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    return False
                except ConnectionRefusedError:
                    return True
            eventually(refused, 30, "the socket to stop listening")
            conn.request("POST", "/", body)                 # the next request, idle no more
            r = conn.getresponse()
            assert r.status == 200 and r.read()
            conn.close()
            assert s.proc.wait(30) == 0
        finally:
            s.stop()


# 9. Header, keep-alive and connection limits ------------------------------------------

def test_slow_headers_and_idle_keepalive_connections_are_closed():
    with Server("--model", "echo", "--header-timeout-s", "1", "--keepalive-timeout-s", "1",
                "--fronts", "1") as s:
        slow = [raw(s.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le") for _ in range(20)]
        silent = raw(s.port, b"")
        answers = [read_all(sock) for sock in slow + [silent]]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:2]
        body = bytes(P.encode_request(P.InferRequest([np.ones((1, 4), np.float32)])))
        idle = raw(s.port, post_head(len(body)) + body)
        reply = read_all(idle)                  # answered, then closed after the idle time
        assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1
        # a connection in use is never closed by either clock, however long it is used
        busy = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        busy.connect()
        sock, answers, started = busy.sock, [], time.monotonic()
        while time.monotonic() - started < 3:              # 3x both timeouts
            busy.request("POST", "/", body, {"Content-Type": "application/octet-stream"})
            answers.append(busy.getresponse().read())
            assert busy.sock is sock, f"reconnected after {len(answers)} requests"
        assert set(answers) == {reply.split(b"\r\n\r\n", 1)[1]}
        busy.close()
        assert s.metric("gpserve_connections_refused_total", reason="header_timeout") == 21
    assert "within --header-timeout-s 1" in s.output()


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def flood(port: int, first: bytes, line: bytes, limit: int = 100 << 20) -> tuple[int, bytes]:
    """Send ``first`` then ``line`` over and over, up to ``limit`` bytes, until the server
    closes the connection: (bytes sent, what the server answered)."""
    sock = raw(port, first)
    sent, chunk = len(first), line * max(1, (256 << 10) // len(line))
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent, read_all(sock)


def test_request_heads_are_bounded_and_answered_431():
    """uvicorn and httptools bound nothing: 100 MiB of header lines on one connection took
    a front from 51 MiB to 1.5 GiB, and three such made another client wait 8 s."""
    body = bytes(P.encode_request(P.InferRequest([np.ones((1, 4), np.float32)])))

    def post(extra: bytes, target: bytes = b"/") -> bytes:
        head = post_head(len(body)).replace(b"POST / ", b"POST " + target + b" ", 1)
        return read_all(raw(s.port, head[:-2] + extra + b"\r\n" + body))

    with Server("--model", "echo", "--fronts", "1") as s:
        front = s.info()["processes"]["this_front"]
        before = rss_mib(front)
        many = b"".join(b"X-%d: v\r\n" % i for i in range(97))         # 100 lines in all
        assert post(many).startswith(b"HTTP/1.1 200")
        assert post(many + b"X-more: v\r\n").startswith(b"HTTP/1.1 431")
        assert post(b"X-long: " + b"v" * (8 << 10) + b"\r\n").startswith(b"HTTP/1.1 431")
        wide = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))   # 40 KB
        reply = post(wide)
        assert reply.startswith(b"HTTP/1.1 431") and b"--max-header-kb" in reply
        assert post(b"", b"/" + b"a" * (9 << 10)).startswith(b"HTTP/1.1 414")
        # streams: endless header lines, and one header line that never ends
        head = b"POST / HTTP/1.1\r\nHost: x\r\n"
        for line in (b"X-h: v\r\n", b"v" * 4096):
            sent, reply = flood(s.port, head + (b"X-h: " if line[:1] == b"v" else b""), line)
            assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
            assert sent < 100 << 20                  # cut off long before the end
        assert rss_mib(front) - before < 64, (before, rss_mib(front))
        with Client(s.url) as c:                    # and it goes on serving
            assert c.execute(np.ones((1, 4), np.float32)).shape == (1, 4)
        assert s.metric("gpserve_connections_refused_total", reason="header_too_large") == 5
        assert s.metric("gpserve_connections_refused_total",
                        reason="request_line_too_long") == 1
        assert s.info()["stats"]["front_restarts"] == 0
    assert "refused requests (HTTP 431): " in s.output()


def test_a_websocket_upgrade_is_not_served_and_the_timeouts_go_on():
    """With the websockets package installed (uvicorn[standard]), an Upgrade: websocket
    request made uvicorn's WebSocket protocol join the connections the sweep reads, which
    lack the sweep's clocks: the sweep then failed and that front's header and keep-alive
    timeouts stopped for good. gpserve serves no WebSocket."""
    with Server("--model", "echo", "--header-timeout-s", "1", "--fronts", "1") as s:
        upgrade = raw(s.port, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        upgrade.settimeout(5)
        reply = upgrade.recv(1 << 16)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]   # the upgrade ignored (RFC 9110)
        assert b"application/json" in reply
        slow = raw(s.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert read_all(slow).startswith(b"HTTP/1.1 408")        # the sweep still runs
        upgrade.close()
    assert "Traceback" not in s.output()


def test_upgrades_transfer_codings_and_half_closed_clients():
    """A POST with Upgrade: h2c lost its body (400 "the body has 0 bytes");
    Transfer-Encoding: gzip, chunked was read as plain chunked; a client that sent its
    request and half-closed got no answer."""
    small = np.ones((2, 4), np.float32)
    large = np.arange(64 * 1024, dtype=np.float32).reshape(2, -1)    # 256 KB: uvicorn's path
    with Server("--model", "echo", "--fronts", "1") as s:
        for x in (small, large):
            body = bytes(P.encode_request(P.InferRequest([x])))
            head = post_head(len(body))[:-2]
            h2c = raw(s.port, head + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                     b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + body)
            reply = read_all(h2c)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
            assert b"connection: close" in reply.lower()
            np.testing.assert_array_equal(
                P.decode_response(reply.split(b"\r\n\r\n", 1)[1]).outputs[0], x)
            half = raw(s.port, post_head(len(body)) + body)
            half.shutdown(socket.SHUT_WR)
            reply = read_all(half)
            assert reply.startswith(b"HTTP/1.1 200"), (len(body), reply[:300])
            np.testing.assert_array_equal(
                P.decode_response(reply.split(b"\r\n\r\n", 1)[1]).outputs[0], x)
        chunked = raw(s.port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
                              b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        reply = read_all(chunked)
        assert reply.startswith(b"HTTP/1.1 501") and b"'gzip, chunked'" in reply
        get = raw(s.port, b"GET /control/is_ready HTTP/1.1\r\nHost: x\r\n\r\n")
        get.shutdown(socket.SHUT_WR)
        assert read_all(get).startswith(b"HTTP/1.1 200")
        assert s.metric("gpserve_connections_refused_total", reason="transfer_coding") == 1
    assert "Traceback" not in s.output()


def test_compressed_bodies_are_inflated_within_the_body_limit():
    """Content-Encoding was ignored: a gzip body was parsed as raw (a misleading 400)."""
    import gzip
    import zlib

    import tritonclient.http as hc
    import urllib3
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = bytes(P.encode_request(P.InferRequest([x])))
    with Server("--model", "echo", "--fronts", "1", "--max-body-mb", "1") as s:
        post = lambda data, coding: urllib3.request(
            "POST", s.url + "/", body=data, headers={"Content-Encoding": coding}, retries=False)
        raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        for coding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                             ("deflate", raw_deflate.compress(body) + raw_deflate.flush()),
                             ("identity", body)):
            r = post(data, coding)
            assert r.status == 200, (coding, r.data)
            np.testing.assert_array_equal(P.decode_response(r.data).outputs[0], x)
        r = post(body, "br")
        assert r.status == 415 and P.decode_response(r.data).errors[0].code == 18
        bomb = gzip.compress(bytes(64 << 20))                   # 64 MiB of zeros in 64 KB
        r = post(bomb, "gzip")
        assert r.status == 413 and b"inflates past --max-body-mb" in r.data
        r = post(gzip.compress(body)[:-12], "gzip")
        assert r.status == 400 and b"ends before its stream does" in r.data
        client = hc.InferenceServerClient(s.url.removeprefix("http://"))
        for algorithm in ("gzip", "deflate"):                    # tritonclient's compression
            inp = hc.InferInput("INPUT0", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            got = client.infer("echo", [inp], request_compression_algorithm=algorithm)
            np.testing.assert_array_equal(got.as_numpy("output"), x)


def test_connection_limit_answers_503_and_says_so():
    with Server("--model", "echo", "--max-connections", "4", "--fronts", "1") as s:
        held = [raw(s.port, b"") for _ in range(4)]
        try:
            body = bytes(P.encode_request(P.InferRequest([np.ones((1, 4), np.float32)])))
            extra = raw(s.port, post_head(len(body)) + body)
            assert read_all(extra).startswith(b"HTTP/1.1 503")
        finally:
            for sock in held:
                sock.close()
        assert s.metric("gpserve_connections_refused_total", reason="connection_limit") == 1
        with Client(s.url) as c:                        # served again once they are gone
            eventually(lambda: c.execute(np.ones((1, 1), np.float32)).shape == (1, 1), 30,
                       "service again")
    assert "--max-connections 4 reached" in s.output()


# Also: every failure is visible --------------------------------------------------------

def test_a_stopped_worker_is_found_killed_and_restarted_and_nothing_waits_its_deadline():
    """SIGSTOP one of two workers: its requests waited for the 15 s deadline, new requests
    were still routed to it, readiness stayed 200 and nothing was logged. Now fronts route
    around a worker whose heartbeat stopped, and the supervisor kills it once it has made
    no progress for --hang-timeout-s: its requests are answered Unavailable, it restarts."""
    with Server("--model", "standin:200,0", "--placement", "workers", "--workers", "2",
                "--fronts", "1", "--hang-timeout-s", "2", "--timeout-ms", "60000",
                "--batch-check-every", "0") as s:
        victim = s.info()["processes"]["pids"]["workers"][0]
        outcomes, stop = [], threading.Event()

        def client():
            with Client(s.url, timeout=90) as c:
                while not stop.is_set():
                    try:
                        c.execute(np.ones((1, 16), np.float32))
                        outcomes.append("ok")
                    except E.GraphPipeError as e:
                        outcomes.append(type(e).__name__)
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            eventually(lambda: len(outcomes) >= 8, 30, "requests on both workers")
            os.kill(victim, signal.SIGSTOP)
            eventually(lambda: s.stats()["worker_hangs"] == 1, 30, "the hang found")
            eventually(lambda: s.stats()["ready_workers"] == 2
                       and victim not in s.info()["processes"]["pids"]["workers"], 60,
                       "the worker restarted")
            served = len(outcomes)
            eventually(lambda: outcomes[served:].count("ok") >= 8, 30, "serving on")
        finally:
            stop.set()
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
            for t in threads:
                t.join(90)
        assert set(outcomes) <= {"ok", "Unavailable"}, collections.Counter(outcomes)
        assert s.stats()["worker_restarts"] == 1
        assert s.metric("gpserve_worker_hangs_total") == 1
    assert "worker0 (pid %d) is hung" % victim in s.output()


def test_a_front_whose_event_loop_stops_is_killed_and_restarted():
    """SIGSTOP one of two fronts: its heartbeat stops; past --hang-timeout-s the
    supervisor kills and restarts it, while the other front serves every new request."""
    with Server("--model", "echo", "--fronts", "2", "--hang-timeout-s", "2") as s:
        victim = s.info()["processes"]["pids"]["fronts"][0]
        os.kill(victim, signal.SIGSTOP)
        try:
            eventually(lambda: s.stats()["front_hangs"] == 1, 30, "the hang found")
            eventually(lambda: s.stats()["front_restarts"] == 1
                       and victim not in s.info()["processes"]["pids"]["fronts"]
                       and min(s.info()["processes"]["connections"]) >= 0, 60,
                       "the front restarted and accepting")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        with Client(s.url) as c:
            for _ in range(8):
                assert c.execute(np.ones((1, 3), np.float32)).tolist() == [[1, 1, 1]]
        assert s.metric("gpserve_front_hangs_total") == 1
        assert s.stats()["worker_hangs"] == 0
    assert "front0 (pid %d) is hung: its event loop has not turned" % victim in s.output()


def test_requests_held_by_a_killed_worker_are_answered_at_once(tmp_path):
    """Whatever a worker held when it died, running or queued, is answered Unavailable
    as soon as the front sees the worker's link drop: nobody waits for the deadline
    (60 s here; the client gives up after 30 s, so waiting would fail the test)."""
    model = slow_model(tmp_path / "slow.onnx")
    with Server("--model", str(model), "--timeout-ms", "60000", "--batch-check-every", "0",
                "--fronts", "1", "--placement", "workers") as s:
        results = {}

        def call(name, rows):
            try:
                with Client(s.url, timeout=30) as c:
                    results[name] = c.execute(np.ones((rows, 4), np.float32))
            except E.GraphPipeError as e:
                results[name] = e
        first = threading.Thread(target=call, args=("first", 1))
        first.start()
        eventually(lambda: s.stats()["queued_rows"] == 1, 30,     # the shared counters:
                   "the first request to be running")               # written at once
        second = threading.Thread(target=call, args=("second", 2))
        second.start()
        eventually(lambda: s.stats()["queued_rows"] == 3, 30,
                   "the second to wait in the queue behind the first")
        os.kill(s.info()["processes"]["pids"]["workers"][0], signal.SIGKILL)
        first.join(60)
        second.join(60)
        assert all(isinstance(r, E.Unavailable) for r in results.values()), results
        assert "exited while holding this request" in str(results["second"])
        stats = s.stats()
        assert stats["errors"] == {"Unavailable": 2} and stats["expired"] == 0
        eventually(lambda: s.metric("gpserve_requests_total", status="503",
                                    kind="error") == 2, 10, "two 503s counted")
