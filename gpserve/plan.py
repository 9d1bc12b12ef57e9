"""The plan step: what a start decides before any child runs, done once, in order.

From the flags (a frozen :class:`Config`) to a frozen :class:`Plan`: the model file
(downloaded and checked if it is a URL), its spec (read by loading it once in a
short-lived process, so that the supervisor never imports a model runtime), the cache
fingerprint, the run id and where the model runs. Every child gets the plan's config
and spec; nothing changes them after.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass, replace
from typing import Any

from .config import Config
from .counters import MAX_PROCESSES
from .model_source import in_repository, resolve
from .modelspec import ModelSpec

log = logging.getLogger("gpserve.supervisor")
CHEAP_ROW_MS = 1.0
MAX_MODELS = 64             # model versions one run serves (see docs/models.md)


@dataclass(frozen=True)
class ModelPlan:
    """One model version as served: its flags completed, and its spec."""

    cfg: Config           # model_path, backend, fingerprint, placement, version, slot...
    spec: ModelSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def worker_processes(self) -> int:
        """Worker processes to start: none when the fronts host the model."""
        return self.cfg.workers if self.cfg.placement == "workers" else 0


@dataclass(frozen=True)
class Plan:
    """The run: its server-wide flags and every model version it serves (the first is
    the default model's newest version, the one ``GET /`` describes first)."""

    cfg: Config
    models: tuple[ModelPlan, ...]
    default: str = ""         # the model POST / serves; "": several, none named

    @property
    def spec(self) -> ModelSpec:
        return self.models[0].spec

    @property
    def worker_processes(self) -> int:
        return sum(m.worker_processes for m in self.models)


def make_plan(cfg: Config, run_id: str) -> Plan:
    """Resolve, inspect and place every model (SystemExit with the reason if one cannot
    be served as configured)."""
    cfg = replace(cfg, run_id=run_id)
    if cfg.model_repository:
        return _repository_plan(cfg)
    path, name = in_repository(resolve(cfg.model, cfg.models_dir, cfg.model_sha256))
    model = model_plan(cfg, path, cfg.model_name or name, 1, 0, strict=True)
    return Plan(model.cfg, (model,), model.name)


def _repository_plan(cfg: Config) -> Plan:
    """``--model-repository``: each version its policy serves is planned, the newest of
    each model first, the default model before the others, in the repository's name
    order (``--model-control explicit``: only the models of ``--load-models``)."""
    from gpserve.repository import RepositoryError, VersionPolicy, scan
    try:
        entries = scan(cfg.model_repository)
    except RepositoryError as e:
        raise SystemExit(f"gpserve: --model-repository {e}") from None
    names = [e.name for e in entries]
    if cfg.model_control == "explicit":
        load = set(filter(None, (n.strip() for n in cfg.load_models.split(","))))
        if load - set(names) - {"*"}:
            raise SystemExit(f"gpserve: --load-models {', '.join(sorted(load - set(names)))}:"
                             f" not in {cfg.model_repository} (it holds {', '.join(names)})")
        entries = [e for e in entries if "*" in load or e.name in load]
    policy = VersionPolicy.parse(cfg.version_policy)
    chosen = [(e.name, v, e.settings) for e in entries
              for v in reversed(policy.choose(e.versions))]
    if not chosen and cfg.model_control == "explicit":
        return Plan(cfg, (), cfg.default_model)          # models come through the API
    if not chosen:
        raise SystemExit(f"gpserve: --model-repository {cfg.model_repository}: no version "
                         f"of any model matches --version-policy {cfg.version_policy}")
    default = cfg.default_model or (names[0] if len(names) == 1 else "")
    if default and default not in names:
        raise SystemExit(f"gpserve: --default-model {default!r} is not in "
                         f"{cfg.model_repository} (it holds {', '.join(names)})")
    chosen.sort(key=lambda c: c[0] != default)           # the default model's first
    models = tuple(model_plan(cfg, v.path, name, v.number, slot, strict=False,
                              settings=settings)
                   for slot, (name, v, settings) in enumerate(chosen))
    if len(models) > MAX_MODELS:
        raise SystemExit(f"gpserve: {len(models)} model versions to serve, at most "
                         f"{MAX_MODELS}: narrow --version-policy or the repository")
    return Plan(models[0].cfg, models, default)


def model_plan(cfg: Config, path: str, name: str, version: int, slot: int,
               strict: bool, settings: tuple[str, ...] = ()) -> ModelPlan:
    """One model version: its own settings put over the flags (``settings``: their
    files), inspected, fingerprinted for the cache, placed. ``strict``: --cache on a
    model that cannot use it stops the start (one model), else that model runs uncached
    and a warning says why (a repository)."""
    from .model_settings import apply
    cfg = replace(apply(cfg, settings), model_path=path, backend=cfg.backend or _backend_name(path),
                  version=version, slot=slot)
    spec = inspect_model(cfg)
    spec.name = name or spec.name                       # the name it is served by
    cfg = replace(cfg, model_name=spec.name)
    if cfg.cache and not spec.batchable:
        why = (f"--cache needs a model whose rows are independent (every input and output "
               f"batch-first, -1 in dimension 0); {spec.name} has inputs "
               f"{', '.join(s.describe() for s in spec.inputs)}")
        if strict:
            raise SystemExit(f"gpserve: {why}: serve it without --cache")
        log.warning("%s: served without the row cache", why)
        cfg = replace(cfg, cache=False)
    if cfg.cache:
        from gpserve.cache.keys import fingerprint
        cfg = replace(cfg, fingerprint=fingerprint(path))
    cfg = cfg.placed(choose_placement(cfg, spec))
    if cfg.workers > MAX_PROCESSES or cfg.fronts > MAX_PROCESSES:
        raise SystemExit(f"gpserve: at most {MAX_PROCESSES} workers and "
                         f"{MAX_PROCESSES} fronts")
    return ModelPlan(cfg, spec)


def _backend_name(path: str) -> str:
    from gpserve.workers.backend import backend_name
    try:
        return backend_name(path)
    except Exception as e:
        raise SystemExit(f"gpserve: cannot load model {path} (backend ?): "
                         f"{type(e).__name__}: {e}") from None


def inspect_model(cfg: Config) -> ModelSpec:
    """Load the model once, in a short-lived process, to fail fast and to learn its spec
    for the fronts."""
    from concurrent.futures import ProcessPoolExecutor

    from gpserve.workers.backend import inspect
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(inspect, cfg).result()
    except Exception as e:
        raise SystemExit(f"gpserve: cannot load model {cfg.model_path} "
                         f"(backend {cfg.backend or '?'}): {type(e).__name__}: {e}") from None


def choose_placement(cfg: Config, spec: ModelSpec) -> str:
    """``--placement auto``: a model cheaper than a hop between processes runs in the
    fronts (echo, or an ONNX model on the CPU whose one row took under CHEAP_ROW_MS at
    load); anything else, and every GPU, in worker processes."""
    if cfg.placement != "auto":
        return cfg.placement
    from gpserve.workers.devices import worker_device
    cheap = spec.echo or (cfg.backend == "onnx" and spec.one_row_ms is not None
                          and spec.one_row_ms < CHEAP_ROW_MS)
    return "fronts" if cheap and worker_device(cfg.device, 0) == "cpu" else "workers"


def announce(plan: Plan) -> None:
    """A startup line per model version served."""
    for model in plan.models:
        announce_model(model)
    if not plan.models:
        log.info("serving no model yet on http://%s (--model-control explicit: load them "
                 "with POST /v2/repository/models/<name>/load)", plan.cfg.listen)


def announce_model(plan: ModelPlan) -> None:
    """The startup line: what is served, where, and how; and a warning if batching
    changes the model's answers."""
    from gpserve.workers.batch_check import VERDICTS, verdict
    from gpserve.workers.devices import worker_device
    cfg, spec = plan.cfg, plan.spec
    batching = cfg.batching != "off" and spec.batchable
    fields: dict[str, Any] = {
        "model": cfg.model_path, "name": spec.name, "version": cfg.version,
        "backend": spec.backend,
        "devices": sorted({worker_device(cfg.device, i) for i in range(cfg.workers)}),
        "fronts": cfg.fronts, "workers": cfg.workers, "threads": cfg.threads,
        "placement": cfg.placement,
        "batching": f"max {cfg.max_batch} rows, {cfg.max_delay_ms:g} ms" if batching
        else "off",
        "max_queue": cfg.max_queue, "timeout_ms": cfg.timeout_ms,
        "cache": f"{cfg.cache_dir} ({cfg.cache_size_mb} MB)" if cfg.cache else "off",
        "listen": f"http://{cfg.listen}"
        + (f", grpc://{cfg.grpc_listen}" if cfg.grpc_listen else "")}
    found = verdict(spec.batch_probe)
    probe = found["checks"]["probe"]
    fields["batch_invariant"] = found["invariant"]
    fields["batch_max_difference"] = found["max_difference"]
    log.info("serving %s (%s, %s) on %s: devices %s, %d fronts, %d model instances in the "
             "%s x %d threads, batching %s (%s: largest difference %.3g; %s), cache %s",
             spec.name, spec.backend, cfg.model_path, fields["listen"],
             ",".join(fields["devices"]),
             cfg.fronts, cfg.workers, cfg.placement, cfg.threads, fields["batching"],
             VERDICTS[found["invariant"]], fields["batch_max_difference"],
             probe.get("note", ""), fields["cache"], extra={"fields": fields})
    if found["invariant"] is not False:
        return
    log.warning(
        "batching changes %s's answers: a row run in a batch differs from the same row "
        "run alone by up to %.3g (%.3g of the output's scale), so a request's answer "
        "depends on the requests batched beside it.%s", spec.name,
        probe["max_difference"], probe["relative"],
        " Serve with --batching off, or send config 'batch=off' on requests, where "
        "bit-stable answers matter." if batching else " Batching is off: answers are "
        "stable.")
    if cfg.cache and batching:
        log.warning("--cache with a model whose answers depend on the batch: cached rows "
                    "hold whichever batch's answer came first")
