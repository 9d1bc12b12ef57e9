"""Serialization benchmark: gpserve's codec next to graphpipe 1.0.4, TF Serving protobuf,
ujson, orjson and a plain memcpy, side by side in one run.

Messages: request float32 [128,224,224,3] (19.3M floats, 77 MB), response float32
[128,7,7,512] (12.8 MB), and a small float32 [1,16] request for per-message overhead.
Each codec is timed on encode and decode (median of runs, wall and process CPU), each
round trip is checked for equality outside the timed region, and every time is also
shown as a ratio to gpserve's. Codecs whose package is missing are skipped with a note.

graphpipe 1.0.4 needs flatbuffers 1.x; the benchmark runs it from an isolated folder
(``--graphpipe-path``, default: the tests' cache, installed there on first use).

    python perf/codec.py [--quick] [--json FILE] [--png FILE]
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    bar_chart,
    exit_cleanly_on_sigterm,
    print_table,
    timed,
    write_json,
)

from gpserve import protocol as P  # noqa: E402

REQ_SHAPE, RESP_SHAPE, SMALL_SHAPE = (128, 224, 224, 3), (128, 7, 7, 512), (1, 16)
DEFAULT_GP = Path.home() / ".cache" / "gpserve-tests" / "graphpipe-1.0.4"


def load_graphpipe(path: Path):
    """Import graphpipe 1.0.4 with its flatbuffers 1.12, isolated from the project's."""
    if not (path / "graphpipe").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(path), "graphpipe==1.0.4", "flatbuffers==1.12"], check=True)
    saved = {k: v for k, v in sys.modules.items() if k == "flatbuffers" or
             k.startswith("flatbuffers.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(path))
    try:
        convert = importlib.import_module("graphpipe.convert")
    finally:
        sys.path.remove(str(path))
    return convert


def codec_gpserve():
    return (lambda a: P.encode_request(P.InferRequest([a], ["input"], ["output"])),
            lambda b: P.decode_request(b).inputs[0],
            lambda a: P.encode_response(P.InferResponse([a])),
            lambda b: P.decode_response(b).outputs[0])


def codec_graphpipe(convert):
    return (lambda a: convert.serialize_infer_request(
                convert.InferReq("", [a], ["input"], ["output"])),
            lambda b: convert.deserialize_request(b).input_tensors[0],
            lambda a: convert.serialize_infer_response([a]),
            lambda b: convert.deserialize_infer_response(b)[0][0])


def codec_tfs_proto():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    def ser(cls, key):
        def f(a):
            r = cls()
            r.model_spec.name = "model"
            getattr(r, key)["x"].CopyFrom(tf.make_tensor_proto(a))
            return r.SerializeToString()
        return f

    def de(cls, key):
        def f(b):
            r = cls()
            r.ParseFromString(b)
            return tf.make_ndarray(getattr(r, key)["x"])
        return f
    return (ser(predict_pb2.PredictRequest, "inputs"), de(predict_pb2.PredictRequest, "inputs"),
            ser(predict_pb2.PredictResponse, "outputs"),
            de(predict_pb2.PredictResponse, "outputs"))


def codec_json(module: str):
    lib = importlib.import_module(module)
    if module == "orjson":
        dumps = lambda key: lambda a: lib.dumps({key: a}, option=lib.OPT_SERIALIZE_NUMPY)
    else:
        dumps = lambda key: lambda a: lib.dumps({key: a.tolist()})
    loads = lambda key: lambda b: np.asarray(lib.loads(b)[key], dtype=np.float32)
    return dumps("instances"), loads("instances"), dumps("predictions"), loads("predictions")


def memcpy_codec():
    """The physical floor of an encoder: a fresh output buffer (numpy's, as the encoder
    uses, so page faults cost the same: huge pages where the kernel grants them) and one
    copy into it. A warm, reused buffer would hide the page faults every real response
    pays, and made the ratio depend on the machine's transparent-huge-page setting."""
    def enc(a):
        out = np.empty(a.shape, a.dtype)
        np.copyto(out, a)
        return out
    return enc, lambda b: b, enc, lambda b: b


def measure(name, codec, arrays, runs, only_small=False):
    enc_req, dec_req, enc_resp, dec_resp = codec
    rows = []
    for label, arr, enc, dec in (("request", arrays["request"], enc_req, dec_req),
                                 ("response", arrays["response"], enc_resp, dec_resp),
                                 ("small", arrays["small"], enc_req, dec_req)):
        if only_small and label != "small":
            continue
        n = runs if label != "small" else 1
        inner = 1 if label != "small" else 2000
        gc.collect()
        body = enc(arr)
        ok = bool(np.array_equal(np.asarray(dec(body), dtype=arr.dtype).reshape(arr.shape), arr))
        size = len(body) if hasattr(body, "__len__") and not isinstance(body, np.ndarray) \
            else arr.nbytes
        loop_enc = (lambda enc=enc, arr=arr: enc(arr)) if inner == 1 else (
            lambda enc=enc, arr=arr, inner=inner: [enc(arr) for _ in range(inner)])
        loop_dec = (lambda dec=dec, body=body: dec(body)) if inner == 1 else (
            lambda dec=dec, body=body, inner=inner: [dec(body) for _ in range(inner)])
        ew, ec = timed(loop_enc, n if inner == 1 else 5)
        dw, dc = timed(loop_dec, n if inner == 1 else 5)
        rows.append({"message": label, "codec": name, "enc_wall_s": ew / inner,
                     "enc_cpu_s": ec / inner, "dec_wall_s": dw / inner,
                     "dec_cpu_s": dc / inner, "bytes": size, "ok": ok})
        body = None  # free it before the next message
        print(f"  {name:12s} {label:8s} enc {ec / inner:.6f}s dec {dc / inner:.6f}s "
              f"{'ok' if ok else 'MISMATCH'}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs, no JSON codecs")
    ap.add_argument("--json", metavar="FILE", help="write the table as JSON rows")
    ap.add_argument("--png", metavar="FILE", default="perf/results/codec.png")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--graphpipe-path", type=Path, default=DEFAULT_GP)
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    runs = args.runs or (3 if args.quick else 7)

    rng = np.random.default_rng(0)
    arrays = {"request": rng.random(REQ_SHAPE, dtype=np.float32),
              "response": rng.random(RESP_SHAPE, dtype=np.float32),
              "small": rng.random(SMALL_SHAPE, dtype=np.float32)}
    codecs = [("memcpy", memcpy_codec),
              ("gpserve", codec_gpserve),
              ("graphpipe", lambda: codec_graphpipe(load_graphpipe(args.graphpipe_path))),
              ("tfs-proto", codec_tfs_proto)]
    if not args.quick:
        codecs += [("orjson", lambda: codec_json("orjson")), ("ujson", lambda: codec_json("ujson"))]

    rows = []
    for name, factory in codecs:
        try:
            codec = factory()
        except ImportError as e:
            print(f"[skip] {name}: {e}", flush=True)
            continue
        json_runs = 1 if name in ("orjson", "ujson") else runs
        rows += measure(name, codec, arrays, json_runs)

    ref = {(r["message"]): r for r in rows if r["codec"] == "gpserve"}
    for r in rows:
        g = ref[r["message"]]
        r["enc_x_gpserve"] = r["enc_cpu_s"] / g["enc_cpu_s"]
        r["dec_x_gpserve"] = r["dec_cpu_s"] / g["dec_cpu_s"] if g["dec_cpu_s"] > 0 else float("nan")
    print("\nProcess CPU seconds per message, median; ratios are this codec / gpserve")
    print_table(rows, [("message", ""), ("codec", ""), ("enc_cpu_s", ".6f"),
                       ("dec_cpu_s", ".6f"), ("enc_wall_s", ".6f"), ("dec_wall_s", ".6f"),
                       ("enc_x_gpserve", ".2f"), ("dec_x_gpserve", ".2f"), ("ok", "")])

    by = {(r["message"], r["codec"]): r for r in rows}
    targets = []
    if ("request", "memcpy") in by:
        ratio = by["request", "gpserve"]["enc_cpu_s"] / by["request", "memcpy"]["enc_cpu_s"]
        targets.append(("request encode / memcpy floor", ratio, "<= 1.5", ratio <= 1.5))
    dec = max(by["request", "gpserve"]["dec_cpu_s"], by["response", "gpserve"]["dec_cpu_s"])
    targets.append(("largest decode, ms", dec * 1e3, "< 0.1", dec < 1e-4))
    if ("small", "graphpipe") in by:
        g, o = by["small", "graphpipe"], by["small", "gpserve"]
        ratio = (o["enc_cpu_s"] + o["dec_cpu_s"]) / (g["enc_cpu_s"] + g["dec_cpu_s"])
        targets.append(("small enc+dec / graphpipe", ratio, "<= 0.5", ratio <= 0.5))
    print("\nTargets")
    print_table([{"target": t, "value": v, "goal": g, "met": "yes" if m else "NO"}
                 for t, v, g, m in targets],
                [("target", ""), ("value", ".3f"), ("goal", ""), ("met", "")])

    write_json(args.json, rows, targets=[{"target": t, "value": v, "goal": g, "met": m}
                                         for t, v, g, m in targets])
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        names = sorted({r["codec"] for r in rows}, key=[c for c, _ in codecs].index)
        labels = [f"{m} {d}" for m in ("request", "response") for d in ("enc", "dec")]
        series = {n: [by[m, n][f"{d}_cpu_s"] for m in ("request", "response")
                      for d in ("enc", "dec")] for n in names}
        bar_chart(args.png, "GraphPipe codec: process CPU seconds per message (log scale)",
                  labels, series, "seconds", log=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
