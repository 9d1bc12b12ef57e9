"""Helpers every benchmark shares: timing medians, table printing, JSON and PNG output."""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``runs`` calls."""
    walls, cpus = [], []
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        del result
    return statistics.median(walls), statistics.median(cpus)


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print rows as an aligned table; columns are (key, format spec)."""
    cells = [[format(r[k], f) if isinstance(r.get(k), (int, float)) else str(r.get(k, ""))
              for k, f in columns] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, (k, _) in enumerate(columns)]
    print("  ".join(k.rjust(w) for (k, _), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def write_json(path: str | None, rows: list[dict], **meta) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)


def bar_chart(path: str, title: str, labels: list[str], series: dict[str, list[float]],
              ylabel: str, log: bool = False) -> None:
    """A grouped bar chart (matplotlib, headless); skipped, saying so, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"\n[skip] chart {path}: matplotlib is not installed "
              "(pip install -e '.[bench]' installs every benchmark extra)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(labels) + 2), 4))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width, values, width, label=name)
    ax.set_xticks(x + width * (len(series) - 1) / 2, labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)   # outside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nchart: {path}")
    return True


class Process:
    """A server subprocess started for a benchmark, waited for, and stopped by its pid.

    ``group``: the server starts processes of its own that outlive it when it is
    stopped (PyTriton's tritonserver does): it runs in a session of its own, and
    stopping signals that whole group, which is only what it started."""

    def __init__(self, argv: list[str], ready_url: str, ready_body: bytes | None = None,
                 timeout: float = 90, group: bool = False, cwd: str | None = None,
                 env: dict | None = None):
        import subprocess
        import urllib.request
        self.group = group
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=group, cwd=cwd, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited with {self.proc.returncode}")
            try:
                req = urllib.request.Request(ready_url, data=ready_body)
                with urllib.request.urlopen(req, timeout=30) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[:4]} not ready in {timeout}s")
            time.sleep(0.2)

    def stop(self) -> None:
        import os
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if self.group:          # what it started and left behind: asked, then made to
            for sig, patience in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
                deadline = time.monotonic() + patience
                try:
                    os.killpg(self.proc.pid, sig)
                    while time.monotonic() < deadline:
                        time.sleep(0.1)
                        os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return                  # the whole group is gone


def uvicorn_argv(app: str, port: int, workers: int) -> list[str]:
    import sys
    from pathlib import Path
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).parent), app,
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
            "--no-access-log",
            "--timeout-worker-healthcheck", "600"]  # JSON requests block for long


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    from pathlib import Path
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user and system) the processes ``pids`` have used so far."""
    import os
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue                          # gone meanwhile
        total += int(fields[11]) + int(fields[12])      # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that servers started by a benchmark are stopped
    (their context managers and finally blocks run) when the benchmark is."""
    import signal
    import sys
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
