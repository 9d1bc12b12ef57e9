"""Row-cache benchmark: the same runs with the cache off and on, side by side in one run.

For the OCR text-direction classifier and MiniLM (sequence length 32), 16 concurrent
clients send single-row requests whose rows are 100%, 50% or 0% repeated (a repeated
row comes from a small pool sent once before timing; a new row has a counter written
into its data). Load: wrk with ``perf/rows.lua`` (or aiohttp when wrk is missing).
Reported: rows/s, p50/p99, and the per-row cost of hashing a row and of an LMDB lookup
(measured in-process), and of the row checksum each hit verifies (within the lookup).
The echo model under the same 100%-repeated load is the
"trivial model" a cache hit is compared with.

The floor under a hit: the same body read by a raw ASGI app on the same uvicorn,
answering three floats (``comparators.rows_floor_app``).

Targets: with 100% repeated rows, >= 10x the uncached rows/s of the OCR classifier,
>= 0.9x the echo model's requests/s and >= 0.8x the floor's; with 0% repeated rows,
>= 0.95x the rows/s with the cache off (off and on alternating, three runs each).

The shared tier (Redis) next to replicas with their own LMDB: ``perf/cache_shared.py``
(``--parts shared``).

    python perf/cache.py [--quick] [--json FILE] [--png FILE] [--parts local,shared]
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import (  # noqa: E402
    Process,
    bar_chart,
    exit_cleanly_on_sigterm,
    free_port,
    print_table,
    uvicorn_argv,
    write_json,
)

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
CLIENTS = 16
POOL = 64


def row_factory(name: str):
    rng = np.random.default_rng(0)
    if name == "ocr-cls":
        return lambda: [rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)], ["x"]
    return (lambda: [rng.integers(1000, 5000, (1, 32), dtype=np.int64),
                     np.ones((1, 32), np.int64), np.zeros((1, 32), np.int64)],
            ["input_ids", "attention_mask", "token_type_ids"])


ALTERNATIONS = 3          # off/on pairs at 0% repeated, alternating


def run_rows(url: str, bodies: "Bodies", seconds: float, repeats: int) -> dict:
    """wrk with perf/rows.lua: the same share of repeated rows, generated in C speed."""
    import re
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        pool, template = Path(tmp) / "pool.bin", Path(tmp) / "template.bin"
        pool.write_bytes(b"".join(b"%08d" % len(b) + b for b in bodies.pool))
        template.write_bytes(bytes(bodies.template))
        args = [str(pool), str(template), str(bodies.at), str(bodies.repeated),
                "ids" if bodies.ids else "raw"]
        runs = []
        for i in range(repeats + 1):                      # the first is a warm-up
            start = str(random.randrange(1, 60_000_000_000))   # new rows never seen before
            out = subprocess.run(
                ["wrk", "-t1", f"-c{CLIENTS}", f"-d{1 if i == 0 else round(seconds)}s",
                 "--timeout", "60s", "-s", str(Path(__file__).parent / "rows.lua"), url, "--",
                 *args, start], capture_output=True, text=True, timeout=seconds + 120)
            line = next(t for t in out.stdout.splitlines() if t.startswith("RESULT "))
            f = dict(re.findall(r"(\w+)=([\d.]+)", line))
            if i:
                runs.append({"engine": "wrk", "rps": float(f["rps"]), "p50_ms": float(f["p50_ms"]),
                             "p99_ms": float(f["p99_ms"]),
                             "errors": int(f["non2xx"]) + int(f["errors"])})
        return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


class Bodies:
    """Request bodies with a given share of repeated rows."""

    def __init__(self, make, names, repeated: float):
        self.pool = [bytes(P.encode_request(P.InferRequest(make(), names))) for _ in range(POOL)]
        template = P.encode_request(P.InferRequest(make(), names))
        first = P.decode_request(template).inputs[0]
        self.ids = first.dtype == np.int64            # token ids: stay inside the vocabulary
        self.template = bytearray(template)
        self.at = first.__array_interface__["data"][0] - np.frombuffer(
            template, np.uint8).__array_interface__["data"][0]
        self.repeated = repeated
        self.count = itertools.count()   # across warm-ups and repeats: new rows stay new

    def __call__(self, _request_number: int) -> bytes:
        i = next(self.count)
        if self.repeated >= 1 or (self.repeated > 0 and i % 2 == 0):
            return self.pool[i % POOL]
        body = bytearray(self.template)               # a row never seen: a counter in its data
        if self.ids:
            digits = [1000 + (i // 4000 ** k) % 4000 for k in range(3)]
            body[self.at:self.at + 24] = np.array(digits, np.int64).tobytes()
        else:
            body[self.at:self.at + 8] = (i + 1 + (os.getpid() << 40)).to_bytes(8, "little")
        return bytes(body)


def per_row_costs(make, names, tmp: Path) -> dict:
    from gpserve.cache.keys import row_keys
    from gpserve.cache.store import RowCache
    from gpserve.cache.values import seal, unseal

    from gpserve.counters import Counters
    tensors = make()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        keys = row_keys("f" * 64, "", names, tensors)
    hash_us = (time.perf_counter() - t0) / n * 1e6
    tmp.mkdir(parents=True, exist_ok=True)
    counters = Counters(str(tmp / "counters"), create=True)
    cache = RowCache(tmp / "env", 64, counters, 0)
    out = [np.zeros((1, 384), np.float32)]
    cache.store(keys, ["out"], out)
    cache.flush()
    time.sleep(0.2)
    t0 = time.perf_counter()
    for _ in range(n):
        cache.lookup(keys, ["out"])
    lookup_us = (time.perf_counter() - t0) / n * 1e6
    # the row checksum alone, on a value of the same size: the part of a hit it costs
    value = seal(P.encode_request(P.InferRequest(out, ["out"], (), "gpserve-row-v1")))
    t0 = time.perf_counter()
    for _ in range(n):
        unseal(value)
    checksum_us = (time.perf_counter() - t0) / n * 1e6
    return {"hash_us_per_row": hash_us, "lookup_us_per_row": lookup_us,
            "checksum_us_per_hit": checksum_us}


def _floor(body: bytes, workers: int, secs: float, reps: int) -> dict:
    """The floor under a cache hit: the same body read by a raw ASGI app on the same
    uvicorn, with as many processes as gpserve's fronts, answering three floats."""
    port = free_port()
    floor = Process(uvicorn_argv("comparators:rows_floor_app", port, workers),
                    f"http://127.0.0.1:{port}/", b"")
    try:
        rep = loadgen.run(f"http://127.0.0.1:{port}/", body, CLIENTS, secs, repeats=reps)
    finally:
        floor.stop()
    print(f"  the HTTP floor with the same body: {rep['rps']:.0f} requests/s", flush=True)
    return {"model": "floor", "cache": "-", "repeated": "100%", "rows_s": rep["rps"],
            "p50_ms": rep["p50_ms"], "p99_ms": rep["p99_ms"], "engine": rep["engine"],
            "errors": rep["errors"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--png", metavar="FILE", default="perf/results/cache.png")
    ap.add_argument("--parts", default="local,shared",
                    help="local: the LMDB cache off and on; shared: the Redis tier "
                         "(perf/cache_shared.py)")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    if "shared" in args.parts.split(","):
        import cache_shared
        cache_shared.main(["--rows", "300" if args.quick else "800"])
    if "local" not in args.parts.split(","):
        return 0
    if not MODELS.exists():
        print(f"skipped: {MODELS} is absent (this benchmark needs ../shared/models)")
        return 0
    secs = 4 if args.quick else 10
    reps = 1 if args.quick else 3
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        minilm = tmp / "minilm.onnx"
        minilm.write_bytes(gzip.decompress((MODELS / "all-MiniLM-L6-v2_int8.onnx.gz").read_bytes()))
        models = {"ocr-cls": MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "minilm": minilm}
        for name, path in models.items():
            make, names = row_factory(name)
            costs[name] = per_row_costs(make, names, tmp / f"costs-{name}")
            print(f"  {name}: hashing {costs[name]['hash_us_per_row']:.1f} us/row, "
                  f"LMDB lookup {costs[name]['lookup_us_per_row']:.1f} us/row", flush=True)
            # Both servers stay up; each share is measured off, then on, back to back, so
            # that the machine's drift between runs does not land on the ratio. The echo
            # model takes the OCR body right after the OCR hits, for the same reason.
            with Server("--model", str(path)) as off, Server(
                    "--model", str(path), "--cache",
                    "--cache-dir", str(tmp / f"rows-{name}")) as on:
                for share in (1.0, 0.5, 0.0):
                    bodies = Bodies(make, names, share)
                    # 0% repeated: the cache's whole cost, a few percent; off and on
                    # alternate (ALTERNATIONS each, the median kept) so drift cancels out
                    turns = ALTERNATIONS if share == 0.0 else 1
                    runs: dict[str, list] = {"off": [], "on": []}
                    for cache, s in [c for _ in range(turns) for c in (("off", off),
                                                                       ("on", on))]:
                        if share > 0:              # the repeated rows are seen once first
                            pool = bodies.pool
                            loadgen.run(s.url + "/", pool[0] if share == 1.0 else
                                        (lambda i, pool=pool: pool[i % POOL]), CLIENTS, 1.0,
                                        warmup_s=0)
                        load = bodies.pool[0] if share == 1.0 else bodies
                        each = 1 if turns > 1 else reps
                        runs[cache].append(run_rows(s.url + "/", bodies, secs, each)
                                           if loadgen.wrk_available() else
                                           loadgen.run(s.url + "/", load, CLIENTS, secs,
                                                       repeats=each))
                    for cache in ("off", "on"):
                        rep = sorted(runs[cache], key=lambda r: r["rps"])[turns // 2]
                        rows.append({"model": name, "cache": cache, "repeated": f"{share:.0%}",
                                     "rows_s": rep["rps"], "p50_ms": rep["p50_ms"],
                                     "p99_ms": rep["p99_ms"], "engine": rep["engine"],
                                     "errors": rep["errors"]})
                        print(f"  {name} cache {cache} repeated {share:.0%}: {rep['rps']:.0f} "
                              f"rows/s ({rep['engine']})", flush=True)
                    if name == "ocr-cls" and share == 1.0:
                        with Server("--model", "echo") as echo:
                            rep = loadgen.run(echo.url + "/", bodies.pool[0], CLIENTS, secs,
                                              repeats=reps)
                        rows.append({"model": "echo", "cache": "-", "repeated": "100%",
                                     "rows_s": rep["rps"], "p50_ms": rep["p50_ms"],
                                     "p99_ms": rep["p99_ms"], "engine": rep["engine"],
                                     "errors": rep["errors"]})
                        print(f"  echo with the same body: {rep['rps']:.0f} requests/s",
                              flush=True)
                        rows.append(_floor(bodies.pool[0], on.info()["processes"]["fronts"],
                                           secs, reps))

    by = {(r["model"], r["cache"], r["repeated"]): r for r in rows}
    print(f"\n{CLIENTS} concurrent clients, single-row requests")
    print_table(rows, [("model", ""), ("cache", ""), ("repeated", ""), ("rows_s", ".0f"),
                       ("p50_ms", ".2f"), ("p99_ms", ".2f"), ("engine", "")])
    print("\nPer-row cost, in-process")
    print_table([{"model": m, **c} for m, c in costs.items()],
                [("model", ""), ("hash_us_per_row", ".1f"), ("lookup_us_per_row", ".1f"),
                 ("checksum_us_per_hit", ".2f")])
    t = []
    r = by["ocr-cls", "on", "100%"]["rows_s"] / by["ocr-cls", "off", "100%"]["rows_s"]
    t.append(("ocr-cls 100% repeated: on / off", r, ">= 10", r >= 10))
    r = by["ocr-cls", "on", "100%"]["rows_s"] / by["echo", "-", "100%"]["rows_s"]
    t.append(("ocr-cls 100% repeated hits / echo req/s", r, ">= 0.9", r >= 0.9))
    r = by["ocr-cls", "on", "100%"]["rows_s"] / by["floor", "-", "100%"]["rows_s"]
    t.append(("ocr-cls 100% repeated hits / HTTP floor req/s", r, ">= 0.8", r >= 0.8))
    for m in ("ocr-cls", "minilm"):
        r = by[m, "on", "0%"]["rows_s"] / by[m, "off", "0%"]["rows_s"]
        t.append((f"{m} 0% repeated: on / off", r, ">= 0.95", r >= 0.95))
        r = by[m, "on", "50%"]["rows_s"] / by[m, "off", "50%"]["rows_s"]
        t.append((f"{m} 50% repeated: on / off", r, "-", True))
    print("\nTargets")
    print_table([{"ratio": a, "value": v, "goal": g, "met": ("yes" if ok else "NO") if g != "-"
                  else ""} for a, v, g, ok in t],
                [("ratio", ""), ("value", ".2f"), ("goal", ""), ("met", "")])
    write_json(args.json, rows, per_row_costs=costs,
               targets=[{"ratio": a, "value": v, "goal": g, "met": ok} for a, v, g, ok in t])
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        labels = [f"{m} {p}" for m in ("ocr-cls", "minilm") for p in ("100%", "50%", "0%")]
        series = {f"cache {c}": [by[t.split()[0], c, t.split()[1]]["rows_s"] for t in labels]
                  for c in ("off", "on")}
        bar_chart(args.png, "Single-row requests, 16 clients: rows/s by share of repeated rows",
                  labels, series, "rows/s", log=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
