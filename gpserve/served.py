"""The model versions a run serves, as the supervisor tells the fronts.

The set changes while the server runs (a new version found by ``--model-control poll``,
one that replaces another): the supervisor writes the whole set to one file in the run's
shared memory, replaced atomically, then moves a generation number in the shared
counters. A front reads the file when it starts and whenever the generation moves, and
says in its own counters which generation it has applied (see
:class:`gpserve.inflight.FrontState`): the supervisor's swap waits on that.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

from .config import Config
from .modelspec import ModelSpec
from .shm import segment_path


@dataclass(frozen=True)
class Served:
    generation: int
    default: str                                     # the model POST / serves; "": none
    models: tuple[tuple[Config, ModelSpec], ...]     # each version: its config and spec

    def slots(self) -> set[int]:
        return {cfg.slot for cfg, _ in self.models}


def publish(run_id: str, served: Served) -> None:
    """Write the set for the fronts (a reader sees the old file or the new, never half).
    The caller then moves the counters' generation."""
    path = segment_path(run_id, "models")
    with open(path + ".new", "wb", opener=lambda p, f: os.open(p, f, 0o600)) as f:
        pickle.dump(served, f)
    os.replace(path + ".new", path)


def read(run_id: str) -> Served:
    """The set the supervisor published last (a file of this run's own user: see
    gpserve/shm.py's lock and segment rules)."""
    with open(segment_path(run_id, "models"), "rb") as f:
        return pickle.load(f)
