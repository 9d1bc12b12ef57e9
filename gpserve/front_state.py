"""What one front process holds: its arena, the models it serves (each a
:class:`~gpserve.inflight.ModelState`, found by name and version), the client regions,
the access log; and the model set kept in step with the supervisor's.

The set can change while the front serves (``--model-control poll``: see
:mod:`gpserve.model_control`). When the supervisor publishes a new generation
(:mod:`gpserve.served`), the front loads what is new beside what serves, and routes to a
new version only once it is ready (its workers linked, or its instance here warmed); a
version no longer in the set leaves the routes at once, and is closed when every request
opened before it left has closed. Then the front says, in its counters, that it applied
the generation: that is what the supervisor waits for before it stops old workers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from . import metrics
from .access import AccessLog
from .body import BodyReader
from .config import Config
from .counters import HEARTBEAT_S, Counters
from .errors import UnknownModel
from .inflight import ModelState, hosted_instance
from .oip.restricted import Restrictions
from .oip.sharedmem import ClientRegions
from .request import Request
from .served import Served, read
from .shm import Arena, Segments, segment_path

log = logging.getLogger("gpserve.front")
READY_POLL_S = 0.02          # how often a new version's readiness is looked at


class FrontState:
    def __init__(self, cfg: Config, index: int, served: Served | None = None):
        """``served``: the models to serve (None: the set the supervisor published)."""
        self.cfg, self.index = cfg, index
        self.arena = Arena(segment_path(cfg.run_id, f"front{index}-{os.getpid()}"),
                           cfg.arena_bytes)
        self.segments = Segments()
        self.segments.adopt(self.arena)
        self.counters = Counters(segment_path(cfg.run_id, "counters"))   # the run's
        self.body = BodyReader(cfg, self.arena)
        self.server: Any = None     # the front's uvicorn Server, for draining state
        self.tasks: list[asyncio.Task] = []
        self.client_regions = ClientRegions(cfg.run_id, cfg.shm_clients)
        self.restrictions = Restrictions.parse(cfg.restricted_api, cfg.restricted_api_clients)
        self.access = AccessLog(cfg.access_log)
        served = served or read(cfg.run_id)
        self.generation, self.default = served.generation, served.default
        self.served = [ModelState(self, model_cfg, spec) for model_cfg, spec in served.models]
        self.models: dict[str, dict[int, ModelState]] = {}     # name -> version -> it
        self._route(self.served)
        # open requests, counted per epoch: a new epoch begins when models are retired
        self.epoch = [0]
        self.applying: asyncio.Task | None = None

    async def start(self) -> None:
        self.counters.apply_models(self.index, self.generation)
        self._beat()
        self.tasks.append(asyncio.create_task(metrics.flush_periodically()))
        for model in self.served:
            await model.start()

    def _beat(self) -> None:
        """The heartbeat the supervisor watches (see gpserve/supervisor.py: hangs); and
        a look at the model set's generation."""
        self.counters.front_beat(self.index, time.monotonic())
        if self.applying is None and self.counters.models_generation() > self.generation:
            self.applying = asyncio.create_task(self._apply())
        asyncio.get_running_loop().call_later(HEARTBEAT_S, self._beat)

    @property
    def draining(self) -> bool:
        """Stopping: answering what it holds, taking no new work."""
        return self.server is not None and self.server.should_exit

    @property
    def ready(self) -> bool:
        """Every model served can take requests (Triton's server readiness)."""
        return all(model.ready for model in self.served)

    @property
    def first(self) -> ModelState | None:
        """The model ``GET /`` describes first: the default, or the first by name."""
        versions = self.models.get(self.default)
        if versions:
            return versions[max(versions)]
        return self.served[0] if self.served else None

    def model(self, name: str | None = None, version: str | None = None) -> ModelState:
        """The model version a request names: ``name`` None for the default model, no
        ``version`` for its newest; UnknownModel if none is served so."""
        if name is None:
            if not self.default and len(self.models) == 1:
                return self.model(next(iter(self.models)), version)    # the only one
            if not self.default:
                raise UnknownModel(
                    f"this server serves {len(self.models)} models "
                    f"({', '.join(sorted(self.models))}) and none is the default "
                    "(--default-model): post to /models/<name>")
            name = self.default
        versions = self.models.get(name)
        if versions is None:
            raise UnknownModel.named(name, version)
        if version in (None, ""):
            return versions[max(versions)]
        found = versions.get(int(version)) if version.isdigit() else None
        if found is None:
            raise UnknownModel.named(name, version)
        return found

    def request(self) -> Request:
        """A new request's memory and accounting; the door holds it in a ``with`` block."""
        return Request(self.arena, self.counters, self.index, self.epoch)

    # -- the model set, kept in step with the supervisor's ------------------------------
    def _route(self, served: Iterable[ModelState]) -> None:
        """Requests go to these model versions from now on."""
        models: dict[str, dict[int, ModelState]] = {}
        for model in served:
            models.setdefault(model.name, {})[model.cfg.version] = model
        self.models = models

    async def _apply(self) -> None:
        """Serve the latest published set: load and start what is new, route to it once
        ready; retire what left, close it once no request opened before holds it."""
        try:
            while True:
                served = read(self.cfg.run_id)
                if await self._apply_set(served):
                    self.counters.apply_models(self.index, served.generation)
                    log.info("serving model set %d: %s", served.generation,
                             ", ".join(f"{m.name}:{m.version}" for m in self.served))
                if self.counters.models_generation() <= served.generation:
                    return
        finally:
            self.applying = None

    async def _apply_set(self, served: Served) -> bool:
        """One step towards ``served``; False if a newer set came meanwhile."""
        have = {m.cfg.slot: m for m in self.served}
        added = []
        for model_cfg, spec in served.models:
            if model_cfg.slot not in have:
                hosted = None
                if model_cfg.placement == "fronts":       # load it off the event loop
                    hosted = await asyncio.to_thread(hosted_instance, model_cfg, self.index)
                model = ModelState(self, model_cfg, spec, hosted)
                await model.start()
                added.append(model)
        self.served += added
        while not all(m.ready for m in added):
            if self.counters.models_generation() > served.generation:
                return False                  # superseded: the next set says what to do
            await asyncio.sleep(READY_POLL_S)
        keep = served.slots()
        retired = [m for m in self.served if m.cfg.slot not in keep]
        self.served = [m for m in self.served if m.cfg.slot in keep]
        self.default = served.default
        self.generation = served.generation
        self._route(self.served)
        if retired:
            opened_before, self.epoch = self.epoch, [0]
            while opened_before[0] > 0:
                await asyncio.sleep(READY_POLL_S)
            for model in retired:
                model.close()
        return True
