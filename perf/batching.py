"""Batching efficiency (scenario 3 of the serving core), side by side in one run.

64 concurrent clients each send single-row requests to the OCR text-direction
classifier and to MiniLM (sequence length 32). Served rows/s is divided by the same
model's best offline rows/s: in-process inference on the same cores, the best over
batch sizes 1, 8, 32 and 1 or 2 threads, each measured in a fresh process. With
batching on (defaults) and off. The classifier is also run in its other formats (TF
SavedModel, TF frozen graph, TorchScript) against that format's own runtime, when
TensorFlow and PyTorch are installed (``--formats`` to choose).

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
from _common import bar_chart, exit_cleanly_on_sigterm, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
CLIENTS = 64


CLS_FILES = {
    "ocr-cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", [], "nchw"),
    "ocr-cls-savedmodel": ("ch_ppocr_mobile_v2.0_cls_savedmodel", [], "nhwc"),
    "ocr-cls-frozen": ("ch_ppocr_mobile_v2.0_cls_frozen.pb", [], "nhwc"),
    "ocr-cls-torchscript": ("ch_ppocr_mobile_v2.0_cls_torchscript.pt",
                            ["--shapes", "x=-1,3,48,192"], "nchw"),
}


def feed(name: str, n: int) -> dict:
    rng = np.random.default_rng(n)
    if name == "minilm-seq32":
        return {"input_ids": rng.integers(1000, 5000, (n, 32), dtype=np.int64),
                "attention_mask": np.ones((n, 32), np.int64),
                "token_type_ids": np.zeros((n, 32), np.int64)}
    shape = (n, 3, 48, 192) if CLS_FILES[name][2] == "nchw" else (n, 48, 192, 3)
    return {"x": rng.uniform(-1, 1, shape).astype(np.float32)}


def runner(name: str, path: Path, threads: int):
    """A function running one batch in this process with ``threads`` threads."""
    if name in ("ocr-cls", "minilm-seq32"):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda f: sess.run(None, f)
    if name == "ocr-cls-torchscript":
        import torch
        torch.set_num_threads(threads)
        module = torch.jit.load(str(path)).eval()

        def run(f):
            with torch.inference_mode():
                return module(torch.from_numpy(f["x"])).numpy()
        return run
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if name == "ocr-cls-savedmodel":
        fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda f: fn(x=tf.constant(f["x"]))["output_0"].numpy()
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    sess = tf.compat.v1.Session(graph=graph, config=tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1))
    return lambda f: sess.run("probs:0", {"x:0": f["x"]})


def offline_child(name: str, path: str, threads: int, seconds: float) -> None:
    """(In a fresh process) best rows/s over batch sizes, printed as JSON."""
    import json
    run = runner(name, Path(path), threads)
    best = (0.0, 0)
    for batch in (1, 8, 32):
        f = feed(name, batch)
        run(f)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(f)
            n += batch
        best = max(best, (n / (time.perf_counter() - t0), batch))
    print(json.dumps({"rows_s": best[0], "batch": best[1]}))


def offline_ceiling(name: str, path: Path, seconds: float) -> tuple[float, str]:
    import json
    import subprocess
    best, how = 0.0, ""
    for threads in (1, 2):
        out = subprocess.run([sys.executable, __file__, "--offline-child", name, str(path),
                              str(threads), str(seconds)], capture_output=True, text=True,
                             check=True, timeout=600)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  offline {name} threads={threads}: {r['rows_s']:.0f} rows/s "
              f"(batch {r['batch']})", flush=True)
        if r["rows_s"] > best:
            best, how = r["rows_s"], f"batch {r['batch']}, {threads} thread(s)"
    return best, how


def available_formats() -> list[str]:
    import importlib.util
    names = ["ocr-cls", "minilm-seq32"]
    if importlib.util.find_spec("tensorflow"):
        names += ["ocr-cls-savedmodel", "ocr-cls-frozen"]
    if importlib.util.find_spec("torch"):
        names.append("ocr-cls-torchscript")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--png", metavar="FILE", default="perf/results/batching.png")
    ap.add_argument("--engine", choices=["auto", "wrk", "async"], default="auto")
    ap.add_argument("--formats", help="comma-separated: " + ", ".join(
        list(CLS_FILES) + ["minilm-seq32"]))
    ap.add_argument("--offline-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    if args.offline_child:
        name, path, threads, seconds = args.offline_child
        offline_child(name, path, int(threads), float(seconds))
        return 0
    if not MODELS.exists():
        print(f"skipped: {MODELS} is absent (this benchmark needs ../shared/models)")
        return 0
    secs = 4 if args.quick else 10
    names = args.formats.split(",") if args.formats else available_formats()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "minilm-seq32":
                path, flags = Path(tmp) / "minilm.onnx", []
                path.write_bytes(gzip.decompress(
                    (MODELS / "all-MiniLM-L6-v2_int8.onnx.gz").read_bytes()))
            else:
                path, flags = MODELS / CLS_FILES[name][0], CLS_FILES[name][1]
            ceiling, how = offline_ceiling(name, path, 1.0 if args.quick else 2.0)
            one = feed(name, 1)
            body = bytes(P.encode_request(P.InferRequest(list(one.values()), list(one))))
            for batching in ("on", "off"):
                server_flags = ["--model", str(path), *flags] + (
                    ["--batching", "off"] if batching == "off" else [])
                with Server(*server_flags) as s:
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
    goal = lambda m: 0.9 if m == "minilm-seq32" else 0.75
    targets = [{"target": f"{r['model']} batching on", "ratio": r["ratio"],
                "goal": f">= {goal(r['model'])}",
                "met": "yes" if r["ratio"] >= goal(r["model"]) else "NO"}
               for r in rows if r["batching"] == "on"]
    print()
    print_table(targets, [("target", ""), ("ratio", ".2f"), ("goal", ""), ("met", "")])
    write_json(args.json, rows, targets=targets, cores=len(os.sched_getaffinity(0)))
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        labels = list(dict.fromkeys(r["model"] for r in rows))
        series = {f"batching {b}": [next(r["ratio"] for r in rows if r["model"] == m and
                                         r["batching"] == b) for m in labels]
                  for b in ("on", "off")}
        bar_chart(args.png, "Served rows/s over offline ONNX Runtime rows/s", labels, series,
                  "ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
