"""GPU benchmark (one prepared script for a lent NVIDIA machine; finishes within 8 minutes).

Serves the OCR text-direction classifier as TorchScript on CUDA and measures served
rows/s against in-process GPU inference of the same model at the same batch sizes:
- offline: ``torch.jit.load(...).cuda()`` run on batches of 1, 8, 32 and 128 rows;
- served: gpserve ``--device cuda``, clients sending requests of those row counts
  (16 concurrent; and 64 concurrent single-row clients, which the worker merges).
The TorchScript backend is the GPU path that needs no extra wheel on the lent machine
(it has PyTorch but no internet and carries at most 64 MiB per call: onnxruntime-gpu is
bigger). gpserve's own dependencies must be importable there; ``--wheels DIR`` installs
them from a folder made here with
``pip download -d wheels starlette uvicorn httptools uvloop lmdb blake3 platformdirs
aiohttp urllib3 tqdm``.

    python perf/gpu.py [--model PATH] [--seconds 8] [--json FILE] [--wheels DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = (HERE.parents[0].parent / "shared" / "models"
                 / "ch_ppocr_mobile_v2.0_cls_torchscript.pt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--wheels", type=Path, help="install missing dependencies from here")
    args = ap.parse_args(argv)
    if args.wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                        "--find-links", str(args.wheels), "--no-deps", "-e",
                        str(HERE.parent)] + [str(w) for w in args.wheels.glob("*.whl")],
                       check=True)
    import numpy as np
    import torch
    if not torch.cuda.is_available():
        print("skipped: no CUDA device visible to PyTorch")
        return 0
    sys.path.insert(0, str(HERE))
    import loadgen
    from _common import print_table, write_json

    from gpserve import protocol as P
    from gpserve.testing import Server

    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    module = torch.jit.load(str(args.model), map_location="cuda").eval()
    rows = []
    rng = np.random.default_rng(0)
    batches = (1, 8, 32, 128)
    offline = {}
    for b in batches:
        x = torch.from_numpy(rng.uniform(-1, 1, (b, 3, 48, 192)).astype(np.float32)).cuda()
        with torch.inference_mode():
            for _ in range(10):
                module(x)
            torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2.0:
                module(x).cpu()            # the server also brings outputs back to the host
                n += b
        offline[b] = n / (time.perf_counter() - t0)
        print(f"  offline batch {b}: {offline[b]:.0f} rows/s", flush=True)

    with Server("--model", str(args.model), "--shapes", "x=-1,3,48,192", "--device", "cuda",
                "--max-batch", "128") as s:
        for b in batches:
            x = rng.uniform(-1, 1, (b, 3, 48, 192)).astype(np.float32)
            body = bytes(P.encode_request(P.InferRequest([x])))
            rep = loadgen.run(s.url + "/", body, 16, args.seconds, engine="async")
            served = rep["rps"] * b
            rows.append({"load": f"16 clients x {b} rows", "served_rows_s": served,
                         "offline_rows_s": offline[b], "ratio": served / offline[b],
                         "p50_ms": rep["p50_ms"]})
            print(f"  served {b}-row requests: {served:.0f} rows/s", flush=True)
        x = rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
        rep = loadgen.run(s.url + "/", bytes(P.encode_request(P.InferRequest([x]))), 64,
                          args.seconds, engine="async")
        best = max(offline.values())
        rows.append({"load": "64 clients x 1 row (batched)", "served_rows_s": rep["rps"],
                     "offline_rows_s": best, "ratio": rep["rps"] / best,
                     "p50_ms": rep["p50_ms"], "mean_batch": s.stats()["mean_batch_rows"]})
    print("\nServed rows/s over in-process GPU rows/s at the same batch size")
    print_table(rows, [("load", ""), ("served_rows_s", ".0f"), ("offline_rows_s", ".0f"),
                       ("ratio", ".2f"), ("p50_ms", ".1f")])
    write_json(args.json, rows, device=torch.cuda.get_device_name(0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
