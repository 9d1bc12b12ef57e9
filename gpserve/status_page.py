"""The status page a person opens in a browser: ``GET /`` asked for ``text/html``.

The page (``gpserve/status/``: one HTML file, its script and its style sheet, shipped in
the package, no build step, nothing fetched from elsewhere) polls ``GET /_status/data``,
the JSON this module makes from what is counted already: the shared counters (per model
version: requests, rows, batches and their sizes, padding, queue, cache; per process:
pids, readiness, restarts, errors by code) and the request-time histogram of /metrics.

Rates need two readings: a front that serves the page samples the counters once a
second, and only while a page polled it within ``IDLE_S``; with no page open it samples
nothing, so the page costs the hot path nothing when closed and a counter read a second
when open. Samples of the last minute give the error counts "in the last minute".
"""
from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import deque
from pathlib import Path

from gpserve.workers.batch_check import VERDICTS, verdict

from . import __version__
from .protocol.messages import type_name

STATIC = Path(__file__).parent / "status"
FILES = {"page.html": "text/html; charset=utf-8", "page.js": "text/javascript",
         "page.css": "text/css", "icon.svg": "image/svg+xml"}
# The page runs only its own script and style, and talks only to this server.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
SAMPLE_S = 1.0
IDLE_S = 10.0                # sampling stops this long after the page's last poll
RATE_S = 5.0                 # rates are over (about) the last this many seconds
KEEP_S = 61.0


def wants_html(headers) -> bool:
    """A browser's ``GET /``: it asks for text/html (clients asking for JSON, or for
    anything, get the JSON they get today)."""
    accept = next((v for k, v in headers if k == b"accept"), b"")
    return b"text/html" in accept


@functools.cache
def static(name: str) -> tuple[bytes, str]:
    """One of the page's files and its media type (read once); KeyError for any other
    name."""
    return (STATIC / name).read_bytes(), FILES[name]


class StatusSampler:
    """The page's figures, from samples of the shared counters (see the module)."""

    def __init__(self, state):
        self.state = state
        self.samples: deque[dict] = deque()
        self.polled = 0.0
        self.task: asyncio.Task | None = None

    def data(self) -> dict:
        now = time.monotonic()
        self.polled = now
        if self.task is None:
            self.task = asyncio.create_task(self._sample_while_polled())
        if not self.samples or now - self.samples[-1]["t"] >= SAMPLE_S / 2:
            self._sample(now)
        latest = self.samples[-1]
        window = next((s for s in self.samples if latest["t"] - s["t"] <= RATE_S), latest)
        minute = self.samples[0]
        return {"server": self._server(latest, window, minute),
                "models": [self._model(m, latest, window) for m in self.state.served]}

    async def _sample_while_polled(self) -> None:
        try:
            while time.monotonic() - self.polled < IDLE_S:
                await asyncio.sleep(SAMPLE_S)
                self._sample(time.monotonic())
        finally:
            self.task = None
            self.samples.clear()            # a page opened later starts afresh

    def _sample(self, now: float) -> None:
        from . import metrics
        state = self.state
        self.samples.append({
            "t": now, "server": state.counters.snapshot(),
            "requests": metrics.request_seconds_buckets(),
            "models": {id(m): m.counters.statistics() for m in state.served}})
        while now - self.samples[0]["t"] > KEEP_S:
            self.samples.popleft()

    def _server(self, latest: dict, window: dict, minute: dict) -> dict:
        state, counters = self.state, self.state.counters
        seconds = latest["t"] - window["t"]
        errors = {name: n - minute["server"]["errors"].get(name, 0)
                  for name, n in latest["server"]["errors"].items()}
        buckets = [(bound, n - window["requests"].get(bound, 0))
                   for bound, n in latest["requests"].items()]
        return {
            "version": __version__, "this_front": os.getpid(),
            "seconds": round(seconds, 3), "default_model": state.default or None,
            "latency_ms": {"p50": _quantile(buckets, 0.5), "p99": _quantile(buckets, 0.99)},
            "restarts": {"workers": latest["server"]["worker_restarts"],
                         "fronts": latest["server"]["front_restarts"]},
            "errors_last_minute": {k: v for k, v in errors.items() if v},
            "fronts": [{"index": i, "pid": pid, "connections": n,
                        "state": "starting" if n < 0 else "serving"}
                       for i, (pid, n) in enumerate(zip(
                           counters.pids(0, state.cfg.fronts)["fronts"],
                           counters.connections(state.cfg.fronts)))]}

    def _model(self, model, latest: dict, window: dict) -> dict:
        now, then = latest["models"].get(id(model)), window["models"].get(id(model))
        seconds = latest["t"] - window["t"]

        def rate(field: str) -> float | None:
            if now is None or then is None or seconds <= 0:
                return None
            return round((now[field] - then[field]) / seconds, 1)
        counters, cfg, spec = model.counters, model.cfg, model.spec
        snap = counters.snapshot()
        io = lambda specs: [{"name": s.name, "type": type_name(s.dtype), "shape": s.shape}
                            for s in specs]
        found = verdict(spec.batch_probe, counters.batch_checks())
        linked = {w["index"]: w["runs"] for w in model.linked()}
        pids = counters.pids(cfg.workers, 0)["workers"]
        cache = None
        if model.cache is not None:
            totals = counters.cache_totals()
            looked = totals["hits"] + totals["misses"]
            cache = [{"tier": "local (LMDB)", "hits": totals["hits"],
                      "misses": totals["misses"],
                      "hit_rate": round(totals["hits"] / looked, 4) if looked else None}]
            if model.cache.shared is not None:          # looked up for the local misses
                shared = totals["shared_hits"] + totals["shared_misses"]
                cache.append({"tier": "shared (Redis)", "hits": totals["shared_hits"],
                              "misses": totals["shared_misses"],
                              "errors": totals["shared_errors"],
                              "hit_rate": round(totals["shared_hits"] / shared, 4)
                              if shared else None})
        return {
            "name": model.name, "version": model.version, "state":
                "READY" if model.ready else "UNAVAILABLE",
            "backend": spec.backend, "placement": cfg.placement,
            "inputs": io(spec.inputs), "outputs": io(spec.outputs),
            "requests_per_s": rate("success_count"), "rows_per_s": rate("inferences"),
            "failed_per_s": rate("fail_count"),
            "queue_rows": snap["queued_rows"], "batches": snap["batches"],
            "batch_sizes": snap["batch_size_histogram"],
            "padded_rows": snap["padded_rows"], "batched_rows": snap["batched_rows"],
            "batching": {"enabled": spec.batchable and cfg.batching != "off",
                         "max_batch": cfg.max_batch, "max_delay_ms": cfg.max_delay_ms,
                         "invariant": found["invariant"],
                         "verdict": VERDICTS[found["invariant"]],
                         "max_difference": found["max_difference"]},
            "cache": cache,
            "workers": [{"index": i, "pid": pid, "ready": counters.worker_is_ready(i),
                         "runs": linked.get(i, "")} for i, pid in enumerate(pids)]}


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound (ms) of the histogram bucket holding quantile ``q`` of the
    requests counted in ``buckets`` ((bound s, count) pairs, not cumulative); None:
    no request."""
    total = sum(n for _, n in buckets)
    if total <= 0:
        return None
    seen = 0.0
    for bound, n in sorted(buckets):
        seen += n
        if seen >= q * total:
            return None if bound == float("inf") else round(bound * 1e3, 3)
    return None
