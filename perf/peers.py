"""Scenario 4 of the serving core: gpserve next to established servers, in one run.

``../shared/peers/`` installs Triton (through PyTriton), MLServer and LitServe into venvs
of their own and loads each with wrk (``run_matrix.sh``): an identity model (float32
[N,16]) at 1 and 16 clients, and an MLP (float32 [N,256] -> 3 x 1024 -> [N,10]) at 32
clients, single-row requests, with their dynamic batching on (max 32 rows, 2 ms) and
off. This script runs that matrix, then serves the same two ONNX files with gpserve
under the same wrk load (same row shapes, GraphPipe bodies), and prints rows/s side by
side with gpserve's ratios to Triton. Target: >= 3x Triton's rows/s on the MLP and its
requests/s on the identity model.

    python perf/peers.py [--quick] [--json FILE] [--peers pytriton,mlserver,litserve]
                         [--no-install]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import bar_chart, exit_cleanly_on_sigterm, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1].parent / "shared" / "peers"
PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path(tempfile.gettempdir()) / "gpserve-peers"))
# (label, model, clients), as run_matrix.sh names its wrk runs
LOADS = [("identity", 1), ("identity", 16), ("mlp", 32)]


def prepare(peers: list[str], install: bool) -> list[str]:
    env = {**os.environ, "PEERS_DIR": str(PEERS_DIR)}
    for name in ["common"] + peers:
        venv = PEERS_DIR / ("tools" if name == "common" else name) / "venv" / "bin" / "python"
        if not venv.exists():
            if not install:
                continue
            print(f"  installing {name} (../shared/peers/setup_{name}.sh)", flush=True)
            subprocess.run(["bash", str(SCRIPTS / f"setup_{name}.sh")], env=env, check=False)
    tools = PEERS_DIR / "tools" / "venv" / "bin" / "python"
    subprocess.run([str(tools), str(SCRIPTS / "build_models.py"), str(PEERS_DIR / "models")],
                   env=env, check=True, capture_output=True)
    subprocess.run([str(tools), str(SCRIPTS / "make_bodies.py"), str(PEERS_DIR / "bodies")],
                   env=env, check=True, capture_output=True)
    return [p for p in peers if (PEERS_DIR / p / "venv" / "bin" / "python").exists()]


def run_peer(peer: str, quick: bool, results: Path) -> list[dict]:
    env = {**os.environ, "PEERS_DIR": str(PEERS_DIR), "RESULTS": str(results),
           "DUR": "5" if quick else "10", "REPS": "1" if quick else "3",
           "WARM": "2" if quick else "3"}
    subprocess.run(["bash", str(SCRIPTS / "run_matrix.sh"), peer], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    path = results / f"{peer}.jsonl"
    lines = [json.loads(t) for t in path.read_text().splitlines() if t.strip()] \
        if path.exists() else []
    rows = []
    for model, clients in LOADS:
        for batching in ("on", "off"):
            label = f"{model}_b{batching}_c{clients}"
            runs = [r for r in lines if r.get("label") == label and r.get("tool") == "wrk"]
            if runs:
                rows.append(_row(peer, model, batching, clients,
                                 float(np.median([r["rps"] for r in runs])),
                                 float(np.median([r["p50_ms"] for r in runs]))))
    return rows


def _row(server, model, batching, clients, rps, p50):
    return {"server": server, "model": model, "batching": batching, "clients": clients,
            "rows_s": rps, "p50_ms": p50}


def run_gpserve(quick: bool) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    bodies = {"identity": rng.standard_normal((1, 16)).astype(np.float32),
              "mlp": rng.standard_normal((1, 256)).astype(np.float32)}
    for model in ("identity", "mlp"):
        body = bytes(P.encode_request(P.InferRequest([bodies[model]])))
        for batching in ("on", "off"):
            flags = ["--model", str(PEERS_DIR / "models" / f"{model}.onnx")] + (
                ["--batching", "off"] if batching == "off" else [])
            with Server(*flags) as s:
                for m, clients in LOADS:
                    if m != model:
                        continue
                    rep = loadgen.run(s.url + "/", body, clients, 5 if quick else 10,
                                      engine="wrk", repeats=1 if quick else 3)
                    rows.append(_row("gpserve", model, batching, clients, rep["rps"],
                                     rep["p50_ms"]))
                    print(f"  gpserve {model} batching {batching} c={clients}: "
                          f"{rep['rps']:.0f} rows/s", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--png", metavar="FILE", default="perf/results/peers.png")
    ap.add_argument("--peers", default="pytriton,mlserver,litserve")
    ap.add_argument("--no-install", action="store_true", help="use only peers already set up")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    if not SCRIPTS.exists() or not loadgen.wrk_available():
        print("skipped: needs ../shared/peers and wrk (apt-get install wrk)")
        return 0
    peers = prepare(args.peers.split(","), not args.no_install)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for peer in peers:
            print(f"  running {peer}", flush=True)
            got = run_peer(peer, args.quick, Path(tmp))
            for r in got:
                print(f"  {peer} {r['model']} batching {r['batching']} c={r['clients']}: "
                      f"{r['rows_s']:.0f} rows/s", flush=True)
            rows += got
    rows += run_gpserve(args.quick)
    by = {(r["server"], r["model"], r["batching"], r["clients"]): r for r in rows}
    for r in rows:
        triton = by.get(("pytriton", r["model"], r["batching"], r["clients"]))
        r["x_triton"] = r["rows_s"] / triton["rows_s"] if triton and triton["rows_s"] else None
    print("\nSingle-row requests under wrk; rows/s = requests/s")
    print_table(rows, [("server", ""), ("model", ""), ("batching", ""), ("clients", "d"),
                       ("rows_s", ".0f"), ("p50_ms", ".2f"), ("x_triton", ".2f")])
    targets = []
    for model, clients in (("mlp", 32), ("identity", 16)):
        g, t = by.get(("gpserve", model, "on", clients)), by.get(("pytriton", model, "on",
                                                                    clients))
        if g and t:
            ratio = g["rows_s"] / t["rows_s"]
            targets.append({"target": f"{model} c={clients} batching on: gpserve / Triton",
                            "ratio": ratio, "goal": ">= 3", "met": "yes" if ratio >= 3 else "NO"})
    if targets:
        print()
        print_table(targets, [("target", ""), ("ratio", ".2f"), ("goal", ""), ("met", "")])
    write_json(args.json, rows, targets=targets)
    if args.png and rows:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        labels = [f"{m} c={c} b={b}" for m, c in LOADS for b in ("on", "off")]
        servers = list(dict.fromkeys(r["server"] for r in rows))
        series = {s: [by.get((s, t.split()[0], t.split("b=")[1],
                              int(t.split("c=")[1].split()[0])), {}).get("rows_s", 0)
                      for t in labels] for s in servers}
        bar_chart(args.png, "Single-row requests: rows/s, gpserve and established servers",
                  labels, series, "rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
