"""How cost grows with work: requests/s and p99 as clients grow, and throughput as the
body grows, gpserve next to the original Go ``graphpipe-echo`` (``../shared/peers/go``),
side by side in one run (each point: Go, then gpserve).

1. Clients 1 -> 256 (doubling), float32 [1,16] bodies to echo.
2. Bodies 64 B -> 64 MB (x16 each step), float32 [1, n/4], at ``--body-clients``.

The *knee* of a curve is where more work stops paying: for clients, the fewest that
reach 90% of the highest requests/s (past it, clients mostly queue: p99 grows, rows/s
hardly do); for bodies, the size of the highest MB/s. Both are printed for each server, and
the charts drawn (``--png``; needs matplotlib).

    python perf/scaling.py [--seconds 3] [--clients 1,2,...,256]
                           [--bodies 64,1024,...,67108864] [--body-clients 4]
                           [--wrk-threads 1] [--json FILE] [--png FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import Process, exit_cleanly_on_sigterm, free_port, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

GO_ECHO = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "go" / "graphpipe-echo"
KNEE_SHARE = 0.9          # the clients' knee: the fewest reaching this share of the peak


def body_of(nbytes: int) -> bytes:
    x = np.random.default_rng(0).random((1, max(1, nbytes // 4)), dtype=np.float32)
    return bytes(P.encode_request(P.InferRequest([x])))


def clients_knee(rows: list[dict], server: str) -> int:
    """The fewest clients that reach 90% of the highest requests/s (robust to one noisy
    point, where "the first doubling that stops paying" is not)."""
    peak = max(r[f"{server}_rps"] for r in rows)
    return next(r["clients"] for r in rows if r[f"{server}_rps"] >= KNEE_SHARE * peak)


def body_knee(rows: list[dict], server: str) -> int:
    """The body size of the highest MB/s."""
    return max(rows, key=lambda r: r[f"{server}_MBps"])["body_bytes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--clients", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--bodies", default="64,1024,16384,262144,4194304,67108864")
    ap.add_argument("--body-clients", type=int, default=4)
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--png", default="perf/results/scaling.png")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    if not GO_ECHO.exists() or not loadgen.wrk_available():
        print(f"[skip] needs {GO_ECHO} and wrk (apt-get install wrk)")
        return 0
    small = body_of(64)
    go_port = free_port()
    go = Process([str(GO_ECHO), "-listen", f"127.0.0.1:{go_port}"],
                 f"http://127.0.0.1:{go_port}/", small)
    try:
        with Server("--model", "echo", "--max-body-mb", "256") as gp:
            urls = {"go": f"http://127.0.0.1:{go_port}/", "gpserve": gp.url + "/"}
            by_clients = [_point(urls, small, c, args) | {"clients": c}
                          for c in (int(x) for x in args.clients.split(","))]
            by_body = [_point(urls, body_of(n), args.body_clients, args) | {"body_bytes": n}
                       for n in (int(x) for x in args.bodies.split(","))]
    finally:
        go.stop()
    _report(by_clients, by_body, args)
    write_json(args.json, by_clients + by_body, benchmark="scaling")
    _chart(args.png, by_clients, by_body)
    return 0


def _point(urls: dict, body: bytes, clients: int, args) -> dict:
    """Go, then gpserve, on one load."""
    row: dict = {}
    for name, url in urls.items():
        r = loadgen.run_wrk(url, body, clients, args.seconds, threads=args.wrk_threads)
        row[f"{name}_rps"], row[f"{name}_p99_ms"] = r["rps"], r["p99_ms"]
        row[f"{name}_MBps"] = r["rps"] * len(body) / 1e6
        row[f"{name}_errors"] = r["errors"]
    row["ratio"] = row["gpserve_rps"] / row["go_rps"] if row["go_rps"] else float("nan")
    return row


def _report(by_clients: list[dict], by_body: list[dict], args) -> None:
    print(f"\nAs clients grow: float32 [1,16] to echo, {args.seconds:g} s a point "
          f"(wrk -t{args.wrk_threads})")
    print_table(by_clients, [("clients", "d"), ("go_rps", ",.0f"), ("gpserve_rps", ",.0f"),
                             ("ratio", ".2f"), ("go_p99_ms", ".2f"), ("gpserve_p99_ms", ".2f"),
                             ("gpserve_errors", "d")])
    print(f"\nAs the body grows: float32 [1, n/4] to echo, {args.body_clients} clients")
    print_table(by_body, [("body_bytes", ",d"), ("go_MBps", ",.1f"), ("gpserve_MBps", ",.1f"),
                          ("ratio", ".2f"), ("go_p99_ms", ".2f"), ("gpserve_p99_ms", ".2f"),
                          ("gpserve_errors", "d")])
    print("\nKnees (clients: the fewest reaching 90% of the highest requests/s; bodies: "
          "the size of the highest MB/s)")
    for server in ("go", "gpserve"):
        print(f"  {server:8s} clients {clients_knee(by_clients, server)}, "
              f"body {body_knee(by_body, server):,d} bytes")


def _chart(path: str, by_clients: list[dict], by_body: list[dict]) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"\n[skip] chart {path}: matplotlib is not installed "
              "(pip install -e '.[bench]' installs every benchmark extra)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for server in ("go", "gpserve"):
        clients = [r["clients"] for r in by_clients]
        left.plot(clients, [r[f"{server}_rps"] for r in by_clients], marker="o", label=server)
        right.plot([r["body_bytes"] for r in by_body], [r[f"{server}_MBps"] for r in by_body],
                   marker="o", label=server)
    twin = left.twinx()
    twin.plot(clients, [r["gpserve_p99_ms"] for r in by_clients], "k:", label="gpserve p99")
    twin.set_ylabel("gpserve p99 (ms)")
    left.set(xscale="log", xlabel="clients", ylabel="requests/s",
             title="As clients grow ([1,16] echo)")
    right.set(xscale="log", xlabel="body bytes", ylabel="MB/s",
              title="As the body grows (echo)")
    left.legend(loc="upper left")
    right.legend(loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nchart: {path}")


if __name__ == "__main__":
    sys.exit(main())
