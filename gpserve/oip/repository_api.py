"""The model repository extension (KServe's and Triton's ``/v2/repository``, gRPC
``Repository*``): which models the repository holds and which serve, and loading and
unloading them (``--model-control explicit``), on REST and gRPC alike.

Behind the restricted API group ``model-repository`` (this host's clients only by
default: :mod:`.restricted`). Models load from the repository folder only: Triton's
``config`` and ``file:...`` load parameters (a configuration, or model files, sent
over the wire: code upload) are refused.
"""
from __future__ import annotations

from collections.abc import Iterable

from gpserve import control
from gpserve.errors import ModelControlFailed


def index(state, ready_only: bool = False) -> list[dict]:
    """Every model version served (READY) and, unless ``ready_only``, every other model
    of the repository (UNAVAILABLE, "unloaded"), by name."""
    from gpserve.repository import RepositoryError, scan
    out = [{"name": m.name, "version": m.version, "state": "READY", "reason": ""}
           for m in state.served]
    if state.cfg.model_repository and not ready_only:
        try:
            entries = scan(state.cfg.model_repository)
        except RepositoryError:
            entries = []
        out += [{"name": e.name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
                for e in entries if e.name not in state.models]
    return sorted(out, key=lambda m: (m["name"], m["version"]))


def check_parameters(names: Iterable[str]) -> None:
    """Refuse load parameters that would send a model or its configuration."""
    for name in names:
        if name == "config" or name.startswith("file:"):
            raise ModelControlFailed(
                f"load parameter {name!r} refused: gpserve loads models from its "
                "repository folder only, never from files or configuration sent with "
                "the request")


async def load(state, name: str, parameters: Iterable[str]) -> None:
    """Load (or reload) ``name``, refusing parameters that send a model."""
    check_parameters(parameters)
    await change(state, "load", name)


async def change(state, op: str, name: str) -> None:
    """Load (or reload) or unload ``name`` through the supervisor; returns once done
    (a load: ready in every front, this one included); ModelControlFailed says why not."""
    if not state.cfg.model_repository:
        raise ModelControlFailed(f"cannot {op} {name!r}: this server serves one model "
                                 "(--model); the repository API needs --model-repository "
                                 "and --model-control explicit")
    answer = await control.ask(state.cfg.run_id, op, name)
    if not answer.get("ok"):
        raise ModelControlFailed(f"{op} of {name!r} failed: {answer.get('error')}")
