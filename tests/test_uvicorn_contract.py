"""The contract with uvicorn: every member of uvicorn's that gpserve's HTTP layer reads,
calls or overrides (gpserve/connections.py, fastpath.py, listener.py, body.py), named
here, so that a uvicorn that moves one fails this test with a message saying which, not
a front with an AttributeError under traffic. pyproject pins the range these pass on; the last test
runs the connection tests, and the drain and upgrade tests, on the lowest version of
that range too. Below it: uvicorn 0.30-0.44 lack ``_start_asgi_task`` (the first
pipelined request raised AttributeError); 0.45-0.52 have it, but their drain resets
connections under a group signal and an ignored h2c upgrade is not closed after its
answer (tests/test_hostile.py, measured on 0.45, 0.50, 0.51, 0.52, 0.52.4; 0.53 passes).
"""
import asyncio
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import uvicorn
from conftest import GRAPHPIPE_DIR, ROOT
from test_connections import Transport, _connection
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gpserve.fastpath import CONTINUE

# methods of HttpToolsProtocol we call (c) or override (o), and why
PROTOCOL_METHODS = {
    "connection_made": "c: the connection's clocks and count",
    "connection_lost": "c: the count; uvicorn marks the cycle disconnected",
    "on_message_begin": "c: resets the parser's url and headers",
    "on_url": "c: the request target, after the bound",
    "on_header": "c: a header, after the bounds",
    "on_headers_complete": "c: uvicorn's request cycle, for what the fast path does not take",
    "on_body": "c", "on_message_complete": "c",
    "send_400_response": "c: bytes that are not HTTP/1.1",
    "shutdown": "c: the drain, after the grace",
    "timeout_keep_alive_handler": "c: the sweep closes an idle connection",
    "_start_asgi_task": "c: a pipelined request, in our copy of on_response_complete",
    "eof_received": "o: a half-closed client is answered",
    "data_received": "o: the guards, then the parser",
    "on_response_complete": "o: a copy, with the keep-alive clock read by the sweep",
    "_unset_keepalive_if_required": "o: uvicorn calls it when data comes",
}
# attributes of a protocol once its connection is made
PROTOCOL_ATTRIBUTES = ("loop", "connections", "tasks", "timeout_keep_alive",
                       "limit_concurrency", "server_state", "parser", "cycle", "pipeline",
                       "flow", "transport", "client", "headers", "expect_100_continue")
CYCLE_ATTRIBUTES = ("response_complete", "disconnected", "keep_alive", "more_body",
                    "message_event", "scope", "transport", "body")
SERVER_MEMBERS = ("startup", "shutdown", "handle_exit", "capture_signals", "server_state",
                  "started", "config", "should_exit")


def test_the_range_pyproject_allows_is_the_one_tested():
    text = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"uvicorn\[standard\]>=([\d.]+),<([\d.]+)"', text).groups()
    version = tuple(int(p) for p in uvicorn.__version__.split(".")[:2])
    assert tuple(int(p) for p in low.split(".")) <= version < tuple(
        int(p) for p in high.split(".")), (uvicorn.__version__, low, high)


def test_every_protocol_method_we_use_exists():
    missing = [f"HttpToolsProtocol.{m} ({why})" for m, why in PROTOCOL_METHODS.items()
               if not callable(getattr(HttpToolsProtocol, m, None))]
    assert not missing, f"uvicorn {uvicorn.__version__} moved: {missing}"
    assert "_start_asgi_task" in inspect.getsource(HttpToolsProtocol.on_response_complete), \
        "uvicorn's on_response_complete changed: update our copy in connections.py"
    assert "pipeline.pop" in inspect.getsource(HttpToolsProtocol.on_response_complete)


def test_every_attribute_we_read_is_there_on_a_live_connection():
    async def scenario():
        seen: list = []
        protocol, transport = _connection(seen)
        missing = [a for a in PROTOCOL_ATTRIBUTES if not hasattr(protocol, a)]
        assert not missing, f"uvicorn {uvicorn.__version__}: protocol lacks {missing}"
        assert isinstance(protocol.server_state, ServerState)
        for name in ("connections", "tasks", "default_headers", "total_requests"):
            assert hasattr(protocol.server_state, name), f"ServerState.{name}"
        # a request too large for the fast path: uvicorn's own request cycle
        protocol.data_received(b"POST /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                               b"\r\nab")
        cycle = protocol.cycle
        assert protocol.url == b"/v2"         # on_message_begin, on_url; the fast path reads it
        assert type(cycle) is RequestResponseCycle
        missing = [a for a in CYCLE_ATTRIBUTES if not hasattr(cycle, a)]
        assert not missing, f"uvicorn {uvicorn.__version__}: the cycle lacks {missing}"
        assert isinstance(cycle.message_event, asyncio.Event)     # body.py's _already_here
        for _ in range(100):                                      # let the app answer
            if seen:
                break
            await asyncio.sleep(0)
        assert seen == [("asgi", b"ab")]
        assert isinstance(transport, Transport)
    asyncio.run(scenario())


def test_the_continue_bytes_and_the_server_members():
    assert CONTINUE.decode() in inspect.getsource(RequestResponseCycle).replace("\\r\\n",
                                                                                "\r\n"), \
        "uvicorn's 100 Continue bytes changed: OneWrite tells them from a response head"
    missing = [m for m in SERVER_MEMBERS if not hasattr(uvicorn.Server(uvicorn.Config(
        lambda *a: None)), m)]
    assert not missing, f"uvicorn.Server lacks {missing} (listener.FrontServer uses them)"
    server = inspect.getsource(uvicorn.Server)           # set while serving, not in __init__
    assert "self.lifespan" in server and "for server in self.servers" in server, \
        "uvicorn.Server's lifespan or servers moved: listener.FrontServer.startup sets them"
    assert hasattr(uvicorn.Config, "http_protocol_class") or "http_protocol_class" in \
        inspect.getsource(uvicorn.Config.load)
    assert "sock.close()" in inspect.getsource(uvicorn.Server.shutdown), \
        "uvicorn no longer closes the sockets it was handed: listener.close() assumes it"


LOWEST = "0.53.0"


@pytest.mark.skipif(os.environ.get("GPSERVE_UVICORN_UNDER_TEST") is not None,
                    reason="already running under the lowest uvicorn")
def test_the_lowest_uvicorn_allowed_passes_the_connection_tests():
    """The lowest version pyproject allows, installed beside the project (no deps), and
    this file, tests/test_connections.py and the drain and upgrade tests of
    tests/test_hostile.py run on it, real servers included."""
    target = GRAPHPIPE_DIR.parent / f"uvicorn-{LOWEST}"
    if not (target / ".installed").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--upgrade", "--target", str(target), f"uvicorn=={LOWEST}"],
                       check=True)
        (target / ".installed").write_text("ok\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "GPSERVE_UVICORN_UNDER_TEST": LOWEST}
    run = subprocess.run([sys.executable, "-c", "import uvicorn; print(uvicorn.__version__)"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == LOWEST, run.stderr
    tests = ROOT / "tests"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         str(tests / "test_connections.py"), str(tests / "test_hostile.py"), "-k",
         "not hostile or process_group or idle_keep_alive or upgrades or heads_are_bounded"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
