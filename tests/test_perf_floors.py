"""perf/floors.py's servers (the floors ``perf/small.py --floors`` measures gpserve
against) answer what they are given, by either of gpserve's paths: they are run here so
that a change to the front protocol they are built on cannot leave them broken unseen."""
import http.client
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpserve.testing import eventually, free_port

FLOORS = Path(__file__).resolve().parents[1] / "perf" / "floors.py"


@pytest.fixture(params=["python", "gpserve-http", "hop"])
def floor(request, tmp_path):
    answer = tmp_path / "answer.bin"
    answer.write_bytes(bytes(range(256)) * 3)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FLOORS), request.param, "--port", str(port),
                             "--answer-file", str(answer), "--processes", "2"],
                            start_new_session=True)

    def answers() -> bool:
        try:
            post(port, b"x")
            return True
        except OSError:
            return proc.poll() is not None       # exited: the test says so below
    try:                          # stopped however the test ends, a failed start included
        eventually(answers, what=f"perf/floors.py {request.param} to answer")
        assert proc.poll() is None, f"perf/floors.py {request.param} exited"
        yield port, answer.read_bytes()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)        # its processes, none other
        proc.wait()


def post(port: int, body: bytes, close: bool = False, times: int = 1) -> list[bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        got = []
        for _ in range(times):
            conn.request("POST", "/", body, {"Connection": "close"} if close else {})
            response = conn.getresponse()
            assert response.status == 200
            got.append(response.read())
        return got
    finally:
        conn.close()


def test_a_floor_answers_every_request_on_a_connection_with_the_answer_file(floor):
    port, answer = floor
    assert post(port, b"\x00" * 100, times=5) == [answer] * 5     # keep-alive: fast path


def test_a_floor_answers_a_request_that_closes_its_connection(floor):
    port, answer = floor
    assert post(port, b"\x01" * 300_000, close=True) == [answer]  # gpserve-http: via ASGI
