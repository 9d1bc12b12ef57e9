"""Soak: a few minutes of moderate load with the row cache rotating, sampling what a leak
would grow. The pass is *flat or bounded*, not a speed.

The server serves a model this script builds (y = 2x, float32 [N,4096]: 16 KiB rows) with
``--cache --cache-size-mb 8``, so the cache's generations rotate every few seconds.
Clients send 4-row requests, half of the rows new and half seen recently, and a few
malformed bodies (answered 400, which must not leak either). Every ``--every`` seconds it
samples the server's processes (supervisor and children): resident memory, open file
descriptors, the run's ``/dev/shm`` bytes, and the cache's entries, file size, hits,
writes, rotations and errors.

Pass: after the first third (warm-up), resident memory, descriptors and shared memory stay
within a small margin of their warm-up peak; the cache file stays under its bound; the
cache keeps writing and hitting to the end; no cache error; every request answered.

    python perf/soak.py [--seconds 180] [--every 5] [--clients 8] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_cleanly_on_sigterm, print_table, write_json  # noqa: E402

from gpserve.client import Client  # noqa: E402
from gpserve.errors import GraphPipeError  # noqa: E402
from gpserve.testing import Server  # noqa: E402

WIDTH = 4096
CACHE_MB = 8


def build_model(path: Path) -> Path:
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])], "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
        initializer=[helper.make_tensor("k", TensorProto.FLOAT, [], [2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return pids


def sample(server: Server, started: float, counts: dict) -> dict:
    rss = fds = 0
    for pid in process_tree(server.proc.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    shm = 0
    for name in server.segments():
        path = Path("/dev/shm") / name
        if path.is_file():
            shm += os.stat(path).st_blocks * 512         # pages in use, not the file's size
    cache = server.info()["cache"]
    return {"t_s": time.monotonic() - started, "rss_mb": rss / 2**20, "fds": fds,
            "shm_mb": shm / 2**20, "entries": cache["entries"],
            "cache_file_mb": cache["file_bytes"] / 2**20, "hits": cache["hits"],
            "writes": cache["writes"], "rotations": cache["rotations"],
            "cache_errors": cache["errors"], "requests": counts["ok"],
            "failed": counts["failed"]}


def client_loop(url: str, stop: threading.Event, seed: int, counts: dict, lock) -> None:
    rng = np.random.default_rng(seed)
    recent = [rng.standard_normal(WIDTH).astype(np.float32) for _ in range(64)]
    junk = b"not a graphpipe message"
    with Client(url, timeout=60) as c:
        n = 0
        while not stop.is_set():
            n += 1
            if n % 50 == 0:                              # a malformed body now and then
                ok = False
                try:
                    urllib.request.urlopen(urllib.request.Request(url + "/", data=junk),
                                           timeout=30)
                except urllib.error.HTTPError as e:
                    ok = e.code == 400
                with lock:
                    counts["ok" if ok else "failed"] += 1
                continue
            fresh = [rng.standard_normal(WIDTH).astype(np.float32) for _ in range(2)]
            seen = [recent[i] for i in rng.integers(0, len(recent), 2)]
            x = np.stack(fresh + seen)
            try:
                y = c.execute(x)
                ok = bool(np.array_equal(y, x * 2))
            except GraphPipeError:
                ok = False
            recent[int(rng.integers(0, len(recent)))] = fresh[0]
            with lock:
                counts["ok" if ok else "failed"] += 1


def verdict(samples: list[dict]) -> list[dict]:
    warm = [s for s in samples if s["t_s"] <= samples[-1]["t_s"] / 3] or samples[:1]
    rest = samples[len(warm):] or samples[-1:]
    checks = []

    def bound(name, unit, slack_ratio, slack_abs):
        peak, late = max(s[name] for s in warm), max(s[name] for s in rest)
        limit = peak * slack_ratio + slack_abs
        checks.append({"check": f"{name}: peak after warm-up <= {slack_ratio:g} x warm-up "
                                f"peak + {slack_abs:g}{unit}",
                       "value": f"{late:.1f} vs {peak:.1f}", "met": late <= limit})
    bound("rss_mb", " MB", 1.10, 32)
    bound("fds", "", 1.0, 8)
    bound("shm_mb", " MB", 1.10, 8)
    last, mid = samples[-1], rest[0]
    checks.append({"check": f"cache file <= --cache-size-mb {CACHE_MB}",
                   "value": f"{max(s['cache_file_mb'] for s in samples):.2f} MB",
                   "met": all(s["cache_file_mb"] <= CACHE_MB for s in samples)})
    checks.append({"check": "the cache still writes and hits after warm-up",
                   "value": f"+{last['writes'] - mid['writes']} writes, "
                            f"+{last['hits'] - mid['hits']} hits",
                   "met": last["writes"] > mid["writes"] and last["hits"] > mid["hits"]})
    checks.append({"check": "the cache rotated", "value": str(last["rotations"]),
                   "met": last["rotations"] >= 2})
    checks.append({"check": "no cache error, no failed request",
                   "value": f"{last['cache_errors']} errors, {last['failed']} failed",
                   "met": last["cache_errors"] == 0 and last["failed"] == 0})
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--every", type=float, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "double.onnx")
        server = Server("--model", str(model), "--cache", "--cache-dir", f"{tmp}/rows",
                        "--cache-size-mb", str(CACHE_MB))
        counts, lock, stop = {"ok": 0, "failed": 0}, threading.Lock(), threading.Event()
        threads = [threading.Thread(target=client_loop,
                                    args=(server.url, stop, i, counts, lock))
                   for i in range(args.clients)]
        samples = []
        try:
            started = time.monotonic()
            for t in threads:
                t.start()
            while time.monotonic() - started < args.seconds:
                time.sleep(args.every)
                samples.append(sample(server, started, counts))
                s = samples[-1]
                print(f"  {s['t_s']:6.1f}s rss {s['rss_mb']:7.1f} MB  fds {s['fds']:4d}  "
                      f"shm {s['shm_mb']:6.1f} MB  cache {s['entries']:5d} rows "
                      f"{s['cache_file_mb']:5.2f} MB  rotations {s['rotations']:3d}  "
                      f"requests {s['requests']}", flush=True)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            server.stop()
    print()
    print_table(samples, [("t_s", ".0f"), ("rss_mb", ".1f"), ("fds", "d"), ("shm_mb", ".1f"),
                          ("entries", "d"), ("cache_file_mb", ".2f"), ("hits", "d"),
                          ("writes", "d"), ("rotations", "d"), ("cache_errors", "d"),
                          ("requests", "d"), ("failed", "d")])
    checks = verdict(samples)
    print()
    print_table([{**c, "met": "yes" if c["met"] else "NO"} for c in checks],
                [("check", ""), ("value", ""), ("met", "")])
    write_json(args.json, samples, checks=checks)
    return 0 if all(c["met"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
