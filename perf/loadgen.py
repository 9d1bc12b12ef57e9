"""Load generator: POST one body again and again at a fixed concurrency, report requests/s,
p50/p99 latency and payload MB/s.

Two engines with the same report: ``wrk`` (C; used when installed, with the shared
``post_body.lua`` script) costs the 2-core machine least; ``async`` (aiohttp, closed
loop, one connection per client) works anywhere.

    python perf/loadgen.py http://127.0.0.1:9000/ --shape 1x16 -c 16 -d 10
    python perf/loadgen.py http://127.0.0.1:9000/ --body request.bin -c 64 --engine async
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_seconds, process_tree

# ../shared/load/post_body.lua, or where POST_BODY_LUA says (a host without ../shared)
SHARED_LUA = Path(os.environ.get("POST_BODY_LUA") or Path(__file__).resolve().parents[1].parent
                  / "shared" / "load" / "post_body.lua")


def wrk_available() -> bool:
    return shutil.which("wrk") is not None and SHARED_LUA.exists()


def run_wrk(url: str, body: bytes, concurrency: int, seconds: float,
            timeout_s: float = 120, headers: dict | None = None, threads: int = 1,
            server_pid: int | None = None) -> dict:
    """``server_pid``: the report also gives ``cpu_us``, the CPU time per request of that
    process and every process under it (from ``/proc``)."""
    if server_pid is not None:
        pids = process_tree(server_pid)
        used = cpu_seconds(pids)
    with tempfile.NamedTemporaryFile(suffix=".bin") as f, \
            tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        f.write(body)
        f.flush()
        # the shared script, and the request's extra headers (Open Inference Protocol)
        script.write(f"dofile({json.dumps(str(SHARED_LUA))})\n" + "".join(
            f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
            for k, v in (headers or {}).items()))
        script.flush()
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
             "--timeout", f"{int(timeout_s)}s", "-s", script.name, url],
            env={**os.environ, "BODY": f.name}, capture_output=True, text=True,
            timeout=seconds + timeout_s + 30)
    line = next((t for t in out.stdout.splitlines() if t.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    fields = dict(re.findall(r"(\w+)=([\d.]+)", line))
    report = {"engine": "wrk", "concurrency": concurrency, "requests": int(fields["requests"]),
              "seconds": float(fields["secs"]), "rps": float(fields["rps"]),
              "p50_ms": float(fields["p50_ms"]), "p99_ms": float(fields["p99_ms"]),
              "max_ms": float(fields["max_ms"]),
              "req_MBps": float(fields["req_MBps"]), "errors": int(fields["non2xx"]) +
              int(fields["errors"])}
    if server_pid is not None:
        report["cpu_us"] = 1e6 * (cpu_seconds(pids) - used) / max(report["requests"], 1)
    return report


async def _async_load(url: str, body, concurrency: int, seconds: float,
                      timeout_s: float, headers: dict | None = None) -> dict:
    """``body`` is bytes, or a function of the request number returning the body."""
    import aiohttp
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    make = body if callable(body) else (lambda i: body)
    counter = iter(range(1 << 62))

    async def client(session):
        nonlocal errors
        while time.perf_counter() < stop_at:
            data = make(next(counter))
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
            total=timeout_s)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    n = len(latencies)
    return {"engine": "async", "concurrency": concurrency, "requests": n, "seconds": elapsed,
            "rps": n / elapsed, "p50_ms": 1e3 * latencies[n // 2] if n else float("nan"),
            "p99_ms": 1e3 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan"),
            "req_MBps": n * len(make(0)) / elapsed / 1e6, "errors": errors}


def run_async(url: str, body: bytes, concurrency: int, seconds: float,
              timeout_s: float = 120, headers: dict | None = None) -> dict:
    return asyncio.run(_async_load(url, body, concurrency, seconds, timeout_s, headers))


def run(url: str, body, concurrency: int, seconds: float, engine: str = "auto",
        timeout_s: float = 120, repeats: int = 1, warmup_s: float = 1.0,
        headers: dict | None = None) -> dict:
    """Median-of-``repeats`` report (by requests/s) from the chosen engine, after a
    warm-up whose numbers are dropped (first requests fault in shared-memory pages)."""
    use_wrk = not callable(body) and (engine == "wrk" or (engine == "auto" and wrk_available()))
    fn = run_wrk if use_wrk else run_async
    if warmup_s > 0:
        fn(url, body, concurrency, warmup_s, timeout_s, headers)
    reports = [fn(url, body, concurrency, seconds, timeout_s, headers)
               for _ in range(repeats)]
    return sorted(reports, key=lambda r: r["rps"])[len(reports) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--body", type=Path, help="file holding the request body")
    src.add_argument("--shape", help="float32 tensor shape for an echo body, e.g. 1x16")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-d", "--seconds", type=float, default=10)
    ap.add_argument("--engine", choices=["auto", "wrk", "async"], default="auto")
    args = ap.parse_args(argv)
    if args.body:
        body = args.body.read_bytes()
    else:
        import numpy as np

        from gpserve import protocol as P
        shape = tuple(int(d) for d in args.shape.split("x"))
        body = bytes(P.encode_request(P.InferRequest(
            [np.random.default_rng(0).random(shape, dtype=np.float32)])))
    print(json.dumps(run(args.url, body, args.concurrency, args.seconds, args.engine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
