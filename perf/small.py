"""Small requests against the original Go GraphPipe server, side by side in one run.

float32 [1,16] bodies to the echo model at 1, 16 and 64 clients (wrk), gpserve next to
Oracle's own compiled ``graphpipe-echo`` (``../shared/peers/go/``) started by this
script on the same machine. Targets (issue 23; printed met/not met): in the fronts
(``auto``) >= 0.8 of Go's requests/s at 16 clients and >= 1.0 at 64; through the
workers >= 0.6 at 16, >= 0.75 at 64, and p50 at one client <= 2.5x Go's.

    python perf/small.py [--seconds 5] [--repeats 3] [--clients 1,16,64] [--fronts N]
                         [--placements auto,workers] [--wrk-threads 1] [--status-page]

``--placements``: where gpserve runs the model, a row per client count for each:
``auto`` (echo runs in the fronts) and ``workers`` (the front -> shared memory ->
worker hop that every GPU model takes).

``--status-page``: gpserve is also run with its status page open (a poller reading
``/_status/data`` every 1.5 s, as the page does), alternated with the runs without, and
the ratio printed (``page_x``; target >= 0.98: the page costs the hot path nothing
measurable).

``--floors``: three more servers in the same alternation, answering every request with
echo's answer and doing nothing else (``perf/floors.py``): ``python`` (uvloop and
httptools, the least a Python server can do), ``gpserve-http`` (gpserve's own front
protocol, its guards and fast path, no decoding and no model) and ``hop``
(``gpserve-http`` whose every request crosses to one more process and back first: the
least the workers' hop can cost). A second table gives each server's requests/s over
Go's and its CPU time per request (every process of the server, from ``/proc``): where
a gap to Go lies, in the HTTP layers, in the hop or in the model's path.

Repeats: each point is run ``--repeats`` times, alternating servers, and the median
reported with the spread (max/min - 1) of gpserve's runs. ``cpu_us``: CPU time per
request of the server's processes in its median run (steadier than requests/s on a
shared machine).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import Process, exit_cleanly_on_sigterm, free_port, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

GO_ECHO = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "go" / "graphpipe-echo"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--fronts", type=int, default=0, help="gpserve fronts (default: its own)")
    ap.add_argument("--placements", default="auto",
                    help="comma list of gpserve --placement values, a row each")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--status-page", action="store_true",
                    help="also run gpserve with its status page open")
    ap.add_argument("--floors", action="store_true",
                    help="also run perf/floors.py's python, gpserve-http and hop servers")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    if not GO_ECHO.exists() or not loadgen.wrk_available():
        print(f"[skip] needs {GO_ECHO} and wrk (apt-get install wrk)")
        return 0
    body = bytes(P.encode_request(P.InferRequest(
        [np.random.default_rng(0).random((1, 16), dtype=np.float32)])))
    go_port = free_port()
    go = Process([str(GO_ECHO), "-listen", f"127.0.0.1:{go_port}"],
                 f"http://127.0.0.1:{go_port}/", body)
    servers = {"go": (f"http://127.0.0.1:{go_port}/", go.proc.pid)}
    extra = ["--fronts", str(args.fronts)] if args.fronts else []
    rows, server_rows = [], []
    answer = tempfile.NamedTemporaryFile(suffix=".bin")       # echo's answer to body
    answer.write(bytes(P.encode_response(P.InferResponse(list(P.decode_request(body).inputs)))))
    answer.flush()
    floors: list[Process] = []
    try:
        for kind in ("python", "gpserve-http", "hop") if args.floors else ():
            url, floor = _floor(kind, body, answer.name, args)
            floors.append(floor)
            servers[kind] = (url, floor.proc.pid)
        for placement in args.placements.split(","):
            with Server("--model", "echo", "--placement", placement, *extra) as gp:
                here = {**servers, "gpserve": (gp.url + "/", gp.proc.pid)}
                if args.status_page:
                    here["gpserve+page"] = here["gpserve"]
                for c in (int(x) for x in args.clients.split(",")):
                    row, med = _point(here, body, c, args, placement)
                    rows.append(row)
                    server_rows += [{"placement": placement, "clients": c, "server": name,
                                    "rps": m["rps"], "of_go": m["rps"] / med["go"]["rps"],
                                    "cpu_us": m["cpu_us"], "p50_ms": m["p50_ms"]}
                                   for name, m in sorted(med.items(), key=_by_cost)
                                   if name != "gpserve+page"]
    finally:
        go.stop()
        for floor in floors:
            floor.stop()
    print(f"\nSmall requests, float32 [1,16], echo; median of {args.repeats} x "
          f"{args.seconds:g} s (wrk -t{args.wrk_threads})")
    print_table(rows, [("placement", "s"), ("clients", "d"), ("go_rps", ",.0f"),
                       ("gpserve_rps", ",.0f"), ("ratio", ".2f"), ("go_p50_ms", ".3f"),
                       ("gp_p50_ms", ".3f"), *([("page_x", ".2f")] if args.status_page else []),
                       ("p50_x", ".1f"), ("gp_p99_ms", ".2f"), ("spread", ".0%"),
                       ("errors", "d"), ("go_cpu_us", ".1f"), ("gp_cpu_us", ".1f")])
    if args.floors:
        print("\nEach server over Go's requests/s, and its CPU time per request (all its "
              "processes)")
        print_table(server_rows, [("placement", "s"), ("clients", "d"), ("server", "s"),
                                 ("rps", ",.0f"), ("of_go", ".2f"), ("cpu_us", ".1f"),
                                 ("p50_ms", ".3f")])
    for row in rows:
        for what, value, goal in _targets(row):
            print(f"  {row['placement']} {row['clients']} clients, {what}: {value:.2f} "
                  f"({goal}: {'met' if _meets(value, goal) else 'not met'})")
    write_json(args.json, rows, benchmark="small", repeats=args.repeats, servers=server_rows)
    return 0


# (placement, clients) -> (what, row field, goal): issue 23's targets
TARGETS = {("auto", 16): ("requests/s / Go's", "ratio", ">= 0.8"),
           ("auto", 64): ("requests/s / Go's", "ratio", ">= 1.0"),
           ("workers", 16): ("requests/s / Go's", "ratio", ">= 0.6"),
           ("workers", 64): ("requests/s / Go's", "ratio", ">= 0.75"),
           ("workers", 1): ("p50 / Go's", "p50_x", "<= 2.5")}


def _targets(row: dict) -> list[tuple[str, float, str]]:
    target = TARGETS.get((row["placement"], row["clients"]))
    return [] if target is None else [(target[0], row[target[1]], target[2])]


def _meets(value: float, goal: str) -> bool:
    sign, bound = goal.split()
    return value >= float(bound) if sign == ">=" else value <= float(bound)


def _floor(kind: str, body: bytes, answer_file: str, args) -> tuple[str, Process]:
    """A ``perf/floors.py`` server answering what is in ``answer_file``, started."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    return url, Process([sys.executable, str(Path(__file__).with_name("floors.py")), kind,
                         "--port", str(port), "--answer-file", answer_file,
                         "--processes", str(args.fronts or _default_fronts())],
                        url, body, group=True)


def _by_cost(item) -> int:
    """Go, then the floors from the least work up, then gpserve."""
    order = ("go", "python", "gpserve-http", "hop")
    return order.index(item[0]) if item[0] in order else len(order)


def _default_fronts() -> int:
    """As many processes as gpserve runs fronts by default on this machine."""
    from gpserve.config import Config
    return Config(model="echo", device="cpu").settle().fronts


def _point(servers: dict, body: bytes, c: int, args, placement: str) -> tuple[dict, dict]:
    """Every server at ``c`` clients, alternated ``--repeats`` times: gpserve's row against
    Go, and each server's median run (with ``cpu_us``: its CPU time per request)."""
    runs: dict[str, list] = {"go": [], "gpserve": []}
    for _ in range(args.repeats):
        for name, (url, pid) in servers.items():
            with StatusPoller(url if name == "gpserve+page" else None):
                runs.setdefault(name, []).append(loadgen.run_wrk(
                    url, body, c, args.seconds, threads=args.wrk_threads, server_pid=pid))
    med = {n: sorted(r, key=lambda x: x["rps"])[len(r) // 2] for n, r in runs.items()}
    rps = [r["rps"] for r in runs["gpserve"]]
    return {
        "placement": placement, "clients": c, "go_rps": med["go"]["rps"],
        "gpserve_rps": med["gpserve"]["rps"], "ratio": med["gpserve"]["rps"] / med["go"]["rps"],
        "go_p50_ms": med["go"]["p50_ms"], "gp_p50_ms": med["gpserve"]["p50_ms"],
        "p50_x": med["gpserve"]["p50_ms"] / med["go"]["p50_ms"],
        "gp_p99_ms": med["gpserve"]["p99_ms"],
        "spread": max(rps) / min(rps) - 1 if min(rps) > 0 else float("nan"),
        "errors": sum(r["errors"] for r in runs["gpserve"]),
        "go_cpu_us": med["go"]["cpu_us"], "gp_cpu_us": med["gpserve"]["cpu_us"],
        **({"page_x": med["gpserve+page"]["rps"] / med["gpserve"]["rps"]}
           if "gpserve+page" in med else {})}, med


class StatusPoller:
    """The status page open in a browser, as far as the server can tell: GET
    /_status/data every 1.5 s (``url`` None: nothing)."""

    def __init__(self, url: str | None):
        import threading
        self.url, self.stop = url, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import urllib.request
        while not self.stop.wait(1.5):
            with urllib.request.urlopen(f"{self.url}_status/data", timeout=10) as r:
                r.read()

    def __enter__(self):
        if self.url is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.url is not None:
            self.thread.join(15)


if __name__ == "__main__":
    sys.exit(main())
