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


class Server:
    """``gpserve serve`` with the given flags; ``url``, ``info()``, ``stop()``."""

    def __init__(self, *args: str, env: dict | None = None, ready_timeout: float = 90,
                 command: list[str] | None = None, port: int | None = None):
        """``gpserve serve --listen 127.0.0.1:PORT *args``, or ``gpserve *command`` when
        given (its environment then says where to listen, on ``port``)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpserve-test-{self.port}.log"
        self.log = open(self.log_path, "wb")
        argv = command or ["serve", "--listen", f"127.0.0.1:{self.port}", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpserve", *argv], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/control/is_ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.output()}")

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/", timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self.info()["stats"]

    def output(self) -> str:
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
