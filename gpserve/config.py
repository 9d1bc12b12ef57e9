"""One configuration object, built once from flags, ``GP_*`` environment variables and
machine defaults, and handed (pickled) to every process."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from platformdirs import user_cache_dir

CACHE_HOME = Path(user_cache_dir("gpserve"))


@dataclass
class Config:
    model: str = ""                      # path, http(s) URL, "echo", or "" for the default
    listen: str = "127.0.0.1:9000"
    inputs: list[str] = field(default_factory=list)    # default input names, in order
    outputs: list[str] = field(default_factory=list)   # default output names
    fronts: int = 0                      # 0: from the machine
    workers: int = 0                     # worker processes per device; 0: from the machine
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    max_batch: int = 32                  # rows
    max_delay_ms: float = 2.0
    max_queue: int = 1024                # rows waiting in the batcher
    timeout_ms: float = 30000.0          # per-request deadline
    max_body_mb: float = 256.0
    threads: int = 0                     # runtime threads per worker; 0: from the machine
    batching: str = "auto"               # auto | off
    shm_mb: int = 0                      # arena size per process; 0: from max_body_mb
    models_dir: str = str(CACHE_HOME / "models")   # downloaded and built models
    backend: str = ""                    # "" = tell by the model file; onnx|tensorflow|torch|echo
    signature: str = "serving_default"   # TensorFlow SavedModel signature
    shapes: str = ""                     # TorchScript input shapes: name=d0,d1[:dtype];...
    cache: bool = False                  # the LMDB row cache
    cache_dir: str = str(CACHE_HOME / "rows")
    cache_size_mb: int = 1024
    verbose: int = 0
    log_format: str = "text"             # text | json
    access_log: str = "debug"            # level of the one line per request: debug|info|off
    # filled in by the supervisor
    run_id: str = ""
    model_path: str = ""
    fingerprint: str = ""                # hash of the model's file(s), for cache keys

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def arena_bytes(self) -> int:
        """Shared memory per front (requests) and per worker (outputs)."""
        if self.shm_mb:
            return self.shm_mb * 1024 * 1024
        return max(256 << 20, 2 * self.max_body_bytes)

    def settle(self) -> "Config":
        """Fill machine defaults: fronts and workers from cores and GPUs, threads to match."""
        cores = len(os.sched_getaffinity(0))
        if self.fronts <= 0:
            self.fronts = max(1, min(cores, 8))
        if self.workers <= 0:
            self.workers = 1
        if self.threads <= 0:
            self.threads = max(1, cores // self.workers) if not self.device.startswith(
                "cuda") else 1
        return self


def _env(name: str, default):
    value = os.environ.get(f"GP_{name}")
    return default if value in (None, "") else value


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = Config()
    a = p.add_argument
    a("--model", default=_env("MODEL", d.model),
      help="model file or directory, http(s) URL (downloaded once), or 'echo'; "
           "default: the built-in demo model [GP_MODEL]")
    a("--backend", default=_env("BACKEND", d.backend),
      choices=["", "onnx", "tensorflow", "torch", "echo"],
      help="which runtime serves the model (default: tell by the file) [GP_BACKEND]")
    a("--signature", default=_env("SIGNATURE", d.signature),
      help="TensorFlow SavedModel signature to serve [GP_SIGNATURE]")
    a("--shapes", default=_env("SHAPES", d.shapes),
      help="TorchScript input shapes, 'name=-1,3,48,192[:dtype];...' (or a MODEL.json "
           "side file) [GP_SHAPES]")
    a("--listen", default=_env("LISTEN", d.listen), help="host:port [GP_LISTEN]")
    a("--inputs", type=_names, default=_names(_env("INPUTS", "")),
      help="comma-separated default input names [GP_INPUTS]")
    a("--outputs", type=_names, default=_names(_env("OUTPUTS", "")),
      help="comma-separated default output names [GP_OUTPUTS]")
    a("--fronts", type=int, default=int(_env("FRONTS", 0)),
      help="HTTP front processes (default: one per core, at most 8) [GP_FRONTS]")
    a("--workers", type=int, default=int(_env("WORKERS", 0)),
      help="worker processes (model instances) per device (default 1) [GP_WORKERS]")
    a("--device", default=_env("DEVICE", d.device),
      help="auto, cpu, cuda or cuda:N [GP_DEVICE]")
    a("--max-batch", type=int, default=int(_env("MAX_BATCH", d.max_batch)),
      help="most rows in one batch [GP_MAX_BATCH]")
    a("--max-delay-ms", type=float, default=float(_env("MAX_DELAY_MS", d.max_delay_ms)),
      help="longest a row waits for a batch to fill while others run [GP_MAX_DELAY_MS]")
    a("--max-queue", type=int, default=int(_env("MAX_QUEUE", d.max_queue)),
      help="rows that may wait in the batcher before requests are refused [GP_MAX_QUEUE]")
    a("--timeout-ms", type=float, default=float(_env("TIMEOUT_MS", d.timeout_ms)),
      help="per-request deadline [GP_TIMEOUT_MS]")
    a("--max-body-mb", type=float, default=float(_env("MAX_BODY_MB", d.max_body_mb)),
      help="largest request body [GP_MAX_BODY_MB]")
    a("--threads", type=int, default=int(_env("THREADS", 0)),
      help="runtime threads per worker (default: cores / workers) [GP_THREADS]")
    a("--batching", choices=["auto", "off"], default=_env("BATCHING", d.batching),
      help="'off' runs every request alone [GP_BATCHING]")
    a("--shm-mb", type=int, default=int(_env("SHM_MB", 0)),
      help="shared memory per process for tensors (default: max(256, 2 x max body)) [GP_SHM_MB]")
    a("--models-dir", default=_env("MODELS_DIR", d.models_dir),
      help="where downloaded and built models are kept [GP_MODELS_DIR]")
    a("--cache", action=argparse.BooleanOptionalAction,
      default=_env("CACHE", "0").lower() in ("1", "true", "yes", "on"),
      help="answer rows seen before from the LMDB row cache [GP_CACHE=1]")
    a("--cache-dir", default=_env("CACHE_DIR", d.cache_dir),
      help="where the row cache lives, one LMDB environment per model [GP_CACHE_DIR]")
    a("--cache-size-mb", type=int, default=int(_env("CACHE_SIZE_MB", d.cache_size_mb)),
      help="hard bound on the row cache's disk use, per model [GP_CACHE_SIZE_MB]")
    a("--log-format", choices=["text", "json"], default=_env("LOG_FORMAT", d.log_format),
      help="one line per event, as text or as JSON objects [GP_LOG_FORMAT]")
    a("--access-log", choices=["debug", "info", "off"], default=_env("ACCESS_LOG", d.access_log),
      help="level of the access-log line written for every request; 'debug' shows with "
           "-vv, 'info' with -v [GP_ACCESS_LOG]")
    a("-v", "--verbose", action="count", default=int(_env("VERBOSE", 0)))


def from_args(args: argparse.Namespace) -> Config:
    cfg = Config(**{k: getattr(args, k) for k in Config.__dataclass_fields__
                    if hasattr(args, k)})
    problems = []
    try:
        cfg.port
    except (ValueError, IndexError):
        problems.append(f"--listen {cfg.listen!r} is not host:port")
    for name in ("max_batch", "max_queue"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.max_delay_ms < 0:
        problems.append("--max-delay-ms must not be negative")
    for name in ("timeout_ms", "max_body_mb"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if cfg.cache_size_mb < 1:
        problems.append("--cache-size-mb must be at least 1")
    if cfg.fronts < 0 or cfg.workers < 0 or cfg.threads < 0:
        problems.append("--fronts, --workers and --threads must not be negative")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        problems.append(f"--device {dev!r}: expected auto, cpu, cuda or cuda:N")
    if problems:
        raise SystemExit("gpserve: " + "; ".join(problems))
    return cfg.settle()
