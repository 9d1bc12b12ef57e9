"""Two revisions of gpserve side by side in one run: did a change make it faster?

Serves the same model from a git revision (``BASE``, checked out in a temporary worktree)
and from this working tree, on the same machine at once, and loads them in turn with the
same wrk load (GraphPipe, one float32 row of ``--row-shape`` a request), alternating
``--repeats`` times so that both see the same drift. Prints each one's requests/s and
CPU time per request (all its processes, from ``/proc``), the medians, and the working
tree's ratio to BASE: what a closing note quotes when it claims a speed-up of the
serving path.

    python perf/revisions.py BASE [--model echo] [--placement auto] [--clients 16]
                             [--row-shape 16] [--seconds 4] [--repeats 3] [--quick]
                             [--json FILE]

``BASE``: any revision git knows (``HEAD~1``, a commit, a tag). ``--model``: what
``gpserve serve --model`` takes (``echo``, an ONNX file such as the peers' identity or
MLP model, ``standin:A,B``). ``--row-shape``: a row's dimensions after the batch one
(``256`` for the MLP, ``3,48,192`` for the OCR direction classifier). The worktree is
removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import Process, exit_cleanly_on_sigterm, free_port, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def checkout(revision: str, where: Path) -> Path:
    """``revision`` in a worktree at ``where``, importable as ``gpserve`` from there: its
    ``workers/`` and ``cache/`` linked where the installed package has them
    (pyproject.toml's package-dir), so its servers run its code, not this tree's."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                    str(where), revision], check=True)
    for sub in ("workers", "cache"):
        (where / "gpserve" / sub).symlink_to(where / sub)
    return where


def serve(tree: Path | None, args: list[str]) -> tuple[Process, str]:
    """gpserve from ``tree`` (None: this working tree, as installed) on a free port."""
    port = free_port()
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)       # ahead of the installed (editable) gpserve
    url = f"http://127.0.0.1:{port}"
    return Process([sys.executable, "-m", "gpserve", "serve", "--listen",
                    f"127.0.0.1:{port}", *args], url + "/control/is_ready",
                   cwd=str(tree or ROOT), env=env), url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="the revision to compare this working tree with")
    ap.add_argument("--model", default="echo")
    ap.add_argument("--placement", default="auto")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--row-shape", default="16", help="a row's dimensions: 16, 3,48,192")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 runs of 2 s each")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.repeats = 2, 2
    exit_cleanly_on_sigterm()
    row = tuple(int(d) for d in a.row_shape.split(","))
    x = np.random.default_rng(0).random((1, *row), dtype=np.float32)
    body = bytes(P.encode_request(P.InferRequest([x])))
    args = ["--model", a.model, "--placement", a.placement]
    label = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base],
                           capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree = checkout(a.base, Path(tmp) / "base")
        servers: dict[str, tuple[Process, str]] = {}
        try:
            servers[label] = serve(tree, args)
            servers["this tree"] = serve(None, args)
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
            for _, url in servers.values():          # warm: not counted
                loadgen.run_wrk(url + "/", body, a.clients, 1)
            for r in range(a.repeats):
                order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                for name in order:
                    proc, url = servers[name]
                    result = loadgen.run_wrk(url + "/", body, a.clients, a.seconds,
                                             server_pid=proc.proc.pid)
                    if result["errors"]:
                        raise SystemExit(f"{name}: {result['errors']} errors under load")
                    runs[name].append((result["rps"], result["cpu_us"]))
        finally:
            for proc, _ in servers.values():
                proc.stop()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tree)], check=False)
    rows = [{"revision": name, "rps": statistics.median(r for r, _ in rs),
             "cpu_us": statistics.median(c for _, c in rs),
             "runs_rps": " ".join(f"{r:,.0f}" for r, _ in rs)} for name, rs in runs.items()]
    print(f"\n{a.model} ({a.placement}), float32 {list(x.shape)}, {a.clients} clients, "
          f"median of {a.repeats} x {a.seconds:g} s, alternated (wrk -t1)")
    print_table(rows, [("revision", ""), ("rps", ",.0f"), ("cpu_us", ".1f"), ("runs_rps", "")])
    base, this = rows
    print(f"\nthis tree over {label}: requests/s {this['rps'] / base['rps']:.2f}x, "
          f"CPU a request {this['cpu_us'] / base['cpu_us']:.2f}x")
    write_json(a.json, rows, base=a.base, model=a.model, placement=a.placement,
               clients=a.clients, row_shape=list(row))


if __name__ == "__main__":
    main()
