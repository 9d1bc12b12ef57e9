"""A repository model's own settings: what a file beside the model sets over the command
line's flags (which stay the defaults for everything it does not set).

- ``gpserve.toml`` in the model's folder (``<name>.toml`` beside a flat model file): any
  per-model flag, named as on the command line without ``--`` (``max-batch = 16``,
  ``placement = "workers"``, ``cache = false``, ``inputs = ["x"]``), checked as the flag
  is.
- Triton's ``config.pbtxt`` in the model's folder, read with Triton's own ``ModelConfig``
  (tritonclient's generated module): ``max_batch_size``, ``dynamic_batching``
  (``max_queue_delay_microseconds``, ``preferred_batch_size``), ``instance_group``
  (``count``, ``kind``), ``platform``/``backend``; what gpserve cannot honour
  (sequence batching, ensembles, decoupled models) is refused; the rest is ignored
  (docs/models.md lists both).

Where both exist, ``gpserve.toml`` wins, field by field.
"""
from __future__ import annotations

import argparse
import tomllib
from dataclasses import replace
from pathlib import Path

from .config import Config

PER_MODEL = ("backend", "signature", "shapes", "inputs", "outputs", "workers", "placement",
             "device", "threads", "max_batch", "max_delay_ms", "batch_sizes", "max_queue",
             "timeout_ms", "batching", "batch_check_every", "cache", "max_strings")
PLATFORMS = {"onnxruntime_onnx": "onnx", "onnxruntime": "onnx",
             "tensorflow_savedmodel": "tensorflow", "tensorflow_graphdef": "tensorflow",
             "tensorflow": "tensorflow", "pytorch_libtorch": "torch", "pytorch": "torch"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):            # raised, not printed and exited
        raise ValueError(message)


def apply(cfg: Config, files: tuple[str, ...]) -> Config:
    """``cfg`` with the settings of ``files`` (config.pbtxt first, then gpserve.toml)
    over it; SystemExit naming the file and the setting that is wrong."""
    if not files:
        return cfg
    settings: dict[str, object] = {}
    for path in sorted(files, key=lambda p: p.endswith(".toml")):
        try:
            settings.update(from_pbtxt(path) if path.endswith(".pbtxt") else from_toml(path))
        except (ValueError, OSError) as e:
            raise SystemExit(f"gpserve: {path}: {e}") from None
    return _overlay(cfg, settings, ", ".join(files))


def from_toml(path: str) -> dict[str, object]:
    with open(path, "rb") as f:
        table = tomllib.load(f)
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in PER_MODEL:
            raise ValueError(f"{key!r} is not a per-model setting; these are: "
                             f"{', '.join(n.replace('_', '-') for n in PER_MODEL)}")
        settings[name] = value
    return settings


def from_pbtxt(path: str) -> dict[str, object]:
    """The part of a Triton model configuration gpserve honours, as settings."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    try:
        config = text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"not a Triton model configuration: {e}") from None
    for field, why in (("sequence_batching", "sequence batching (stateful models)"),
                       ("ensemble_scheduling", "ensembles")):
        if config.HasField(field):
            raise ValueError(f"{why}: gpserve cannot serve it; remove {field}")
    if config.model_transaction_policy.decoupled:
        raise ValueError("decoupled models (several responses a request): gpserve "
                         "answers each request once")
    settings: dict[str, object] = {}
    backend = PLATFORMS.get(config.platform or config.backend)
    if backend:
        settings["backend"] = backend
    if config.max_batch_size > 0:
        settings["max_batch"] = config.max_batch_size
    elif "max_batch_size" in Path(path).read_text():
        settings["batching"] = "off"                 # max_batch_size: 0, said outright
    if config.HasField("dynamic_batching"):
        dynamic = config.dynamic_batching
        settings["max_delay_ms"] = dynamic.max_queue_delay_microseconds / 1000
        if dynamic.preferred_batch_size:
            sizes = sorted({*dynamic.preferred_batch_size, config.max_batch_size} - {0})
            settings["batch_sizes"] = ",".join(map(str, sizes))
    if config.instance_group:
        group = config.instance_group[0]
        settings["workers"] = sum(g.count or 1 for g in config.instance_group)
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        if kind == "KIND_CPU":
            settings["device"] = "cpu"
        elif kind == "KIND_GPU":
            settings["device"] = f"cuda:{group.gpus[0]}" if len(group.gpus) == 1 else "cuda"
    return settings


def _overlay(cfg: Config, settings: dict[str, object], where: str) -> Config:
    """Check the settings as their flags are checked, and put them over ``cfg``."""
    from .flags import add_serve_arguments, from_args
    parser = _Parser()
    add_serve_arguments(parser)
    defaults = {name: getattr(cfg, name) for name in Config.__dataclass_fields__}
    if cfg.threads_from_machine:
        defaults["threads"] = 0                      # settled again: placement may differ
    parser.set_defaults(**defaults)
    argv = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            argv.append(f"{flag}={','.join(map(str, value))}")
        else:
            argv.append(f"{flag}={value}")
    try:
        checked = from_args(parser.parse_args(argv))
    except ValueError as e:
        raise SystemExit(f"gpserve: {where}: {e}") from None
    except SystemExit as e:
        raise SystemExit(f"{e.code} (in {where})") from None
    return replace(cfg, threads_from_machine=checked.threads_from_machine,
                   **{name: getattr(checked, name) for name in PER_MODEL})
