"""The row cache's shared tier (Redis) next to replicas with their own LMDB only, side
by side in one run (``perf/cache.py --parts shared`` runs it; it needs redis-server).

Two replicas of the OCR text-direction classifier (the project's default model without
../shared), each with its own LMDB cache. A workload whose repeated rows are spread over
both: ``--rows`` distinct single-row requests go to replica A (16 clients), then the
same rows to replica B. Once with no shared tier, once with both replicas sharing one
redis-server. Reported: model rows computed in all (goal: each distinct row once across
the replicas), B's hit rate and rows/s; the latency (p50, one client) of an LMDB hit, a
shared-tier hit and a model run; and with rows never seen (0% repeated: wrk with
``perf/rows.lua``, 4 s a run, on and off alternating three times), rows/s with the
shared tier on over off (goal: >= 0.95).

    python perf/cache_shared.py [--rows 800] [--timeout-ms 10] [--json FILE]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import exit_cleanly_on_sigterm, free_port, print_table, write_json  # noqa: E402

import cache  # noqa: E402
from gpserve.client import Client  # noqa: E402
from gpserve.testing import Server, eventually  # noqa: E402

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
CLIENTS = 16
ZERO_S = 4                   # seconds of each 0%-repeated run (wrk: a steady stream)


def model_and_rows(folder: Path, count: int, seed: int):
    """(model path, input name, ``count`` distinct single-row inputs)."""
    rng = np.random.default_rng(seed)
    cls = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if cls.exists():
        return cls, "x", [rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
                          for _ in range(count)]
    from gpserve.workers.default_model import ensure
    return (ensure(folder / "spirals.onnx"), "point",
            [rng.uniform(-1, 1, (1, 2)).astype(np.float32) for _ in range(count)])


def send(url: str, name: str, rows: list[np.ndarray], clients: int = CLIENTS) -> float:
    """Every row once, ``clients`` at a time; rows/s."""
    def run(part):
        with Client(url) as c:
            for x in part:
                c.execute_multi([x], [name])
    threads = [threading.Thread(target=run, args=(rows[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(rows) / (time.perf_counter() - started)


def p50_ms(url: str, name: str, rows: list[np.ndarray]) -> float:
    took = []
    with Client(url) as c:
        for x in rows:
            started = time.perf_counter()
            c.execute_multi([x], [name])
            took.append((time.perf_counter() - started) * 1e3)
    return statistics.median(took)


TIMEOUT_MS = ["10"]          # --cache-shared-timeout-ms, from --timeout-ms


def replica(model: Path, tmp: Path, tag: str, shared: str | None) -> Server:
    extra = ["--cache-shared", shared, "--cache-shared-timeout-ms", TIMEOUT_MS[0]] \
        if shared else []
    return Server("--model", str(model), "--fronts", "1", "--cache", "--cache-dir",
                  str(tmp / tag), *extra)


def replicas(model: Path, tmp: Path, tag: str, shared: str | None):
    return replica(model, tmp, f"{tag}-a", shared), replica(model, tmp, f"{tag}-b", shared)


def setup_run(model, name, rows, tmp, tag, shared) -> dict:
    a, b = replicas(model, tmp, tag, shared)
    try:
        send(a.url, name, rows)
        if shared:              # A's writes reach Redis from its writer thread
            eventually(lambda: a.info()["cache"]["writes"] >= len(rows), 60, "A's writes")
        b_rps = send(b.url, name, rows)
        cache_b = b.info()["cache"]
        hits = cache_b["hits"] + cache_b.get("shared_hits", 0)
        return {"setup": tag, "rows": len(rows),
                "computed": a.rows_computed() + b.rows_computed(),
                "b_hit_rate": hits / len(rows), "b_rows_s": b_rps}
    finally:
        a.stop()
        b.stop()


def main(argv=None) -> int:
    exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=800)
    ap.add_argument("--timeout-ms", default="10", help="--cache-shared-timeout-ms")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    TIMEOUT_MS[0] = args.timeout_ms
    binary = shutil.which("redis-server")
    if binary is None:
        print("[skip] needs redis-server (apt-get install redis-server)")
        return 0
    port = free_port()
    redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save",
                              "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            model, name, rows = model_and_rows(tmp, args.rows, seed=1)
            runs = [setup_run(model, name, rows, tmp, "own LMDB each", None),
                    setup_run(model, name, rows, tmp, "shared Redis", url)]
            costs, overhead = measure_costs(model, name, tmp, url)
    finally:
        redis.terminate()
        redis.wait(10)
    print(f"\n{args.rows} distinct rows to replica A, then to replica B ({CLIENTS} clients; "
          f"--cache-shared-timeout-ms {args.timeout_ms})")
    print_table(runs, [("setup", ""), ("rows", "d"), ("computed", "d"), ("b_hit_rate", ".2f"),
                       ("b_rows_s", ".0f")])
    print("\nOne request of one row, one client: p50")
    print_table(costs, [("answered by", ""), ("p50_ms", ".3f")])
    once = runs[1]["computed"] == args.rows
    print(f"\ntargets:\n  each distinct row computed once across the replicas: "
          f"{runs[1]['computed']} of {args.rows} ({'met' if once else 'not met'})")
    print(f"  0% repeated, shared tier on / off: {overhead:.2f}x  "
          f"(>= 0.95: {'met' if overhead >= 0.95 else 'not met'})")
    write_json(args.json, runs, costs=costs, overhead=overhead)
    return 0


def measure_costs(model, name, tmp: Path, url: str) -> tuple[list[dict], float]:
    """p50 of an LMDB hit, a shared hit and a model run; and rows/s with rows never seen,
    the shared tier on over off (alternated, 3 each)."""
    _, _, fresh = model_and_rows(tmp, 600, seed=2)
    a, b = replicas(model, tmp, "costs", url)
    try:
        miss = p50_ms(a.url, name, fresh[:200])                 # computed (and stored)
        eventually(lambda: a.info()["cache"]["writes"] >= 200, 60, "A's writes")
        shared_hit = p50_ms(b.url, name, fresh[:200])           # B: from Redis
        local_hit = p50_ms(b.url, name, fresh[:200])            # B: now from its LMDB
    finally:
        a.stop()
        b.stop()
    on, off = replica(model, tmp, "overhead-on", url), replica(model, tmp, "overhead-off",
                                                               None)
    try:
        ratios = []
        for i in range(3):
            if loadgen.wrk_available():        # a steady stream of new rows, in C
                bodies = cache.Bodies(lambda: [fresh[0]], [name], 0.0)
                ratios.append(cache.run_rows(on.url + "/", bodies, ZERO_S, 1)["rps"]
                              / cache.run_rows(off.url + "/", bodies, ZERO_S, 1)["rps"])
                continue
            part = fresh[200 + i * 130:200 + (i + 1) * 130]
            new = [x + 10 + i for x in part]                  # never seen by either
            ratios.append(send(on.url, name, new) / send(off.url, name, [x + 20 for x in new]))
    finally:
        on.stop()
        off.stop()
    return ([{"answered by": "LMDB (local)", "p50_ms": local_hit},
             {"answered by": "Redis (shared)", "p50_ms": shared_hit},
             {"answered by": "the model", "p50_ms": miss}], statistics.median(ratios))


if __name__ == "__main__":
    sys.exit(main())
