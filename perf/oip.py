"""The Open Inference Protocol, measured side by side in one run.

1. **Protocols**: the same model and load (wrk, single-row requests) over GraphPipe
   (``POST /``) and over the protocol's binary extension (``POST /v2/.../infer``), one
   front, runs in pairs (each side first in turn); the ratio is the median pair's.
   Target: v2 >= 0.95 of GraphPipe's rows/s with the answer in binary too (the
   protocols should cost the same); a JSON answer is shown beside it.
2. **Triton**: gpserve over v2 next to Triton (through PyTriton, ``../shared/peers``) on
   the peers' identity ([1,16]) and MLP ([1,256] -> 3 x 1024 -> [1,10]) models, the same
   v2 bodies, batching on for both (max 32 rows, 2 ms). Target: >= 2x Triton's rows/s.
3. **Shared memory**: one local client (tritonclient.http) moving float32
   [8,224,224,3] through the echo model, input and output in system shared memory,
   against the same client with the binary extension. Target: >= 3x the MB/s.

``perf_analyzer`` (PyPI ``perf-analyzer``) would be the natural load for 2; on our
machines PyPI offers only a placeholder release of it, so wrk sends the same bodies.

    python perf/oip.py [--seconds 5] [--repeats 3] [--parts protocols,triton,shm]
                       [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import Process, exit_cleanly_on_sigterm, free_port, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1].parent / "shared" / "peers"
PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path(tempfile.gettempdir()) / "gpserve-peers"))


V2_TARGET = 0.95         # v2 binary over GraphPipe's rows/s, same model and load


def v2_body(name: str, x: np.ndarray, output: str | None = None,
            binary_answer: bool = True) -> tuple[bytes, dict]:
    """A binary-extension request and its headers, as tritonclient sends them: the
    output asked for in binary, or, with none named, every output in binary
    (``binary_data_output``, tritonclient.http's default). ``binary_answer`` False:
    the answer in JSON (a client that names no output and sets no parameter)."""
    head: dict = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                              "parameters": {"binary_data_size": x.nbytes}}]}
    if output is not None:
        head["outputs"] = [{"name": output, "parameters": {"binary_data": True}}]
    elif binary_answer:
        head["parameters"] = {"binary_data_output": True}
    raw = json.dumps(head).encode()
    return raw + x.tobytes(), {"Inference-Header-Content-Length": str(len(raw)),
                               "Content-Type": "application/octet-stream"}


def peer_models() -> Path | None:
    models = PEERS_DIR / "models"
    tools = PEERS_DIR / "tools" / "venv" / "bin" / "python"
    if not (models / "mlp.onnx").exists() and tools.exists():
        subprocess.run([str(tools), str(SCRIPTS / "build_models.py"), str(models)],
                       check=True, capture_output=True)
    return models if (models / "mlp.onnx").exists() else None


def protocols(seconds: float, repeats: int) -> list[dict]:
    rows = []
    models = peer_models()
    # (model, its name, row width, clients, how the v2 body asks for the answer); the
    # target is the binary rows'; a JSON answer (no output named, no parameter) is shown
    cases = [("echo", "echo", 16, 16, "binary"), ("echo", "echo", 16, 16, "JSON")]
    if models is not None:
        cases.append((str(models / "mlp.onnx"), "mlp", 256, 32, "binary"))
    for model, name, width, clients, answer in cases:
        x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
        # one front: with several, wrk's connections land unevenly on them and the
        # split, not the protocol, decides the rate (up to 2x between runs here)
        with Server("--model", model, "--fronts", "1") as s:
            gp = bytes(P.encode_request(P.InferRequest([x])))
            body, headers = (v2_body("x", x, binary_answer=answer == "binary")
                             if name == "echo" else v2_body("INPUT", x, "OUTPUT"))
            runs: dict[str, list[dict]] = {"gp": [], "v2": []}
            load = {"gp": (s.url + "/", gp, None),
                    "v2": (f"{s.url}/v2/models/{name}/infer", body, headers)}
            for i in range(repeats):   # in pairs, each side first in turn: same drift
                for k in ("gp", "v2") if i % 2 == 0 else ("v2", "gp"):
                    url, data, extra = load[k]
                    runs[k].append(loadgen.run(url, data, clients, seconds, headers=extra))
            a, b = (sorted(runs[k], key=lambda r: r["rps"])[repeats // 2] for k in runs)
            ratios = sorted(v["rps"] / g["rps"] for g, v in zip(runs["gp"], runs["v2"]))
            rows.append({"model": name, "answer": answer, "clients": clients,
                         "graphpipe_rps": a["rps"], "v2_rps": b["rps"],
                         "ratio": ratios[repeats // 2],        # the median pair's
                         "gp_p50_ms": a["p50_ms"], "v2_p50_ms": b["p50_ms"],
                         "spread": max(_spread(runs["gp"]), _spread(runs["v2"])),
                         "errors": sum(r["errors"] for k in runs for r in runs[k])})
    return rows


def _spread(runs: list[dict]) -> float:
    rates = [r["rps"] for r in runs]
    return max(rates) / min(rates) - 1


def triton(seconds: float) -> list[dict]:
    models = peer_models()
    venv = PEERS_DIR / "pytriton" / "venv" / "bin" / "python"
    if models is None or not venv.exists():
        print("  (Triton skipped: run ../shared/peers/setup_common.sh and setup_pytriton.sh)")
        return []
    rows = []
    for name, width, clients in (("identity", 16, 16), ("mlp", 256, 32)):
        x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
        body, headers = v2_body("INPUT", x, "OUTPUT")
        port = free_port()
        os.environ["PEERS_DIR"] = str(PEERS_DIR)
        peer = Process([str(venv), str(SCRIPTS / "pytriton_server.py"), "--model", name,
                        "--batching", "on", "--port", str(port)],
                       f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=180,
                       group=True)
        try:
            t = loadgen.run(f"http://127.0.0.1:{port}/v2/models/{name}/infer", body,
                            clients, seconds, headers=headers)
        finally:
            peer.stop()
        with Server("--model", str(models / f"{name}.onnx"), "--max-batch", "32",
                    "--max-delay-ms", "2") as s:
            g = loadgen.run(f"{s.url}/v2/models/{name}/infer", body, clients, seconds,
                            headers=headers)
        rows.append({"model": name, "clients": clients, "triton_rps": t["rps"],
                     "gpserve_rps": g["rps"], "ratio": g["rps"] / t["rps"],
                     "triton_p50_ms": t["p50_ms"], "gp_p50_ms": g["p50_ms"],
                     "errors": t["errors"] + g["errors"]})
    return rows


def shared_memory(seconds: float) -> list[dict]:
    import tritonclient.http as hc
    import tritonclient.utils.shared_memory as shm
    x = np.random.default_rng(0).standard_normal((8, 224, 224, 3)).astype(np.float32)
    with Server("--model", "echo", "--shm-clients") as s:
        c = hc.InferenceServerClient(s.url.removeprefix("http://"),
                                     network_timeout=120, connection_timeout=120)
        key = f"/perf-oip-{os.getpid()}"
        h_in = shm.create_shared_memory_region("in", key + "-in", x.nbytes)
        h_out = shm.create_shared_memory_region("out", key + "-out", x.nbytes)
        try:
            shm.set_shared_memory_region(h_in, [x])
            c.register_system_shared_memory("in", key + "-in", x.nbytes)
            c.register_system_shared_memory("out", key + "-out", x.nbytes)

            def binary():
                inp = hc.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                return c.infer("echo", [inp]).as_numpy("output")

            def by_reference():
                inp = hc.InferInput("x", list(x.shape), "FP32")
                inp.set_shared_memory("in", x.nbytes)
                out = hc.InferRequestedOutput("output")
                out.set_shared_memory("out", x.nbytes)
                c.infer("echo", [inp], outputs=[out])
                return shm.get_contents_as_numpy(h_out, np.float32, x.shape)
            rows = []
            for label, fn in (("binary", binary), ("shared memory", by_reference)):
                np.testing.assert_array_equal(fn(), x)       # right, and warm
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    fn()
                    n += 1
                elapsed = time.perf_counter() - t0
                rows.append({"path": label, "requests": n, "rps": n / elapsed,
                             "MBps": n * x.nbytes / elapsed / 1e6,
                             "ms": elapsed / n * 1e3})
            c.unregister_system_shared_memory()
        finally:
            shm.destroy_shared_memory_region(h_in)
            shm.destroy_shared_memory_region(h_out)
    rows[1]["ratio"] = rows[1]["MBps"] / rows[0]["MBps"]
    rows[0]["ratio"] = 1.0
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--parts", default="protocols,triton,shm")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per protocol, alternating; the median is reported")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    parts = args.parts.split(",")
    results = {}
    if "protocols" in parts:
        results["protocols"] = rows = protocols(args.seconds, args.repeats)
        print(f"\nSame model and load: GraphPipe vs the Open Inference Protocol (binary "
              f"request), {args.repeats} runs each in pairs (rows/s: the median run; "
              f"ratio: the median pair's); target v2 >= "
              f"{V2_TARGET} with the answer in binary too")
        print_table(rows, [("model", ""), ("answer", ""), ("clients", "d"),
                           ("graphpipe_rps", ",.0f"), ("v2_rps", ",.0f"), ("ratio", ".2f"),
                           ("gp_p50_ms", ".2f"), ("v2_p50_ms", ".2f"), ("spread", ".0%"),
                           ("errors", "d")])
        for r in rows:
            if r["answer"] != "binary":
                continue
            print(f"  {r['model']}: v2 / GraphPipe {r['ratio']:.2f} (>= {V2_TARGET}: "
                  f"{'met' if r['ratio'] >= V2_TARGET else 'not met'})")
    if "triton" in parts:
        results["triton"] = rows = triton(args.seconds)
        if rows:
            print("\ngpserve vs Triton (PyTriton), both over v2 binary, single rows, "
                  "batching on; target >= 2x")
            print_table(rows, [("model", ""), ("clients", "d"), ("triton_rps", ",.0f"),
                               ("gpserve_rps", ",.0f"), ("ratio", ".2f"),
                               ("triton_p50_ms", ".2f"), ("gp_p50_ms", ".2f"),
                               ("errors", "d")])
    if "shm" in parts:
        results["shm"] = rows = shared_memory(args.seconds)
        print("\nfloat32 [8,224,224,3] (4.8 MB) through echo, one local tritonclient; "
              "target shared memory >= 3x binary")
        print_table(rows, [("path", ""), ("requests", "d"), ("rps", ".1f"),
                           ("MBps", ",.0f"), ("ms", ".1f"), ("ratio", ".2f")])
    write_json(args.json, [], **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
