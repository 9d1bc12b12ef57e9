"""The ``gpserve serve`` flags: declared in groups, each with its ``GP_*`` environment
variable as the default, checked together, and turned into a :class:`Config`."""
from __future__ import annotations

import argparse
import os

from .config import Config


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


def _bool(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError("expected one of 1/0, true/false, yes/no, on/off") from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Every ``gpserve serve`` flag, in groups (as ``--help`` shows them), each with its
    ``GP_*`` variable as the default.

    A variable is converted and checked (type, choices) like its flag, and a bad one
    stops the command with one line and exit status 2, as a bad flag does."""
    for title, declare in _FLAG_GROUPS:
        declare(_adder(p, p.add_argument_group(title)), Config())


def _adder(p: argparse.ArgumentParser, group):
    """``a(*flags, default=, type=, choices=, help=)``: one flag of ``group``, its default
    taken from its ``GP_*`` variable when set."""
    def a(*flags: str, default, type=str, choices=None, help: str = "", **kw):
        env = flags[-1].lstrip("-").replace("-", "_").upper()     # --max-batch: MAX_BATCH
        value = os.environ.get(f"GP_{env}")
        if value not in (None, ""):
            try:
                default = type(value)
            except (TypeError, ValueError) as e:
                why = {int: "expected a whole number", float: "expected a number"}.get(type, e)
                p.error(f"GP_{env}={value!r}: {why}")
            if choices is not None and default not in choices:
                p.error(f"GP_{env}={value!r}: expected one of "
                        f"{', '.join(repr(c) for c in choices)}")
        if type is _bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif "action" not in kw:
            kw["type"] = type
        if choices is not None:
            kw["choices"] = choices
        group.add_argument(*flags, default=default, help=f"{help} [GP_{env}]", **kw)
    return a


def _model_flags(a, d: Config) -> None:
    a("--model", default=d.model,
      help="model file, SavedModel directory, a repository folder of one model "
           "(DIR/NAME/VERSION/model.onnx, as Triton's; its newest version), http(s) URL "
           "(downloaded once), or 'echo'; default: the built-in demo model")
    a("--model-repository", default=d.model_repository, metavar="DIR",
      help="serve every model in DIR by name (DIR/NAME/VERSION/model.onnx, as Triton's, "
           "or a flat folder of model files), each with its own workers and batching; "
           "instead of --model")
    a("--default-model", default=d.default_model, metavar="NAME",
      help="with --model-repository, the model POST / serves (default: the only one)")
    a("--version-policy", default=d.version_policy,
      help="which versions of each model serve: latest, latest:N, all, or specific:1,3 "
           "(requests without a version get the newest)")
    a("--model-control", default=d.model_control, choices=["none", "poll", "explicit"],
      help="'poll': read --model-repository again every --repository-poll-s and follow "
           "it (a new version is loaded, warmed and swapped in without a failed request; "
           "a removed one is drained); 'explicit': models are loaded and unloaded by the "
           "repository API (/v2/repository, restricted); 'none': the models found at "
           "start serve")
    a("--load-models", default=d.load_models, metavar="NAMES",
      help="with --model-control explicit, the models loaded at start (comma-separated, "
           "or '*' for all; default: none)")
    a("--repository-poll-s", type=float, default=d.repository_poll_s,
      help="with --model-control poll, seconds between reads of the repository")
    a("--model-name", default=d.model_name,
      help="the name the model is served by (v2 routes, metadata, metrics); default: "
           "its repository folder's name, else its file's")
    a("--backend", default=d.backend,
      choices=["", "onnx", "tensorflow", "torch", "echo", "standin"],
      help="which runtime serves the model (default: tell by the file)")
    a("--signature", default=d.signature,
      help="TensorFlow SavedModel signature to serve")
    a("--shapes", default=d.shapes,
      help="TorchScript input shapes, 'name=-1,3,48,192[:dtype];...' (or a MODEL.json "
           "side file)")
    a("--inputs", type=_names, default=[],
      help="comma-separated default input names")
    a("--outputs", type=_names, default=[],
      help="comma-separated default output names")
    a("--models-dir", default=d.models_dir,
      help="where downloaded and built models are kept")
    a("--model-sha256", default=d.model_sha256, metavar="HEX",
      help="the SHA-256 a --model URL's download must have (or end the URL with "
           "#sha256=HEX); a download that differs is not kept")


def _protocols_flags(a, d: Config) -> None:
    a("--listen", default=d.listen,
      help="host:port of HTTP: GraphPipe (POST /) and the Open Inference Protocol (/v2)")
    a("--grpc-listen", default=d.grpc_listen, metavar="HOST:PORT",
      help="also serve the Open Inference Protocol's gRPC service here (off by default)")
    a("--shm-clients", type=_bool, default=d.shm_clients,
      help="let clients of this host's user hand tensors over in system shared memory "
           "(/v2/systemsharedmemory; off by default: see docs/open-inference-protocol.md)")
    a("--grpc-inflight-mb", type=float, default=d.grpc_inflight_mb,
      help="bytes of gRPC requests one front holds at once (grpcio reads each whole, and "
           "holds about 4x its size while it runs); past it, RESOURCE_EXHAUSTED (0: "
           "--max-body-mb)")
    a("--restricted-api", default=d.restricted_api, metavar="GROUP:KEY=VALUE",
      help="require a header (REST) or metadata key (gRPC) with this value for an API "
           "group, as Triton's --http-restricted-api: 'shared-memory:admin-key=s3cret' "
           "(groups: shared-memory; several: separate with ';')")
    a("--restricted-api-clients", choices=["loopback", "any"],
      default=d.restricted_api_clients,
      help="who may call restricted API groups (shared memory): clients on this host "
           "only (default), or any that passes --restricted-api")


def _processes_flags(a, d: Config) -> None:
    a("--fronts", type=int, default=0,
      help="HTTP front processes (default: one per core, at most 8)")
    a("--workers", type=int, default=0,
      help="worker processes (model instances) in all; worker i takes GPU i mod the GPUs "
           "visible (default: one per visible GPU, else 1)")
    a("--placement", choices=["auto", "fronts", "workers"], default=d.placement,
      help="where the model runs: 'workers' (worker processes shared by every front: "
           "batches merge all fronts' requests; GPUs), 'fronts' (each front runs its own "
           "instance: no hop between processes; cheap CPU models), 'auto': fronts for a "
           "CPU ONNX or echo model whose one row takes under 1 ms, else workers "
           "(docs/architecture.md)")
    a("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    a("--threads", type=int, default=0,
      help="runtime threads per worker (default: cores / workers)")
    a("--shm-mb", type=int, default=0,
      help="shared memory per process for tensors (default: max(256, 2 x max body))")


def _batching_flags(a, d: Config) -> None:
    a("--max-batch", type=int, default=d.max_batch,
      help="most rows in one batch")
    a("--max-delay-ms", type=float, default=d.max_delay_ms,
      help="longest a row is held for a fuller batch while the device is idle (held "
           "less when the model's fixed cost per batch is smaller; see docs/batching.md)")
    a("--batch-sizes", default=d.batch_sizes,
      help="sizes a batch is padded up to, each run once before traffic: 'steps' (1, 2, "
           "4, 8, then multiples of 8 up to --max-batch), 'pow2', a list such as '1,8,32', "
           "or 'any' (no padding); 'auto': steps on a GPU, any on a CPU")
    a("--max-queue", type=int, default=d.max_queue,
      help="rows that may wait in each worker's queue before requests are refused; a "
           "request with more rows than this is refused with 413 (split it)")
    a("--batching", choices=["auto", "off"], default=d.batching,
      help="'off' runs every request alone: bit-stable answers for models whose rows "
           "change with the rows batched beside them")
    a("--batch-check-every", type=int,
      default=d.batch_check_every,
      help="re-run one request of every Nth merged batch alone and compare, to see "
           "whether batching changes answers (0: never)")


def _limits_flags(a, d: Config) -> None:
    a("--timeout-ms", type=float, default=d.timeout_ms,
      help="per-request deadline")
    a("--max-body-mb", type=float, default=d.max_body_mb,
      help="largest request body")
    a("--max-strings", type=int, default=d.max_strings,
      help="most String elements in one request (each costs a Python object)")
    a("--hang-timeout-s", type=float, default=d.hang_timeout_s,
      help="a worker whose batch or event loop makes no progress for this long is "
           "reported, killed and restarted, its requests answered 503 at once (0: "
           "10x its slowest batch, at least 5 s); a front whose event loop stops for "
           "this long too (0: 30 s)")
    a("--header-timeout-s", type=float, default=d.header_timeout_s,
      help="a connection that has not sent a request's headers in this long is closed")
    a("--max-header-kb", type=int, default=d.max_header_kb,
      help="largest request head (its header lines together); past it, 431 (each line "
           "is bounded to 8 KiB and 100 lines besides)")
    a("--body-timeout-s", type=float, default=d.body_timeout_s,
      help="a request whose body stops arriving for this long is answered 408")
    a("--keepalive-timeout-s", type=float,
      default=d.keepalive_timeout_s, help="an idle keep-alive connection is closed after this")
    a("--max-connections", type=int, default=d.max_connections,
      help="open connections per front; past it new requests get 503")


def _cache_flags(a, d: Config) -> None:
    a("--cache", type=_bool, default=d.cache,
      help="answer rows seen before from the LMDB row cache (GP_CACHE=1)")
    a("--cache-dir", default=d.cache_dir,
      help="where the row cache lives, one LMDB environment per model")
    a("--cache-size-mb", type=int, default=d.cache_size_mb,
      help="hard bound on the row cache's disk use, per model")
    a("--cache-shared", default=d.cache_shared, metavar="URL",
      help="a shared tier behind the local cache, for every replica: redis://[user:"
           "password@]host:port/db, rediss:// (TLS) or unix:///path.sock")
    a("--cache-shared-timeout-ms", type=float, default=d.cache_shared_timeout_ms,
      help="a shared-tier lookup is given up after this long (the row is computed)")
    a("--cache-shared-ttl-s", type=int, default=d.cache_shared_ttl_s,
      help="expiry of rows written to the shared tier (0: none; Redis's maxmemory "
           "policy evicts)")


def _logging_flags(a, d: Config) -> None:
    a("--log-format", choices=["text", "json"], default=d.log_format,
      help="one line per event, as text or as JSON objects")
    a("--access-log", choices=["debug", "info", "off"],
      default=d.access_log,
      help="level of the access-log line written for every request; 'debug' shows with "
           "-vv, 'info' with -v")
    a("-v", "--verbose", type=int, default=0, action="count",
      help="more logging; -vv for debug")


_FLAG_GROUPS = (
    ("the model and how it is read", _model_flags),
    ("where and how requests come in", _protocols_flags),
    ("processes, devices and threads", _processes_flags),
    ("batching", _batching_flags),
    ("limits and deadlines", _limits_flags),
    ("the row cache", _cache_flags),
    ("logging", _logging_flags),
)


def from_args(args: argparse.Namespace) -> Config:
    cfg = Config(**{k: getattr(args, k) for k in Config.__dataclass_fields__
                    if hasattr(args, k)})
    problems = []
    try:
        _ = cfg.port
    except (ValueError, IndexError):
        problems.append(f"--listen {cfg.listen!r} is not host:port")
    if cfg.grpc_listen:
        host, _, port = cfg.grpc_listen.rpartition(":")
        if not host or not port.isdigit():
            problems.append(f"--grpc-listen {cfg.grpc_listen!r} is not host:port")
    for name in ("max_batch", "max_queue", "max_header_kb", "max_connections"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.max_delay_ms < 0:
        problems.append("--max-delay-ms must not be negative")
    problems += _model_problems(cfg)
    if cfg.grpc_inflight_mb < 0:
        problems.append("--grpc-inflight-mb must not be negative (0: --max-body-mb)")
    if cfg.hang_timeout_s < 0:
        problems.append("--hang-timeout-s must not be negative (0: automatic)")
    for name in ("timeout_ms", "max_body_mb", "header_timeout_s", "body_timeout_s",
                 "keepalive_timeout_s"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    try:
        from .oip.restricted import Restrictions
        Restrictions.parse(cfg.restricted_api, cfg.restricted_api_clients)
    except ValueError as e:
        problems.append(str(e))
    if cfg.max_strings < 0 or cfg.batch_check_every < 0:
        problems.append("--max-strings and --batch-check-every must not be negative")
    if cfg.cache_size_mb < 1:
        problems.append("--cache-size-mb must be at least 1")
    if cfg.cache_shared and not (cfg.cache and cfg.cache_shared.startswith(
            ("redis://", "rediss://", "unix://"))):
        problems.append("--cache-shared takes a redis://, rediss:// or unix:// URL, and "
                        "needs --cache (the local tier in front of it)")
    if cfg.cache_shared_timeout_ms <= 0 or cfg.cache_shared_ttl_s < 0:
        problems.append("--cache-shared-timeout-ms must be positive and "
                        "--cache-shared-ttl-s not negative")
    if cfg.fronts < 0 or cfg.workers < 0 or cfg.threads < 0:
        problems.append("--fronts, --workers and --threads must not be negative")
    sizes = cfg.batch_sizes
    if sizes not in ("auto", "any", "pow2", "steps") and not all(
            t.strip().isdigit() and int(t) >= 1 for t in sizes.split(",")):
        problems.append(f"--batch-sizes {sizes!r}: expected auto, any, steps, pow2 or a list of "
                        "whole numbers such as 1,8,32")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        problems.append(f"--device {dev!r}: expected auto, cpu, cuda or cuda:N")
    if problems:
        raise SystemExit("gpserve: " + "; ".join(problems))
    return cfg.settle()


def _model_problems(cfg: Config) -> list[str]:
    """What is wrong with the flags that name the models served."""
    from gpserve.repository import NAME_RULE, VersionPolicy, valid_name
    problems = []
    if cfg.model_name and not valid_name(cfg.model_name):
        problems.append(f"--model-name {cfg.model_name!r}: {NAME_RULE}")
    if cfg.model_repository and (cfg.model or cfg.model_name):
        problems.append("--model-repository serves every model of its folder, by the "
                        "folder's names: drop --model and --model-name")
    if cfg.load_models and cfg.model_control != "explicit":
        problems.append("--load-models names the models --model-control explicit loads "
                        "at start")
    if cfg.model_control != "none" and not cfg.model_repository:
        problems.append(f"--model-control {cfg.model_control} follows --model-repository")
    if cfg.repository_poll_s <= 0:
        problems.append("--repository-poll-s must be positive")
    if cfg.default_model and not cfg.model_repository:
        problems.append("--default-model names one model of --model-repository")
    try:
        VersionPolicy.parse(cfg.version_policy)
    except ValueError as e:
        problems.append(f"--version-policy: {e}")
    return problems
