"""Processes die (on the default model, so a fresh clone runs these too); requests still
get an answer or a clear error in time; the server heals;
a clean stop leaves nothing behind."""
import os
import signal
import threading
import time

import numpy as np
import pytest

from gpserve.client import Client, ConnectionFailed
from gpserve.errors import GraphPipeError
from gpserve.testing import Server, eventually

TIMEOUT_S = 10
ROWS = np.random.default_rng(0).uniform(-1, 1, (4, 2)).astype(np.float32)


def load(url, stop: threading.Event, results: list):
    """One client in a loop: each result is (kind, detail, seconds)."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            with Client(url, timeout=TIMEOUT_S + 5) as c:
                out = c.execute(ROWS)
            results.append(("ok", out.shape, time.monotonic() - started))
        except ConnectionFailed as e:     # a connection of the dying front
            results.append(("conn", str(e), time.monotonic() - started))
        except GraphPipeError as e:
            results.append(("error", f"{type(e).__name__}: {e}", time.monotonic() - started))


def run_load_and_kill(server, role: str, restarts_slot: str):
    """Kill one process once requests flow; keep the load on until it is back and
    requests flow again. Synchronised on what the server reports, never on sleeps."""
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=load, args=(server.url, stop, results)) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: sum(r[0] == "ok" for r in results) >= 50, 60, "requests flow")
        pids = server.info()["processes"]["pids"]
        victim = pids["workers"][0] if role == "worker" else pids["fronts"][0]
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: server.stats()[restarts_slot] >= 1, 60, f"the {role} restarts")
        server.wait_ready(30)
        flowing = len(results)
        eventually(lambda: sum(r[0] == "ok" for r in results[flowing:]) >= 50, 60,
                   "requests flow again")
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return victim, results


@pytest.fixture
def server():
    with Server("--timeout-ms", str(TIMEOUT_S * 1000), "--fronts", "2",
                "--placement", "workers") as s:
        yield s


def test_kill_worker_under_load(server):
    victim, results = run_load_and_kill(server, "worker", "worker_restarts")
    assert all(r[2] < TIMEOUT_S + 1 for r in results), "a request outlived its deadline"
    failures = [r for r in results if r[0] != "ok"]
    # held by the dead worker, or sent while no worker ran: Unavailable at once, and
    # none waits for its deadline
    assert all("Unavailable" in r[1] and ("exited while holding" in r[1] or
                                          "no worker is running" in r[1])
               for r in failures), failures
    info = server.info()
    assert info["stats"]["worker_restarts"] == 1
    assert info["processes"]["pids"]["workers"][0] != victim
    with Client(server.url) as c:
        assert c.execute(ROWS).shape == (4, 3)


def test_kill_front_under_load(server):
    victim, results = run_load_and_kill(server, "front", "front_restarts")
    assert all(r[2] < TIMEOUT_S + 1 for r in results), "a request outlived its deadline"
    assert all(r[0] in ("ok", "conn") for r in results), [r for r in results if r[0] != "ok"]
    assert server.info()["stats"]["front_restarts"] == 1
    for _ in range(10):   # both fronts answer again (connections land on either)
        with Client(server.url) as c:
            assert c.execute(ROWS).shape == (4, 3)


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]    # a zombie counts as gone


def test_clean_stop_leaves_nothing_behind():
    s = Server("--model", "echo", "--fronts", "2", "--workers", "2", "--placement", "workers")
    with Client(s.url) as c:
        c.execute(np.ones((4, 4), np.float32))
    children = {pid: _start_time(pid) for pid in s.children()}
    assert len(children) >= 4              # 2 workers, 2 fronts
    assert s.segments()                    # counters and arenas exist while serving
    run = s.proc.pid
    assert s.stop() == 0
    assert [p for p in os.listdir("/dev/shm") if p.startswith(f"gpserve-{run}-")] == []
    # multiprocessing's resource tracker leaves when it sees the supervisor gone, a moment
    # later; every child must be gone within seconds (a reused pid has another start time).
    deadline = time.monotonic() + 10
    left = children
    while left and time.monotonic() < deadline:
        left = {pid: t for pid, t in left.items() if t is not None and _start_time(pid) == t}
        time.sleep(0.05)
    assert not left, f"children still running after the stop: {sorted(left)}"


def test_next_start_cleans_up_after_a_killed_server():
    s = Server("--model", "echo", "--fronts", "1")
    run = s.proc.pid
    children = s.children()
    os.kill(run, signal.SIGKILL)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    s.proc.wait()
    s.log.close()
    assert [p for p in os.listdir("/dev/shm") if p.startswith(f"gpserve-{run}-")]
    with Server("--model", "echo", "--fronts", "1"):
        assert [p for p in os.listdir("/dev/shm") if p.startswith(f"gpserve-{run}-")] == []
