"""GPU economics on any machine: the batching policy and the worker's pipeline measured
with a stand-in model whose batch of n rows costs ``A + B*n`` ms with the GIL released
(``--model standin:A,B``, workers/standin.py), side by side with its ideal.

The ideal is the model's own rows/s at full batches, ``max_batch / (A + B*max_batch)``:
what a server would do if the device never waited. Closed-loop clients cannot get it
while their rows in flight are under two full batches per worker, for a batch's
clients must be answered and come back before their rows can run again. The bound is
the better of two shapes: two cohorts of half the rows alternating (one runs while the
other is answered), ``(R/2) / t(R/2)``; or one cohort of them all, each batch followed
by its requests' round trip, ``R / (t(R) + requests / R0)``, where ``R0`` is this
server's own requests/s on the same load with a model that costs nothing (measured
first, in this run). At 64 one-row clients and ``--max-batch 64`` for 8 ms + 0.05
ms/row, 0.9 of the ideal would need the 64 requests' round trip under 1.25 ms (51k
requests/s through a worker process, on 2 cores shared with the load generator).

Reported per load (one-row clients, and clients of 8 rows): served rows/s, its ratio
to the ideal and to the bound, p50 and p99, the mean batch the workers formed, and the
device's idle time per batch. The issue's target was >= 0.9 of the ideal at 64 one-row
clients; see docs/benchmarks.md for why it is restated against the bound; p99 <= 3x
p50.

    python perf/standin.py [--cost 8,0.05] [--max-batch 64] [--workers 1,2] [--seconds 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import exit_cleanly_on_sigterm, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cost", default="8,0.05", help="A,B: ms per batch, ms per row")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=10.0)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--loads", default="64x1,16x8", help="CLIENTSxROWS, comma-separated")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    fixed, per_row = (float(v) / 1e3 for v in args.cost.split(","))
    ideal = args.max_batch / (fixed + per_row * args.max_batch)

    def t(n: float) -> float:
        return fixed + per_row * n

    def bound(in_flight: float, requests: float, zero_cost_rps: float) -> float:
        """The most one worker can serve with ``in_flight`` rows from ``requests``
        closed-loop requests (see the module doc)."""
        half = min(in_flight / 2, args.max_batch)
        two_cohorts = half / t(half) if half else 0.0
        if in_flight > args.max_batch:
            return two_cohorts
        return max(two_cohorts, in_flight / (t(in_flight) + requests / zero_cost_rps))

    def serve(model: str, workers: int):
        return Server("--model", model, "--max-batch", str(args.max_batch),
                      "--max-delay-ms", str(args.max_delay_ms), "--workers", str(workers),
                      "--placement", "workers", "--batch-sizes", "steps",
                      "--batch-check-every", "0")

    loads = [tuple(int(v) for v in load.split("x")) for load in args.loads.split(",")]
    bodies = {per_request: bytes(P.encode_request(P.InferRequest(
        [np.ones((per_request, 16), np.float32)]))) for _, per_request in loads}
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        with serve("standin:0,0", workers) as s:
            zero_cost = {load: loadgen.run(s.url + "/", bodies[load[1]], load[0],
                                           args.seconds)["rps"] for load in loads}
        with serve(f"standin:{args.cost}", workers) as s:
            for clients, per_request in loads:
                before = s.stats()
                r = loadgen.run(s.url + "/", bodies[per_request], clients, args.seconds)
                after = s.stats()
                batches = after["batches"] - before["batches"]
                mean_batch = ((after["batched_rows"] - before["batched_rows"]) / batches
                              if batches else 0)
                served = r["rps"] * per_request
                limit = workers * bound(clients * per_request / workers, clients / workers,
                                        zero_cost[clients, per_request] / workers)
                idle = (workers * mean_batch / served - t(mean_batch)
                        if served and mean_batch else float("nan"))
                rows.append({
                    "workers": workers, "load": f"{clients} x {per_request}",
                    "zero_cost_rps": zero_cost[clients, per_request],
                    "rows_per_s": served, "ideal": ideal * workers,
                    "ratio": served / (ideal * workers), "bound": limit,
                    "of_bound": served / limit if limit else float("nan"),
                    "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                    "p99_over_p50": r["p99_ms"] / r["p50_ms"] if r["p50_ms"] else float("nan"),
                    "mean_batch": mean_batch, "idle_ms": 1e3 * idle, "errors": r["errors"]})
    print(f"\nStand-in model {args.cost} ms (fixed, per row), --max-batch {args.max_batch}, "
          f"--max-delay-ms {args.max_delay_ms:g}; ideal {ideal:,.0f} rows/s per worker")
    print_table(rows, [("workers", "d"), ("load", "s"), ("rows_per_s", ",.0f"),
                       ("ideal", ",.0f"), ("ratio", ".2f"), ("zero_cost_rps", ",.0f"),
                       ("bound", ",.0f"),
                       ("of_bound", ".2f"), ("p50_ms", ".1f"),
                       ("p99_ms", ".1f"), ("p99_over_p50", ".1f"), ("mean_batch", ".1f"),
                       ("idle_ms", ".1f"), ("errors", "d")])
    write_json(args.json, rows, benchmark="standin", cost=args.cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
