"""End-to-end benchmark, scenarios 1 and 2 of the serving core, side by side in one run.

1. The seed's figure: float32 [128,224,224,3] and [8,224,224,3] requests to the echo
   model at 1 and 5 concurrent clients, in rows/s and request-payload MB/s, next to a
   plain Python JSON server serving the same (comparators.json_app), and next to what
   loopback TCP itself moves for that round trip (../shared/peers/loopback_tcp.py,
   echo mode: payload in, payload out, between two processes).
2. Small requests: float32 [1,16] to the echo model at 1 and 16 clients, requests/s
   and p50/p99, next to a raw ASGI app on the same uvicorn (the Python HTTP floor) and
   the JSON server. The original Go echo server (graphpipe-go) cannot be built here;
   its figures measured on this kind of machine are printed as a fixed reference.

Bodies are made by the original graphpipe 1.0.4 client when it is at hand (they are
byte-compatible with gpserve's own). Load comes from wrk when installed, else aiohttp.

    python perf/endtoend.py [--quick] [--json FILE] [--png FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import (  # noqa: E402
    Process,
    bar_chart,
    exit_cleanly_on_sigterm,
    free_port,
    print_table,
    uvicorn_argv,
    write_json,
)

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GO_ECHO = {1: 11_900, 16: 23_500}          # graphpipe-echo, requests/s, [1,16] body
GO_ECHO_MBPS = {8: 54.0, 128: 38.0}        # graphpipe-echo, request MB/s at one client


def graphpipe_body(arr: np.ndarray) -> bytes:
    try:
        from codec import DEFAULT_GP, load_graphpipe
        convert = load_graphpipe(DEFAULT_GP)
        return bytes(convert.serialize_infer_request(convert.InferReq(None, [arr], [], [])))
    except Exception:   # no network for the isolated install: gpserve's bytes are equivalent
        return bytes(P.encode_request(P.InferRequest([arr])))


def loopback_echo_mbps(nbytes: int) -> float | None:
    script = SHARED / "peers" / "loopback_tcp.py"
    if not script.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        subprocess.run([sys.executable, str(script), "--sizes", str(nbytes), "--modes", "echo",
                        "--runs", "3", "--min-seconds", "2", "--json-out", out.name],
                       check=True, capture_output=True, timeout=300)
        rows = [json.loads(t) for t in Path(out.name).read_text().splitlines()]
    return float(np.median([r["mb_s"] for r in rows]))


def draw(by: dict, png: str) -> None:
    """The two charts, from rows keyed by (server, shape, clients)."""
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{s} c={c}" for s in ("8x224x224x3", "128x224x224x3") for c in (1, 5)]
    series = {srv: [by.get((srv, t.split()[0], int(t.split("=")[1])), {}).get(
        "rows_per_s", 0) for t in labels] for srv in ("gpserve", "json")}
    bar_chart(png, "Echo of large float32 tensors: rows/s (log)", labels, series, "rows/s",
              log=True)
    small_png = png.replace(".png", "-small.png")
    series = {srv: [by[(srv, "1x16", c)]["rps"] for c in (1, 16)]
              for srv in ("gpserve", "http-floor", "json")}
    series["go echo (reference)"] = [GO_ECHO[1], GO_ECHO[16]]
    bar_chart(small_png, "[1,16] echo: requests/s", ["c=1", "c=16"], series, "requests/s")



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs; JSON only for [8,...]")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--png", metavar="FILE", default="perf/results/endtoend.png")
    ap.add_argument("--engine", choices=["auto", "wrk", "async"], default="auto")
    ap.add_argument("--fronts", type=int, default=0, help="gpserve fronts (default: machine)")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    secs = 4 if args.quick else 10
    reps = 1 if args.quick else 3
    rng = np.random.default_rng(0)
    rows: list[dict] = []

    def record(scenario, server, shape, clients, rep, extra=None):
        n = shape[0]
        row = {"scenario": scenario, "server": server, "shape": "x".join(map(str, shape)),
               "clients": clients, "rps": rep["rps"], "rows_per_s": rep["rps"] * n,
               "MB_per_s": rep["req_MBps"], "p50_ms": rep["p50_ms"], "p99_ms": rep["p99_ms"],
               "errors": rep["errors"], "engine": rep["engine"], **(extra or {})}
        rows.append(row)
        print(f"  {scenario} {server:8s} {row['shape']:>14s} c={clients:<2d} "
              f"{row['rps']:9.1f} req/s {row['rows_per_s']:10.1f} rows/s "
              f"{row['MB_per_s']:8.1f} MB/s p50 {row['p50_ms']:8.2f} ms", flush=True)

    shapes = [(128, 224, 224, 3), (8, 224, 224, 3)]
    small = (1, 16)
    bodies = {s: graphpipe_body(rng.random(s, dtype=np.float32)) for s in shapes + [small]}
    fronts = ["--fronts", str(args.fronts)] if args.fronts else []

    with Server("--model", "echo", *fronts) as gp:
        url = gp.url + "/"
        for shape in shapes:
            for clients in (1, 5):
                record(1, "gpserve", shape, clients,
                       loadgen.run(url, bodies[shape], clients, secs, args.engine, repeats=reps))
        for clients in (1, 16):
            record(2, "gpserve", small, clients,
                   loadgen.run(url, bodies[small], clients, secs, args.engine, repeats=reps))
        cfg_fronts = gp.info()["processes"]["fronts"]

    port = free_port()
    floor = Process(uvicorn_argv("comparators:floor_app", port, cfg_fronts),
                    f"http://127.0.0.1:{port}/", b"x")
    try:
        for clients in (1, 16):
            record(2, "http-floor", small, clients, loadgen.run(
                f"http://127.0.0.1:{port}/", bodies[small], clients, secs, args.engine,
                repeats=reps))
    finally:
        floor.stop()

    port = free_port()
    json_url = f"http://127.0.0.1:{port}/"
    jserver = Process(uvicorn_argv("comparators:json_app", port, cfg_fronts), json_url,
                      b'{"instances": [[1.0]]}')
    try:
        for shape in ([shapes[1]] if args.quick else shapes):
            body = json.dumps({"instances": rng.random(shape, dtype=np.float32).tolist()}).encode()
            for clients in (1, 5):
                # One JSON request of [8,...] takes seconds and of [128,...] a minute:
                # run long enough for several to finish.
                rep = loadgen.run(json_url, body, clients, 120 if shape[0] == 128 else 20,
                                  args.engine, timeout_s=300, warmup_s=0)
                payload = int(np.prod(shape)) * 4          # MB/s of tensor bytes, as for gpserve
                rep["req_MBps"] = rep["rps"] * payload / 1e6
                record(1, "json", shape, clients, rep)
        body = json.dumps({"instances": rng.random(small, dtype=np.float32).tolist()}).encode()
        for clients in (1, 16):
            rep = loadgen.run(json_url, body, clients, secs, args.engine, repeats=reps)
            record(2, "json", small, clients, rep)
    finally:
        jserver.stop()

    loop_mbps = loopback_echo_mbps(int(np.prod(shapes[0])) * 4)

    by = {(r["server"], r["shape"], r["clients"]): r for r in rows}
    print("\nScenario 1: echo of large tensors (request payload MB/s; rows/s)")
    print_table([r for r in rows if r["scenario"] == 1],
                [("server", ""), ("shape", ""), ("clients", "d"), ("rps", ".2f"),
                 ("rows_per_s", ".1f"), ("MB_per_s", ".1f"), ("p50_ms", ".1f")])
    print("\nScenario 2: [1,16] echo")
    print_table([r for r in rows if r["scenario"] == 2],
                [("server", ""), ("clients", "d"), ("rps", ".0f"), ("p50_ms", ".3f"),
                 ("p99_ms", ".3f")])

    targets = []
    for shape in shapes:
        s = "x".join(map(str, shape))
        for clients in (1, 5):
            g, j = by.get(("gpserve", s, clients)), by.get(("json", s, clients))
            if g and j and j["rows_per_s"] > 0:
                ratio = g["rows_per_s"] / j["rows_per_s"]
                targets.append((f"rows/s vs JSON server, {s} c={clients}", ratio, ">= 10",
                                ratio >= 10))
    big = by[("gpserve", "x".join(map(str, shapes[0])), 1)]
    if loop_mbps:
        ratio = big["MB_per_s"] / loop_mbps
        targets.append((f"[128,...] c=1 MB/s / loopback echo {loop_mbps:.0f} MB/s", ratio,
                        ">= 0.5", ratio >= 0.5))
    for shape in shapes:
        g = by[("gpserve", "x".join(map(str, shape)), 1)]
        targets.append((f"[{shape[0]},...] c=1 MB/s / Go echo (reference, not this run)",
                        g["MB_per_s"] / GO_ECHO_MBPS[shape[0]], "-", True))
    for clients in (1, 16):
        g = by[("gpserve", "1x16", clients)]
        f = by[("http-floor", "1x16", clients)]
        targets.append((f"[1,16] c={clients} req/s / Python HTTP floor (this run)",
                        g["rps"] / f["rps"], "-", True))
        ratio = g["rps"] / GO_ECHO[clients]
        targets.append((f"[1,16] c={clients} req/s / Go echo {GO_ECHO[clients]} (reference)",
                        ratio, ">= 0.5" if clients == 16 else "-",
                        ratio >= 0.5 if clients == 16 else True))
    print("\nRatios and targets")
    print_table([{"ratio": t, "value": v, "goal": g, "met": ("yes" if m else "NO") if g != "-"
                  else ""} for t, v, g, m in targets],
                [("ratio", ""), ("value", ".2f"), ("goal", ""), ("met", "")])
    write_json(args.json, rows, loopback_echo_MBps=loop_mbps,
               targets=[{"ratio": t, "value": v, "goal": g, "met": m} for t, v, g, m in targets])
    if args.png:
        draw(by, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
