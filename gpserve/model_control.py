"""Which model versions a run serves, and the swaps between them (the supervisor's side).

``--model-control none`` (the default): the versions planned at start serve until the
stop. ``--model-control poll``: every ``--repository-poll-s`` the repository is read
again, and the set follows it and the version policy. A swap, so that no request fails:

1. the new versions are planned (loaded once in a short-lived process, off the
   supervisor's loop) and their workers started; a version that fails here is logged
   with the reason and not tried again until its file changes; what serves goes on;
2. the set *with* them is published (:mod:`gpserve.served`): each front loads what runs
   in it, and routes to a new version once it is ready (workers linked, or its instance
   warmed); the swap waits until every front has applied the set (or gives up after
   ``READY_S``: the new versions are dropped, the old serve on);
3. the set *without* the versions the policy no longer serves is published: fronts take
   them off their routes at once and close them when the requests opened before have
   closed; once every front has applied that set, their workers are stopped.

A request that names no version is served by the newest version ready in its front, so
traffic moves during step 2 front by front; one that names a version being removed is
answered until step 3, then gets ``UnknownModel``.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .control import Call
from .counters import Counters
from .plan import MAX_MODELS, ModelPlan, Plan, announce_model, model_plan
from .served import Served, publish

log = logging.getLogger("gpserve.supervisor")
READY_S = 120.0              # how long new versions may take to be ready in every front


@dataclass
class _Swap:
    generation: int               # the set it waits for every front to apply
    added: list[ModelPlan]        # step 2: the versions loading
    removing: list[ModelPlan]     # what to remove once they are ready (step 3)
    deadline: float               # step 2 gives up then
    draining: bool = False        # step 3: waiting to stop ``removing``'s workers


class ModelControl:
    def __init__(self, plan: Plan, counters: Counters,
                 start_model: Callable[[ModelPlan], None],
                 stop_model: Callable[[ModelPlan], None],
                 fronts_applied: Callable[[int], bool]):
        """``start_model``/``stop_model``: start or stop a version's workers;
        ``fronts_applied(g)``: every running front serves set ``g`` or a later one."""
        self.cfg, self.counters = plan.cfg, counters
        self.start_model, self.stop_model = start_model, stop_model
        self.fronts_applied = fronts_applied
        self.models = list(plan.models)
        self.default = plan.default
        self.generation = 0
        self.next_slot = max((m.cfg.slot for m in self.models), default=0) + 1
        self.failed: dict[str, tuple] = {}       # path -> its file's (mtime, size) then
        self.loading: Future | None = None
        self.swap: _Swap | None = None
        self.calls: list[Call] = []              # load/unload requests, in order
        self.call: Call | None = None            # the one under way
        self.poll_at = time.monotonic() + self.cfg.repository_poll_s
        self.planner = ThreadPoolExecutor(1, thread_name_prefix="model-planner")
        self._publish(self.models)

    def _publish(self, models: list[ModelPlan]) -> int:
        self.generation += 1
        publish(self.cfg.run_id, Served(self.generation, self.default,
                                        tuple((m.cfg, m.spec) for m in models)))
        self.counters.publish_models(self.generation)
        return self.generation

    def tick(self, now: float) -> None:
        """Called from the supervisor's loop (at least every WATCH_S): one step."""
        if self.swap is not None:
            self._advance(self.swap, now)
        elif self.loading is not None:
            if self.loading.done():
                self._loaded(self.loading, now)
        elif self.calls:
            self._take(self.calls.pop(0), now)
        elif self.cfg.model_control == "poll" and now >= self.poll_at:
            self.poll_at = now + self.cfg.repository_poll_s
            self._follow(None, now)

    # -- the repository API (--model-control explicit) ----------------------------------
    def handle(self, call: Call) -> None:
        """A front's load or unload (gpserve/control.py): answered once done; one change
        at a time, in order."""
        from gpserve.repository import valid_name
        op, name = call.message.get("op"), call.message.get("name")
        if self.cfg.model_control != "explicit":
            call.answer(False, "models are loaded and unloaded through the API only with "
                               f"--model-control explicit (this server: "
                               f"{self.cfg.model_control})")
        elif op not in ("load", "unload") or not isinstance(name, str) or not valid_name(name):
            call.answer(False, f"a control request must be load or unload of a model name, "
                               f"not {op!r} of {name!r}")
        else:
            self.calls.append(call)

    def _take(self, call: Call, now: float) -> None:
        self.call = call
        name = call.message["name"]
        if call.message["op"] == "unload":
            gone = [m for m in self.models if m.name == name]
            log.info("unloading %s", name)
            if gone:
                self._remove(gone)
            else:
                self._finish(True)
        else:
            self._follow({name}, now)

    def _finish(self, ok: bool, error: str = "") -> None:
        """The change under way is done: answer the call that asked for it, if any."""
        call, self.call = self.call, None
        if call is not None:
            call.answer(ok, error)

    def close(self) -> None:
        """The server stops: every request waiting is answered so."""
        for call in [*filter(None, [self.call]), *self.calls]:
            call.answer(False, "the server is stopping")
        self.call, self.calls = None, []
        self.planner.shutdown(wait=False, cancel_futures=True)

    # -- following the repository -------------------------------------------------------
    def _follow(self, names: set[str] | None, now: float) -> None:
        """Load what the repository and the version policy serve (of ``names``, or of
        every model) and is not served yet; remove what they no longer serve."""
        from gpserve.repository import RepositoryError, VersionPolicy, scan
        try:
            entries = [e for e in scan(self.cfg.model_repository)
                       if names is None or e.name in names]
        except RepositoryError as e:
            log.warning("--model-repository: %s; serving what serves", e)
            return self._finish(False, str(e))
        if names is not None and not entries:
            return self._finish(False, f"no model {', '.join(sorted(names))} in "
                                       f"{self.cfg.model_repository}")
        policy = VersionPolicy.parse(self.cfg.version_policy)
        wanted = {(e.name, v.number): (v.path, e.settings)
                  for e in entries for v in policy.choose(e.versions)}
        served = {(m.name, m.cfg.version) for m in self.models
                  if names is None or m.name in names}
        new = [(name, number, path, settings)
               for (name, number), (path, settings) in sorted(wanted.items())
               if (name, number) not in served and self.failed.get(path) != _signature(path)]
        gone = [m for m in self.models if (m.name, m.cfg.version) not in wanted
                and (names is None or m.name in names)]
        if len(self.models) + len(new) > MAX_MODELS:
            log.error("the repository asks for %d model versions, at most %d: not loading "
                      "%s", len(self.models) + len(new), MAX_MODELS,
                      ", ".join(f"{n}:{v}" for n, v, _, _ in new))
            new = []
        if new:
            slots = range(self.next_slot, self.next_slot + len(new))
            self.next_slot += len(new)
            log.info("loading %s", ", ".join(f"{n} version {v}" for n, v, _, _ in new))
            self.loading = self.planner.submit(self._plan_all, list(zip(new, slots)))
        elif gone:
            self._begin(now, [], gone)
        else:
            self._finish(True)                         # served as it is: nothing to do

    def _plan_all(self, new) -> list[ModelPlan | tuple[str, str]]:
        """Each new version's plan, or (its path, why it cannot be served)."""
        plans: list[ModelPlan | tuple[str, str]] = []
        for (name, number, path, settings), slot in new:
            try:
                plans.append(model_plan(self.cfg, path, name, number, slot, strict=False,
                                        settings=settings))
            except SystemExit as e:
                plans.append((path, str(e.code)))
        return plans

    def _loaded(self, loading: Future, now: float) -> None:
        self.loading = None
        added, failures = [], []
        for plan in loading.result():
            if isinstance(plan, tuple):
                path, why = plan
                self.failed[path] = _signature(path)
                failures.append(why.removeprefix("gpserve: "))
                log.error("%s (the versions serving go on; tried again once the file "
                          "changes)", why)
            else:
                added.append(plan)
        if failures and self.call is not None:
            added = []            # a load asked for is all or nothing: it says why
        if not added:
            return self._finish(False, "; ".join(failures))
        names = {m.name for m in added}
        policy_gone = [m for m in self.models if m.name in names
                       and not self._still_wanted(m, added)]
        for model in added:
            self.start_model(model)
            announce_model(model)
        self._begin(now, added, policy_gone)

    def _still_wanted(self, model: ModelPlan, added: list[ModelPlan]) -> bool:
        """Whether the version policy still serves ``model`` beside the ``added``."""
        from gpserve.repository import Version, VersionPolicy
        numbers = sorted({m.cfg.version for m in [*self.models, *added]
                          if m.name == model.name})
        chosen = VersionPolicy.parse(self.cfg.version_policy).choose(
            tuple(Version(n, "") for n in numbers))
        return model.cfg.version in {v.number for v in chosen}

    def _begin(self, now: float, added: list[ModelPlan], removing: list[ModelPlan]) -> None:
        if added:
            generation = self._publish([*self.models, *added])
            self.swap = _Swap(generation, added, removing, now + READY_S)
        else:
            self._remove(removing)

    def _advance(self, swap: _Swap, now: float) -> None:
        if not self.fronts_applied(swap.generation):
            if not swap.draining and now > swap.deadline:
                log.error("%s not ready in every front after %.0f s: dropped; the "
                          "versions serving go on", ", ".join(
                              f"{m.name} version {m.cfg.version}" for m in swap.added),
                          READY_S)
                for model in swap.added:
                    self.failed[model.cfg.model_path] = _signature(model.cfg.model_path)
                self.swap = None
                self.models = [*self.models, *swap.added]
                self._remove(swap.added)
                self._finish(False, f"not ready in every front after {READY_S:.0f} s")
            return
        if swap.draining:
            for model in swap.removing:
                self.stop_model(model)
                log.info("stopped %s version %d", model.name, model.cfg.version)
            self.swap = None
            self._finish(True)
            return
        self.models = [*self.models, *swap.added]
        self.swap = None
        if swap.removing:
            self._remove(swap.removing)
        else:
            self._finish(True)

    def _remove(self, removing: list[ModelPlan]) -> None:
        """Step 3: publish the set without ``removing``; stop them once fronts let go."""
        if not removing:
            return
        gone = {m.cfg.slot for m in removing}
        self.models = [m for m in self.models if m.cfg.slot not in gone]
        generation = self._publish(self.models)
        self.swap = _Swap(generation, [], removing, float("inf"), draining=True)


def _signature(path: str) -> tuple:
    """What a model file looked like (a failed one is tried again once this changes)."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size)
