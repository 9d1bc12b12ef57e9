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

With ``--faults`` the run also meets what an operator's machine does to a server: the
cache file is damaged before the server starts (a first server fills it, then 20 writes
of 16 random bytes land in its data pages, the meta pages left intact), and the model
runs in two workers, one of which is stopped (SIGSTOP) and resumed twice midway: once
for less than ``--hang-timeout-s`` (fronts route around it), once for longer (it is
killed and restarted). A client retries a request answered ``Unavailable`` once, as a
client of a server that restarts a process should; every answer is still checked, so
a wrong row from the damaged cache fails the run.

    python perf/soak.py [--seconds 180] [--every 5] [--clients 8] [--faults] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_cleanly_on_sigterm, print_table, process_tree, write_json  # noqa: E402

from gpserve.client import Client  # noqa: E402
from gpserve.errors import GraphPipeError, Unavailable  # noqa: E402
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


def first_rows(seed: int) -> tuple[np.random.Generator, list[np.ndarray]]:
    """A client's random stream and the rows it starts with as "seen recently"."""
    rng = np.random.default_rng(seed)
    return rng, [rng.standard_normal(WIDTH).astype(np.float32) for _ in range(64)]


def client_loop(url: str, stop: threading.Event, seed: int, counts: dict, lock) -> None:
    rng, recent = first_rows(seed)
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
            ok = False
            for _ in range(2):                   # Unavailable: a process restarted; again
                try:
                    ok = bool(np.array_equal(c.execute(x), x * 2))
                    break
                except Unavailable:
                    with lock:
                        counts["retried"] += 1
                except GraphPipeError:
                    break
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


HANG_S = 4.0                 # --hang-timeout-s with --faults


def damage_cache(cache_dir: Path, seed: int = 20) -> int:
    """20 writes of 16 random bytes into the data pages of every cache file (its two
    meta pages left alone): what a bad disk or a stray write does. Returns the writes."""
    rng, done = np.random.default_rng(seed), 0
    for data in cache_dir.rglob("data.mdb"):
        size = data.stat().st_size
        with open(data, "r+b") as f:
            for _ in range(20):
                f.seek(int(rng.integers(2 * 4096, max(size - 16, 2 * 4096 + 1))))
                f.write(rng.integers(0, 256, 16, dtype=np.uint8).tobytes())
                done += 1
    return done


def fill_cache(model: Path, cache_dir: str, clients: int) -> None:
    """A first server that caches the rows the soak's clients start with (their first
    "seen recently" rows), so that the damaged file is read from the start."""
    with Server("--model", str(model), "--cache", "--cache-dir", cache_dir,
                "--cache-size-mb", str(CACHE_MB)) as server, Client(server.url) as c:
        rows = [row for seed in range(clients) for row in first_rows(seed)[1]]
        for start in range(0, len(rows), 4):
            c.execute(np.stack(rows[start:start + 4]))
        deadline = time.monotonic() + 30               # every row written before the stop
        while server.info()["cache"]["writes"] < len(rows) and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_a_worker(server: Server, seconds: float) -> None:
    """SIGSTOP worker 0 for ``seconds``, then SIGCONT it (if it still lives)."""
    pid = server.info()["processes"]["pids"]["workers"][0]
    print(f"  stopping worker 0 (pid {pid}) for {seconds:g} s", flush=True)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        print("  (it was killed as hung and restarted)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--every", type=float, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--faults", action="store_true",
                    help="damage the cache file first; stop and resume a worker midway")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "double.onnx")
        flags = []
        if args.faults:
            fill_cache(model, f"{tmp}/rows", args.clients)
            print(f"  damaged the cache file: {damage_cache(Path(tmp) / 'rows')} writes of "
                  "16 random bytes into its data pages", flush=True)
            flags = ["--placement", "workers", "--workers", "2",
                     "--hang-timeout-s", str(HANG_S)]
        server = Server("--model", str(model), "--cache", "--cache-dir", f"{tmp}/rows",
                        "--cache-size-mb", str(CACHE_MB), *flags)
        counts, lock, stop = {"ok": 0, "failed": 0, "retried": 0}, threading.Lock(), \
            threading.Event()
        faults = [(args.seconds * 0.45, HANG_S / 2), (args.seconds * 0.6, HANG_S + 3)] \
            if args.faults else []
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
                if faults and time.monotonic() - started >= faults[0][0]:
                    threading.Thread(target=stop_a_worker,
                                     args=(server, faults.pop(0)[1])).start()
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
            faults_seen = (server.stats()["worker_hangs"], server.info()["cache"]["corrupt"])
            server.stop()
    print()
    print_table(samples, [("t_s", ".0f"), ("rss_mb", ".1f"), ("fds", "d"), ("shm_mb", ".1f"),
                          ("entries", "d"), ("cache_file_mb", ".2f"), ("hits", "d"),
                          ("writes", "d"), ("rotations", "d"), ("cache_errors", "d"),
                          ("requests", "d"), ("failed", "d")])
    checks = verdict(samples)
    if args.faults:
        checks.append({"check": "faults: damaged rows caught, the hung worker restarted",
                       "value": f"{faults_seen[1]} corrupt rows, {faults_seen[0]} hangs, "
                                f"{counts['retried']} requests retried",
                       "met": faults_seen[0] == 1})
    print()
    print_table([{**c, "met": "yes" if c["met"] else "NO"} for c in checks],
                [("check", ""), ("value", ""), ("met", "")])
    write_json(args.json, samples, checks=checks)
    return 0 if all(c["met"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
