"""GPU economics on any machine: the batching policy and the worker's pipeline measured
with a stand-in model whose batch of n rows costs ``A + B*n`` ms with the GIL released
(``--model standin:A,B``, workers/standin.py), side by side with its ideal.

The ideal is the model's own rows/s at full batches, ``max_batch / (A + B*max_batch)``:
what a server would do if the device never waited. Reported per load (one-row clients,
and clients of 8 rows): served rows/s, its ratio to the ideal, p50 and p99, and the
mean batch the workers formed. The data path's targets (docs/architecture.md): >= 0.9
of the ideal at 64 one-row clients, p99 <= 3x p50.

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
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        with Server("--model", f"standin:{args.cost}", "--max-batch", str(args.max_batch),
                    "--max-delay-ms", str(args.max_delay_ms), "--workers", str(workers),
                    "--placement", "workers", "--batch-sizes", "steps",
                    "--batch-check-every", "0") as s:
            for load in args.loads.split(","):
                clients, per_request = (int(v) for v in load.split("x"))
                body = bytes(P.encode_request(P.InferRequest(
                    [np.ones((per_request, 16), np.float32)])))
                before = s.stats()
                r = loadgen.run(s.url + "/", body, clients, args.seconds)
                after = s.stats()
                batches = after["batches"] - before["batches"]
                served = r["rps"] * per_request
                rows.append({
                    "workers": workers, "load": f"{clients} x {per_request}",
                    "rows_per_s": served, "ideal": ideal * workers,
                    "ratio": served / (ideal * workers),
                    "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                    "p99_over_p50": r["p99_ms"] / r["p50_ms"] if r["p50_ms"] else float("nan"),
                    "mean_batch": (after["batched_rows"] - before["batched_rows"]) / batches
                    if batches else 0, "errors": r["errors"]})
    print(f"\nStand-in model {args.cost} ms (fixed, per row), --max-batch {args.max_batch}, "
          f"--max-delay-ms {args.max_delay_ms:g}; ideal {ideal:,.0f} rows/s per worker")
    print_table(rows, [("workers", "d"), ("load", "s"), ("rows_per_s", ",.0f"),
                       ("ideal", ",.0f"), ("ratio", ".2f"), ("p50_ms", ".1f"),
                       ("p99_ms", ".1f"), ("p99_over_p50", ".1f"), ("mean_batch", ".1f"),
                       ("errors", "d")])
    write_json(args.json, rows, benchmark="standin", cost=args.cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
