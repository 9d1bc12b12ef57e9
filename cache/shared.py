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
counted (``gpserve_cache_errors_total{tier="shared"}``). A lookup that timed out only
sends its request on to the model; a refused connection, a wrong password or
``STALLED_AFTER`` timeouts in a row take the tier down: logged once, skipped until a
connection made in the background (every ``RETRY_S``) works again. No request waits for
a connection, at start or after an outage. Eviction is
Redis's own (``maxmemory`` with an LRU or LFU policy: docs/cache.md).

A stream of rows never seen anywhere (every lookup empty) would pay the round trip for
nothing: about a tenth of the rows/s of 110 KB OCR rows on 2 cores. After
``MissStreak.WINDOW`` lookups in a row found nothing, only one in ``SAMPLE`` goes to
Redis until one finds a row (``shared_skipped`` counts the others).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from redis.exceptions import TimeoutError as RedisTimeout

from .values import CORRUPT, rows_of

log = logging.getLogger("gpserve.cache")
RETRY_S = 1.0                 # after a failure, the tier is skipped this long
CONNECT_S = 1.0               # a (re)connection in the background may take this long
WRITE_S = 1.0                 # a write (the writer thread's, off the request path)
STALLED_AFTER = 3             # lookups timed out in a row: the tier counts as down


class MissStreak:
    """Whether a lookup is worth its round trip. Pure: the tier tells it what each
    lookup found. After ``WINDOW`` lookups in a row found nothing, only every
    ``SAMPLE``-th is made, until one finds a row: a workload whose rows repeat across
    replicas keeps every lookup; one whose rows are all new pays for one in ``SAMPLE``
    (and a row another replica computed meanwhile is found at most ``SAMPLE`` requests
    late)."""

    WINDOW = 256
    SAMPLE = 16

    def __init__(self) -> None:
        self.empty = 0            # lookups in a row that found nothing
        self.passed = 0           # lookups skipped since the last one made

    def worth_it(self) -> bool:
        if self.empty < self.WINDOW:
            return True
        self.passed += 1
        if self.passed < self.SAMPLE:
            return False
        self.passed = 0
        return True

    def found(self, hits: int) -> None:
        self.empty = 0 if hits else self.empty + 1


class SharedTier:
    """A front's handle on the shared tier for one model version."""

    def __init__(self, url: str, timeout_ms: float, ttl_s: int, counters, front_index: int,
                 model_metrics):
        import redis
        import redis.asyncio as aioredis
        self.url, self.timeout = _redacted(url), timeout_ms / 1000
        self.ttl = ttl_s or None
        options: dict = dict(socket_connect_timeout=CONNECT_S, retry_on_timeout=False,
                             health_check_interval=0)
        self.reader = aioredis.Redis.from_url(url, socket_timeout=CONNECT_S, **options)
        self.writer = redis.Redis.from_url(url, socket_timeout=WRITE_S,   # the LMDB writer
                                           **options)                   # thread's
        self.timeouts = 0               # lookups timed out in a row
        self.counters, self.front_index, self.measured = counters, front_index, model_metrics
        self.ready = False              # connected, and its last call worked
        self.down_until = 0.0           # no new connection attempt before then
        self.down_since: float | None = None
        self.last_error = ""
        self.probing: asyncio.Task | None = None
        self.streak = MissStreak()

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
    async def lookup(self, keys: list[bytes], outputs: list[str], compute_s: float = 0.0):
        """(for each key the rows of ``outputs`` or None, the (key, value) pairs found
        sound, for LMDB). Never raises; waits at most the timeout, or ``compute_s`` (what
        computing the rows takes now) when that is longer: a loaded front answers
        lookups late, and computing would not be sooner."""
        found: list = [None] * len(keys)
        if not self.ready:                      # down, or not connected yet: the model
            if time.monotonic() >= self.down_until:
                self._probe()
            return found, []
        if not self.streak.worth_it():          # rows never seen anywhere, lately
            self.counters.add_cache(self.front_index, shared_skipped=len(keys))
            return found, []
        started = time.perf_counter_ns()
        try:
            values = await asyncio.wait_for(self.reader.mget(keys),
                                            max(self.timeout, compute_s))
        except (TimeoutError, RedisTimeout):    # slow: this request goes on to the model
            self.timeouts += 1
            self._failed(f"lookup: no answer within {max(self.timeout, compute_s) * 1e3:.1f} "
                         "ms (--cache-shared-timeout-ms, or the model's time)",
                         down=self.timeouts >= STALLED_AFTER)
            return found, []
        except Exception as e:                  # down, refusing, wrong password
            self._failed(f"lookup: {type(e).__name__}: {e}")
            return found, []
        self.timeouts = 0
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
        self.streak.found(hits)
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
        except Exception as e:                  # timed out: counted; else down too
            self._failed(f"write: {type(e).__name__}: {e}",
                         down=not isinstance(e, (TimeoutError, RedisTimeout)))

    # -- state ---------------------------------------------------------------------------
    def _failed(self, why: str, down: bool = True) -> None:
        """Counted; ``down``: skip the tier until a background connection works."""
        self.counters.add_cache(self.front_index, shared_errors=1)
        self.measured.shared_errors.inc()
        self.last_error = why
        if not down:
            return
        self.ready = False
        self.timeouts = 0
        self.down_until = time.monotonic() + RETRY_S
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
