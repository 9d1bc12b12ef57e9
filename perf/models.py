"""Several models on one server next to one server per model, side by side in one run.

The models: the project's default model (8 rows a request), and with ../shared the OCR
text-direction classifier (1 row, [3,48,192]) and MiniLM (1 row, 32 tokens). Each model
gets its own load at once (``-c`` clients each, wrk or aiohttp, GraphPipe by URL), first
on one server serving them all from a repository folder (``--model-repository``), then
on one server per model (``--model``), alternating, ``--repeats`` times. Both with the
machine's default fronts.

Reported per model: rows/s and p50/p99 under that shared load; and each setup's memory
in all (proportional set size of every process, shared memory included, read from
/proc/PID/smaps_rollup while loaded). Targets: one server serves each model at >= 0.9x
the rows/s of its own server, in <= 1.0x the memory of the separate servers.

    python perf/models.py [--quick] [--seconds 5] [--repeats 2] [--clients 8] [--json FILE]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from _common import exit_cleanly_on_sigterm, print_table, write_json  # noqa: E402

from gpserve import protocol as P  # noqa: E402
from gpserve.testing import Server  # noqa: E402

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


def models(folder: Path) -> dict[str, tuple[Path, bytes, int]]:
    """name -> (model file, a request body, rows in it)."""
    from gpserve.workers.default_model import ensure
    rng = np.random.default_rng(0)
    out = {"spirals": (ensure(folder / "spirals.onnx"), [rng.uniform(
        -1, 1, (8, 2)).astype(np.float32)], [])}
    cls = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if cls.exists():
        out["ocr"] = (cls, [rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)], ["x"])
        out["minilm"] = (MODELS / "all-MiniLM-L6-v2_int8.onnx.gz",
                         [rng.integers(1000, 5000, (1, 32), dtype=np.int64),
                          np.ones((1, 32), np.int64), np.zeros((1, 32), np.int64)],
                         ["input_ids", "attention_mask", "token_type_ids"])
    else:
        print(f"{cls} is absent: the default model alone (../shared has the others)")
    return {name: (path, bytes(P.encode_request(P.InferRequest(inputs, names))),
                   len(inputs[0])) for name, (path, inputs, names) in out.items()}


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of these processes, in MB (shared pages split among them)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in text.splitlines()
                      if line.startswith("Pss:"))
    return total / 1024


def loaded(urls: dict[str, str], bodies: dict, servers: list[Server], clients: int,
           seconds: float) -> tuple[dict[str, dict], float]:
    """Every model under load at once: each one's report, and memory in all."""
    reports: dict[str, dict] = {}

    def run(name):
        reports[name] = loadgen.run(urls[name], bodies[name][1], clients, seconds,
                                    warmup_s=1.0)
    threads = [threading.Thread(target=run, args=(name,)) for name in urls]
    for t in threads:
        t.start()
    threads[0].join(seconds / 2 + 1.0)                     # mid-run (after the warm-up)
    memory = pss_mb([p for s in servers for p in [s.proc.pid, *s.children()]])
    for t in threads:
        t.join()
    return reports, memory


def main(argv=None) -> int:
    exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8, help="clients per model")
    ap.add_argument("--quick", action="store_true", help="2 s, once")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 2.0, 1
    with tempfile.TemporaryDirectory() as tmp:
        found = models(Path(tmp))
        repo = Path(tmp) / "repository"
        repo.mkdir()
        for name, (path, _, _) in found.items():             # name.onnx, name.onnx.gz
            suffix = ".onnx.gz" if path.name.endswith(".onnx.gz") else path.suffix
            shutil.copyfile(path, repo / f"{name}{suffix}")
        runs: dict[str, list] = {"one server": [], "a server each": []}
        for _ in range(args.repeats):
            with Server("--model-repository", str(repo), "--default-model", "spirals") as s:
                urls = {name: f"{s.url}/models/{name}" for name in found}
                runs["one server"].append(loaded(urls, found, [s], args.clients,
                                                 args.seconds))
            servers = [Server("--model", str(path)) for path, _, _ in found.values()]
            try:
                urls = {name: s.url for name, s in zip(found, servers)}
                runs["a server each"].append(loaded(urls, found, servers, args.clients,
                                                    args.seconds))
            finally:
                for s in servers:
                    s.stop()
    rows = []
    for setup, results in runs.items():
        for name, (_, _, per_request) in found.items():
            reports = [r[name] for r, _ in results]
            rows.append({"setup": setup, "model": name, "rows_s": statistics.median(
                r["rps"] * per_request for r in reports),
                "p50_ms": statistics.median(r["p50_ms"] for r in reports),
                "p99_ms": statistics.median(r["p99_ms"] for r in reports),
                "errors": sum(r["errors"] for r in reports),
                "memory_mb": statistics.median(m for _, m in results)})
    print(f"\n{len(found)} models, {args.clients} clients each, at once; "
          f"median of {args.repeats}")
    print_table(rows, [("setup", ""), ("model", ""), ("rows_s", ".0f"), ("p50_ms", ".2f"),
                       ("p99_ms", ".2f"), ("errors", "d"), ("memory_mb", ".0f")])
    print("\ntargets (one server / a server each):")
    one = {r["model"]: r for r in rows if r["setup"] == "one server"}
    each = {r["model"]: r for r in rows if r["setup"] == "a server each"}
    for name in found:
        ratio = one[name]["rows_s"] / each[name]["rows_s"]
        print(f"  {name} rows/s: {ratio:.2f}x  (>= 0.9: {'met' if ratio >= 0.9 else 'not met'})")
    memory = one[next(iter(found))]["memory_mb"] / each[next(iter(found))]["memory_mb"]
    print(f"  memory in all: {memory:.2f}x  (<= 1.0: {'met' if memory <= 1.0 else 'not met'})")
    write_json(args.json, rows, clients=args.clients, seconds=args.seconds,
               repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
