"""Run a real gpserve as a subprocess on loopback (for tests and benchmarks): start it, wait
until it is ready, read its stats, stop it cleanly."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SHM = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` in Prometheus text whose labels include
    ``labels`` (every model's, unless ``model=`` is given; 0 when none)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric_name, _, rest = key.partition("{")
        if metric_name == name and want <= set(rest.rstrip("}").split(",")) - {""}:
            total += float(value)
    return total


def eventually(condition, timeout: float = 30, what: str = "the condition") -> None:
    """Wait until ``condition()`` is true, polling; fail after ``timeout`` seconds.

    Tests synchronise on what the server reports (its counters, logs, answers), never on
    a fixed sleep: a slow or loaded machine then only takes longer, it does not fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Server:
    """``gpserve serve`` with the given flags; ``url``, ``info()``, ``stop()``."""

    def __init__(self, *args: str, env: dict | None = None, ready_timeout: float = 90,
                 command: list[str] | None = None, port: int | None = None,
                 own_group: bool = False):
        """``gpserve serve --listen 127.0.0.1:PORT *args``, or ``gpserve *command`` when
        given (its environment then says where to listen, on ``port``). ``own_group``:
        the server leads a process group of its own, which a test may signal whole (as
        Ctrl-C in a terminal and systemd do)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpserve-test-{self.port}.log"
        self.log = open(self.log_path, "wb")
        argv = command or ["serve", "--listen", f"127.0.0.1:{self.port}", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpserve", *argv], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=own_group)
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/control/is_ready", timeout=2) as r:
                    if r.status == 200 and self._every_front_accepting():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.output()}")

    def _every_front_accepting(self) -> bool:
        """Ready is one front's word; a test's connections should find every front up
        (connections opened before then stay where they landed)."""
        return all(n >= 0 for n in self.info()["processes"].get("connections", []))

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/", timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self.info()["stats"]

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """One sample of ``GET /metrics`` (0 when absent)."""
        return metric(self.metrics_text(), name, **labels)

    def rows_computed(self) -> int:
        """Rows the model computed for answered requests. A front counts them before it
        answers, so once a client has its answer the count includes it: no race."""
        return int(self.metric("gpserve_rows_total", source="model"))

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def segments(self) -> list[str]:
        return sorted(p.name for p in SHM.glob(f"gpserve-{self.proc.pid}-*"))

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
