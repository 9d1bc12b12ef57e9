"""Batching efficiency (scenario 3 of the serving core), side by side in one run.

64 concurrent clients each send single-row requests to the OCR text-direction
classifier and to MiniLM (sequence length 32). Served rows/s is divided by the same
model's best offline rows/s: in-process ONNX Runtime on the same cores, the best over
batch sizes 1, 8, 32 and 1 or 2 threads. With batching on (defaults) and off.

Needs ../shared/models (CI has it). Load from wrk when installed, else aiohttp.

    python perf/batching.py [--quick] [--json FILE] [--png FILE]
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import bar_chart, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
CLIENTS = 64


def models(tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    minilm = tmp / "minilm.onnx"
    minilm.write_bytes(gzip.decompress((MODELS / "all-MiniLM-L6-v2_int8.onnx.gz").read_bytes()))
    seq = 32
    return {
        "ocr-cls": (MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                    lambda n: {"x": rng.uniform(-1, 1, (n, 3, 48, 192)).astype(np.float32)}),
        "minilm-seq32": (minilm, lambda n: {
            "input_ids": rng.integers(1000, 5000, (n, seq), dtype=np.int64),
            "attention_mask": np.ones((n, seq), np.int64),
            "token_type_ids": np.zeros((n, seq), np.int64)}),
    }


def offline_ceiling(path: Path, make, seconds: float) -> tuple[float, str]:
    """Best in-process rows/s over batch sizes and thread counts."""
    import onnxruntime as ort
    best, how = 0.0, ""
    for threads in (1, 2):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for batch in (1, 8, 32):
            feed = make(batch)
            sess.run(None, feed)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                sess.run(None, feed)
                n += batch
            rate = n / (time.perf_counter() - t0)
            print(f"  offline {path.name} threads={threads} batch={batch}: {rate:.0f} rows/s",
                  flush=True)
            if rate > best:
                best, how = rate, f"batch {batch}, {threads} thread(s)"
    return best, how


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--png", metavar="FILE", default="perf/results/batching.png")
    ap.add_argument("--engine", choices=["auto", "wrk", "async"], default="auto")
    args = ap.parse_args(argv)
    if not MODELS.exists():
        print(f"skipped: {MODELS} is absent (this benchmark needs ../shared/models)")
        return 0
    secs = 4 if args.quick else 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, make) in models(Path(tmp)).items():
            ceiling, how = offline_ceiling(path, make, 1.0 if args.quick else 2.0)
            one = make(1)
            body = bytes(P.encode_request(P.InferRequest(list(one.values()), list(one))))
            for batching in ("on", "off"):
                flags = ["--model", str(path)] + (["--batching", "off"] if batching == "off"
                                                  else [])
                with Server(*flags) as s:
                    rep = loadgen.run(s.url + "/", body, CLIENTS, secs, args.engine,
                                      repeats=1 if args.quick else 3)
                    stats = s.stats()
                row = {"model": name, "batching": batching, "served_rows_s": rep["rps"],
                       "offline_rows_s": ceiling, "offline_best": how,
                       "ratio": rep["rps"] / ceiling, "mean_batch": stats["mean_batch_rows"],
                       "p50_ms": rep["p50_ms"], "p99_ms": rep["p99_ms"],
                       "errors": rep["errors"]}
                rows.append(row)
                print(f"  served {name} batching {batching}: {rep['rps']:.0f} rows/s "
                      f"(mean batch {stats['mean_batch_rows']})", flush=True)

    print(f"\n{CLIENTS} concurrent single-row clients; served rows/s / best offline rows/s")
    print_table(rows, [("model", ""), ("batching", ""), ("served_rows_s", ".0f"),
                       ("offline_rows_s", ".0f"), ("offline_best", ""), ("ratio", ".2f"),
                       ("mean_batch", ".1f"), ("p50_ms", ".1f"), ("p99_ms", ".1f")])
    goals = {"minilm-seq32": 0.9, "ocr-cls": 0.75}
    targets = [{"target": f"{r['model']} batching on", "ratio": r["ratio"],
                "goal": f">= {goals[r['model']]}",
                "met": "yes" if r["ratio"] >= goals[r["model"]] else "NO"}
               for r in rows if r["batching"] == "on"]
    print()
    print_table(targets, [("target", ""), ("ratio", ".2f"), ("goal", ""), ("met", "")])
    write_json(args.json, rows, targets=targets, cores=len(os.sched_getaffinity(0)))
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        labels = sorted({r["model"] for r in rows})
        series = {f"batching {b}": [next(r["ratio"] for r in rows if r["model"] == m and
                                         r["batching"] == b) for m in labels]
                  for b in ("on", "off")}
        bar_chart(args.png, "Served rows/s over offline ONNX Runtime rows/s", labels, series,
                  "ratio")
        print(f"\nchart: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
