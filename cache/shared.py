"""The row cache's shared tier: one Redis for every replica, behind each front's LMDB.

Lookup order: LMDB (local, microseconds), then Redis, then the model. A row the model
computed is written to both (by the LMDB writer thread, after its own write: the same
sealed value, with its checksum); a row found in Redis is written to LMDB. The keys
are LMDB's (model fingerprint, config, the row's bytes), so a replica never serves a row
another model or version computed, and a value that fails its checksum is a miss,
counted as corrupt, computed again and rewritten.

One round trip a request: ``MGET`` of its missing rows, on the front's event loop
(``redis.asyncio`` with hiredis), bounded by ``--cache-shared-timeout-ms``; writes are
pipelined ``SET`` with ``--cache-shared-ttl-s``, from the writer thread. A slow, absent
or refusing Redis never makes a request wait past that bound: the lookup is given up,
counted (``gpserve_cache_errors_total{tier="shared"}``), logged once, and the tier is
skipped until a connection made in the background (every ``RETRY_S``) works again: no
request waits for a connection, at start or after an outage. Eviction is
Redis's own (``maxmemory`` with an LRU or LFU policy: docs/cache.md).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from .values import CORRUPT, rows_of

log = logging.getLogger("gpserve.cache")
RETRY_S = 1.0                 # after a failure, the tier is skipped this long
CONNECT_S = 1.0               # a (re)connection in the background may take this long
MAX_PENDING_WRITES = 64       # write batches queued for Redis; more are dropped, counted


class SharedTier:
    """A front's handle on the shared tier for one model version."""

    def __init__(self, url: str, timeout_ms: float, ttl_s: int, counters, front_index: int,
                 model_metrics):
        import redis
        import redis.asyncio as aioredis
        self.url, self.timeout = _redacted(url), timeout_ms / 1000
        self.ttl = ttl_s or None
        options: dict = dict(socket_timeout=max(self.timeout, 0.05),
                             socket_connect_timeout=max(self.timeout, 0.05),
                             retry_on_timeout=False, health_check_interval=0)
        self.reader = aioredis.Redis.from_url(url, **options)
        self.writer = redis.Redis.from_url(url, **options)      # the LMDB writer thread's
        self.counters, self.front_index, self.measured = counters, front_index, model_metrics
        self.ready = False              # connected, and its last call worked
        self.down_until = 0.0           # no new connection attempt before then
        self.down_since: float | None = None
        self.last_error = ""
        self.probing: asyncio.Task | None = None

    def start(self) -> None:
        """Connect in the background (on the front's event loop): no request pays for
        connecting, now or after an outage."""
        self._probe()

    def _probe(self) -> None:
        if self.probing is None:
            self.probing = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await asyncio.wait_for(self.reader.ping(), CONNECT_S)
        except Exception as e:
            self._failed(f"connect: {type(e).__name__}: {e}")
        else:
            self._up()
        finally:
            self.probing = None

    # -- reads (request path) ----------------------------------------------------------
    async def lookup(self, keys: list[bytes], outputs: list[str]):
        """(for each key the rows of ``outputs`` or None, the (key, value) pairs found
        sound, for LMDB). Never raises; never waits past the timeout."""
        found: list = [None] * len(keys)
        if not self.ready:                      # down, or not connected yet: the model
            if time.monotonic() >= self.down_until:
                self._probe()
            return found, []
        started = time.perf_counter_ns()
        try:
            values = await asyncio.wait_for(self.reader.mget(keys), self.timeout)
        except Exception as e:                  # down, slow, refusing, wrong password
            self._failed(f"lookup: {type(e).__name__}: {e}")
            return found, []
        sound, corrupt = [], 0
        for i, value in enumerate(values):
            if value is None:
                continue
            rows = rows_of(cast(bytes, value), outputs)   # bytes: not decoded to str
            if rows is CORRUPT:
                corrupt += 1
            elif rows is not None:
                found[i] = rows
                sound.append((keys[i], value))
        if corrupt:
            self.counters.add_cache(self.front_index, corrupt=corrupt)
            self.measured.cache_corrupt.inc(corrupt)
        hits = len(sound)
        self.counters.add_cache(self.front_index, shared_hits=hits,
                                shared_misses=len(keys) - hits,
                                shared_ns=time.perf_counter_ns() - started)
        return found, sound

    # -- writes (the LMDB writer thread) -----------------------------------------------
    def write(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Rows the model computed, as sealed for LMDB: one pipelined round trip."""
        if not pairs or not self.ready:
            return
        try:
            with self.writer.pipeline(transaction=False) as pipe:
                for key, value in pairs:
                    pipe.set(key, value, ex=self.ttl)
                pipe.execute()
        except Exception as e:
            self._failed(f"write: {type(e).__name__}: {e}")

    # -- state ---------------------------------------------------------------------------
    def _failed(self, why: str) -> None:
        self.ready = False
        self.down_until = time.monotonic() + RETRY_S
        self.counters.add_cache(self.front_index, shared_errors=1)
        self.measured.shared_errors.inc()
        self.last_error = why
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error("the shared row cache (%s) failed: %s; serving without it, trying "
                      "again every %.0f s", self.url, why, RETRY_S)

    def _up(self) -> None:
        self.ready = True
        if self.down_since is not None:
            log.warning("the shared row cache (%s) is back after %.1f s", self.url,
                        time.monotonic() - self.down_since)
            self.down_since = None

    def stats(self) -> dict:
        return {"url": self.url, "up": self.ready, "last_error": self.last_error}


def _redacted(url: str) -> str:
    """The URL as logs may show it: without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':***' if user else '***'}@{host}"
