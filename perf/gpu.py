"""GPU: ResNet-50 served by gpserve next to the same model run in-process, on one
NVIDIA GPU, for TorchScript and (when onnxruntime has its CUDA provider) ONNX Runtime.

The model is built on the machine itself (torchvision's ResNet-50, random weights:
no download), traced to TorchScript on the device and exported to ONNX with a dynamic
batch axis. In-process baseline: host array in, host array out (as a server must),
at batches of 1, 8, 32 and 64; ONNX Runtime with the worker's options and a session
per batch size, as the worker runs it. Served: ``--device cuda --max-batch 64`` with 1
and 2 workers, 64 one-row clients and 16 eight-row clients (wrk), each load repeated
(a collapse shows as one repeat far below the others). Reported per load: the median
rows/s over repeats, the slowest repeat, the ratio to in-process batch 64 (the data
path's target: >= 0.9) and to the best in-process rate, p50/p99/max, the mean batch,
and the share of rows run that were padding.

    python perf/gpu.py [--formats torchscript,onnx] [--workers 1,2] [--repeats 3]
                       [--seconds 5] [--fronts 8] [--wrk-threads 4] [--json FILE]

Needs torch with CUDA, torchvision and wrk; on a host without ``../shared`` set
POST_BODY_LUA to a copy of ``shared/load/post_body.lua``. ``../shared/DEVICE.md``
says how to bring gpserve and onnxruntime-gpu to an air-gapped GPU host.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import exit_cleanly_on_sigterm, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

BATCHES = (1, 8, 32, 64)
LOADS = (("64 x 1", 64, 1), ("16 x 8", 16, 8))


def build_models(folder: Path, onnx: bool) -> dict[str, Path]:
    import torch
    import torchvision
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.zeros(1, 3, 224, 224)
    paths = {}
    if onnx:
        paths["onnx"] = folder / "resnet50.onnx"
        torch.onnx.export(model, x, str(paths["onnx"]), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17,
                          dynamo=False)
    paths["torchscript"] = folder / "resnet50.pt"
    with torch.no_grad():
        torch.jit.trace(model.cuda(), x.cuda()).save(str(paths["torchscript"]))
    return paths


def timed(run, batch: int, seconds: float = 1.5) -> float:
    """Rows/s of ``run(x)`` on one host array of ``batch`` rows, after warm runs."""
    x = np.random.default_rng(batch).random((batch, 3, 224, 224), dtype=np.float32)
    for _ in range(3):
        run(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(x)
        n += batch
    return n / (time.perf_counter() - t0)


def in_process(fmt: str, path: Path) -> dict[int, float]:
    if fmt == "torchscript":
        import torch
        module = torch.jit.load(str(path), map_location="cuda").eval()
        with torch.inference_mode():
            return {b: timed(lambda x: module(torch.from_numpy(x).cuda()).cpu().numpy(), b)
                    for b in BATCHES}
    import onnxruntime as ort
    from gpserve.workers.onnx import providers_for
    providers = providers_for("cuda", ort.get_available_providers(), True)
    rates = {}
    for b in BATCHES:                     # a session per size, as the worker runs it
        session = ort.InferenceSession(str(path), providers=providers)
        rates[b] = timed(lambda x, s=session: s.run(None, {"x": x}), b)
    return rates


def served(fmt: str, path: Path, workers: int, args, bodies: dict) -> list[dict]:
    extra = ["--shapes", "x=-1,3,224,224"] if fmt == "torchscript" else []
    runs = []
    with Server("--model", str(path), *extra, "--device", "cuda", "--max-batch", "64",
                "--workers", str(workers), "--placement", "workers",
                "--fronts", str(args.fronts), "--max-delay-ms", "10",
                "--batch-check-every", "0", ready_timeout=300) as s:
        url = s.url + "/"
        loadgen.run_wrk(url, bodies[1], 64, 1, threads=args.wrk_threads)   # page faults
        for repeat in range(args.repeats):
            for load, clients, rows in LOADS:
                before = s.stats()
                rep = loadgen.run_wrk(url, bodies[rows], clients, args.seconds,
                                      timeout_s=30, threads=args.wrk_threads)
                after = s.stats()
                batches = after["batches"] - before["batches"]
                run = after["batched_rows"] - before["batched_rows"]
                padded = after["padded_rows"] - before["padded_rows"]
                runs.append({"load": load, "rows_s": rep["rps"] * rows, **rep,
                             "mean_batch": run / batches if batches else 0.0,
                             "padding": padded / (run + padded) if run + padded else 0.0})
                print(f"  {fmt} {workers} worker(s) {load} #{repeat + 1}: "
                      f"{runs[-1]['rows_s']:,.0f} rows/s", flush=True)
    return runs


def summarize(fmt: str, workers: int, runs: list[dict], base: dict[int, float]) -> list[dict]:
    rows = []
    for load, _, _ in LOADS:
        mine = [r for r in runs if r["load"] == load]
        mid = sorted(mine, key=lambda r: r["rows_s"])[len(mine) // 2]
        median = statistics.median(r["rows_s"] for r in mine)
        rows.append({
            "format": fmt, "workers": workers, "load": load, "rows_s": median,
            "slowest": min(r["rows_s"] for r in mine), "vs_b64": median / base[64],
            "vs_best": median / max(base.values()), "p50_ms": mid["p50_ms"],
            "p99_ms": mid["p99_ms"], "p99_x": mid["p99_ms"] / mid["p50_ms"],
            "max_ms": max(r["max_ms"] for r in mine), "mean_batch": mid["mean_batch"],
            "padding": mid["padding"], "errors": sum(r["errors"] for r in mine)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="torchscript,onnx")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--fronts", type=int, default=8)
    ap.add_argument("--wrk-threads", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError as e:
        print(f"[skip] needs torch and torchvision: {e}")
        return 0
    if not torch.cuda.is_available() or not loadgen.wrk_available():
        print("[skip] needs a CUDA device visible to PyTorch, and wrk with post_body.lua")
        return 0
    formats = args.formats.split(",")
    if "onnx" in formats:
        import onnxruntime as ort
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print("[note] onnxruntime has no CUDA provider here: ONNX left out")
            formats.remove("onnx")
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    rng = np.random.default_rng(0)
    bodies = {rows: bytes(P.encode_request(P.InferRequest(
        [rng.random((rows, 3, 224, 224), dtype=np.float32)]))) for rows in (1, 8)}
    table, baselines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp), "onnx" in formats)
        for fmt in formats:
            baselines[fmt] = in_process(fmt, paths[fmt])
            print(f"  {fmt} in-process rows/s: " + ", ".join(
                f"batch {b}: {r:,.0f}" for b, r in baselines[fmt].items()), flush=True)
        for fmt in formats:
            for w in (int(x) for x in args.workers.split(",")):
                runs = served(fmt, paths[fmt], w, args, bodies)
                table += summarize(fmt, w, runs, baselines[fmt])
    print(f"\nResNet-50 on {device}: served rows/s (median of {args.repeats} x "
          f"{args.seconds:g} s) over in-process rows/s")
    for fmt, base in baselines.items():
        print(f"  in-process {fmt}: " + ", ".join(f"b{b} {r:,.0f}" for b, r in base.items()))
    print_table(table, [("format", ""), ("workers", "d"), ("load", ""), ("rows_s", ",.0f"),
                        ("slowest", ",.0f"), ("vs_b64", ".2f"), ("vs_best", ".2f"),
                        ("p50_ms", ".1f"), ("p99_ms", ".1f"), ("p99_x", ".1f"),
                        ("max_ms", ".0f"), ("mean_batch", ".1f"), ("padding", ".0%"),
                        ("errors", "d")])
    write_json(args.json, table, benchmark="gpu", device=device, in_process=baselines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
