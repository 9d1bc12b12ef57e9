"""One configuration object, built once from flags, ``GP_*`` environment variables and
machine defaults, and handed (pickled) to every process. Frozen: the supervisor's plan
step (:mod:`gpserve.plan`) completes it once, as a new object, with what only a start
can know (the model's path, the run id, the placement)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from platformdirs import user_cache_dir

CACHE_HOME = Path(user_cache_dir("gpserve"))


@dataclass(frozen=True)
class Config:
    model: str = ""                      # path, http(s) URL, "echo", or "" for the default
    model_repository: str = ""           # a folder of models, every one served by name
    default_model: str = ""              # what POST / serves; "": the only model
    version_policy: str = "latest"       # which versions serve: latest[:N] | all | specific:..
    model_control: str = "none"          # none | poll | explicit (the repository API)
    load_models: str = ""                # explicit: the models loaded at start (*: all)
    repository_poll_s: float = 5.0       # poll: how often
    listen: str = "127.0.0.1:9000"
    grpc_listen: str = ""                # host:port of the Open Inference Protocol's gRPC
    shm_clients: bool = False            # let local clients register shared-memory regions
    grpc_inflight_mb: float = 0.0        # gRPC request bytes a front holds at once; 0: max body
    restricted_api: str = ""             # GROUP[,GROUP]:KEY=VALUE[;...]: a header per group
    restricted_api_clients: str = "loopback"   # who may call restricted groups: loopback|any
    inputs: list[str] = field(default_factory=list)    # default input names, in order
    outputs: list[str] = field(default_factory=list)   # default output names
    fronts: int = 0                      # 0: from the machine
    workers: int = 0                     # worker processes in all; 0: one per visible GPU, or 1
    placement: str = "auto"              # auto | fronts | workers: where the model runs
    threads_from_machine: bool = False   # --threads left at 0: settled from the cores
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    max_batch: int = 32                  # rows
    max_delay_ms: float = 2.0
    batch_sizes: str = "auto"            # auto|any|steps|pow2|1,8,32...: sizes padded to
    max_queue: int = 1024                # rows waiting in each worker's queue
    timeout_ms: float = 30000.0          # per-request deadline
    max_body_mb: float = 256.0
    threads: int = 0                     # runtime threads per worker; 0: from the machine
    batching: str = "auto"               # auto | off
    batch_check_every: int = 64          # merged batches between re-runs of one alone
    hang_timeout_s: float = 0.0          # a worker stuck this long is restarted; 0: auto
    max_strings: int = 65536             # String elements per request
    header_timeout_s: float = 10.0
    max_header_kb: int = 32              # a request's head: its request line and headers
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 1024          # per front
    shm_mb: int = 0                      # arena size per process; 0: from max_body_mb
    models_dir: str = str(CACHE_HOME / "models")   # downloaded and built models
    model_sha256: str = ""               # the SHA-256 a downloaded --model must have
    model_name: str = ""                 # "" = the repository's name for it, or the file's
    backend: str = ""                    # "" = tell by the model file; onnx|tensorflow|torch|echo
    signature: str = "serving_default"   # TensorFlow SavedModel signature
    shapes: str = ""                     # TorchScript input shapes: name=d0,d1[:dtype];...
    cache: bool = False                  # the LMDB row cache
    cache_dir: str = str(CACHE_HOME / "rows")
    cache_size_mb: int = 1024
    cache_shared: str = ""               # redis://, rediss:// or unix:// URL of a shared tier
    cache_shared_timeout_ms: float = 10.0
    cache_shared_ttl_s: int = 0          # 0: no expiry (Redis's maxmemory policy evicts)
    verbose: int = 0
    log_format: str = "text"             # text | json
    access_log: str = "debug"            # level of the one line per request: debug|info|off
    # filled in by the plan step (gpserve/plan.py)
    run_id: str = ""
    model_path: str = ""
    fingerprint: str = ""                # hash of the model's file(s), for cache keys
    version: int = 1                     # the model version this config serves
    slot: int = 0                        # which of the run's models: names its memory

    def scoped(self, name: str) -> str:
        """A per-model name (shared-memory segment, worker socket) for this config's
        model: the run's first model keeps the plain name."""
        return name if not self.slot else f"m{self.slot}-{name}"

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
        """Machine defaults filled in: fronts and workers from cores and GPUs, threads
        to match."""
        cores = len(os.sched_getaffinity(0))
        fronts, workers = self.fronts, self.workers
        if fronts <= 0:
            fronts = max(1, min(cores, 8))
        if workers <= 0:                     # one per visible GPU: none idles by default
            from gpserve.workers.devices import gpu_count
            gpus = gpu_count() if self.device in ("auto", "cuda") else 0
            workers = max(1, gpus)
        from_machine = self.threads <= 0
        threads = self.threads
        if from_machine:
            threads = max(1, cores // workers) if not self.device.startswith("cuda") else 1
        return replace(self, fronts=fronts, workers=workers, threads=threads,
                       threads_from_machine=from_machine)

    def placed(self, placement: str) -> "Config":
        """Where the model runs settled; in the fronts, each front hosts one instance."""
        if placement != "fronts":
            return replace(self, placement=placement)
        threads = self.threads
        if self.threads_from_machine:
            threads = max(1, len(os.sched_getaffinity(0)) // self.fronts)
        return replace(self, placement=placement, workers=self.fronts, threads=threads)
