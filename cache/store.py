"""The LMDB row cache: one environment per model on the host, shared by all fronts.

Each front process opens the environment itself (after ``spawn``; an environment must
not cross a fork). Reads run in the request path; writes go to a thread of the front,
so they never delay the response they come from, and are grouped into one LMDB write
transaction per wake-up. LMDB serialises writers across processes with its own lock.

Values are a row's outputs sealed with a checksum (:mod:`.values`). A value whose
checksum fails (a damaged page, a stray write) is a miss, counted (``corrupt`` in
``GET /``, ``gpserve_cache_corrupt_rows_total``) and logged once per front; the row is
computed again and rewritten. A file LMDB cannot map safely (cut short, not LMDB's) is
moved aside before it is opened (:mod:`.integrity`).

Bound and eviction (generations, an LRU approximation): rows go to the *current* of two
named databases (which one is recorded in the ``meta`` database, read and written in the
same transaction as the rows); lookups try the current, then the *old* one, and a hit in
the old one is copied forward. When the current passes 40% of ``--cache-size-mb``, the
old one is cleared (its pages become free for reuse) and the roles swap, so the two
together stay under 80% of the map and a rotation always has room for its own pages.
The map size is the bound, so the file never grows past it. A write that still finds
the map full clears the old generation and retries, then both; it never reaches a client.

The writer thread never dies: a failed write is logged, counted (``errors`` in
``GET /``, with the last message) and dropped, and the next write tries again. If the
cache cannot be opened at all (unwritable directory, full disk, corrupt or foreign
file) the front logs it once and serves without it.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import lmdb
import numpy as np

from gpserve import metrics

from . import integrity
from .environment import environment_stats, open_environment, pages
from .values import CORRUPT, merged, rows_of

log = logging.getLogger("gpserve.cache")
WATCH_EVERY_S = 1.0           # the writer checks the file against the map when idle
ROTATE_AT = 0.4               # of the map size, for the current generation
GENERATIONS = (b"gen0", b"gen1")


class Handles(NamedTuple):
    """An open environment and its databases, swapped whole when a damaged file is
    replaced: a reader takes all three at once, never one old and one new."""

    env: lmdb.Environment
    meta: Any                          # which generation is current (an lmdb database)
    gens: list                         # the two generations of rows


def _current(txn, meta) -> int:
    return 1 if txn.get(b"current", db=meta) == b"1" else 0


class RowCache:
    """A front's handle on the shared row cache, with its own writer thread."""

    def __init__(self, path: Path, size_mb: int, counters, front_index: int,
                 model_metrics: metrics.ModelMetrics | None = None, shared=None):
        """``shared``: the shared tier (cache/shared.py) the rows computed here are
        written to as well, after LMDB."""
        self.shared = shared
        self.path, self.size_mb = path, size_mb
        self.counters, self.front_index = counters, front_index
        self.measured = model_metrics or metrics.ModelMetrics.of("", 1)
        self.enabled = False
        self._told = False                 # the "disabled" error is logged once
        self._told_corrupt = False         # and the first row that failed its checksum
        self.last_error = ""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        try:
            self._open()
        except (lmdb.Error, OSError) as e:
            self._disable(f"cannot open {path}: {type(e).__name__}: {e}")
            return
        self.enabled = True
        threading.Thread(target=self._write_loop, name="row-cache-writer", daemon=True).start()

    def _open(self) -> None:
        """Open the environment, after checking that its file can be mapped safely; a
        damaged one (or one LMDB refuses) is moved aside and a fresh one opened."""
        with integrity.exclusive(self.path):
            why = integrity.damage(self.path)
            if why is not None:
                integrity.move_aside(self.path, why)
            try:
                env = open_environment(self.path, self.size_mb)
            except lmdb.Error as e:               # not LMDB's, or a version of its own
                integrity.move_aside(self.path, f"LMDB cannot open it: {e}")
                env = open_environment(self.path, self.size_mb)
            self.db = Handles(env, env.open_db(b"meta"), [env.open_db(n) for n in GENERATIONS])
            # the mapped file itself, for _watch_file (the path may name a new one later)
            self._mapped = os.open(self.path / "data.mdb", os.O_RDONLY | os.O_CLOEXEC)
            self._watched = time.monotonic()

    @property
    def env(self) -> lmdb.Environment:
        return self.db.env

    @property
    def gens(self) -> list:
        return self.db.gens

    def _disable(self, why: str) -> None:
        if not self._told:
            log.error("row cache disabled, serving without it: %s", why)
            self._told = True
        self.enabled = False
        self._count_error(why)

    def _count_error(self, why: str) -> None:
        """Every cache failure: GET / (errors, last_error) and /metrics."""
        self.last_error = why
        self.counters.add_cache(self.front_index, errors=1)
        self.measured.cache_errors.inc()

    # -- reads (request path) ----------------------------------------------------------
    def lookup(self, keys: list[bytes], outputs: list[str]) -> list[list[np.ndarray] | None]:
        """For each key, the rows of ``outputs`` (views of private copies), or None."""
        found: list[list[np.ndarray] | None] = [None] * len(keys)
        if not self.enabled:
            return found
        promote, corrupt = [], 0
        try:
            env, meta, gens = self.db
            with env.begin() as txn:
                current = _current(txn, meta)
                first, second = gens[current], gens[1 - current]
                for i, key in enumerate(keys):
                    value = txn.get(key, db=first)
                    old = value is None
                    if old:
                        value = txn.get(key, db=second)
                    if value is None:
                        continue
                    rows = rows_of(value, outputs)
                    if rows is CORRUPT:
                        corrupt += 1
                        continue
                    found[i] = rows
                    if old:                          # checked: copied forward as it is
                        promote.append((key, value))
        except (lmdb.Error, OSError) as e:
            self._disable(f"read failed: {type(e).__name__}: {e}")
            return [None] * len(keys)
        if corrupt:
            self._corrupt(corrupt)
        hits = sum(f is not None for f in found)
        self.counters.add_cache(self.front_index, hits=hits, misses=len(keys) - hits)
        if promote:
            self._queue.put(("raw", promote))
        return found

    def _corrupt(self, rows: int) -> None:
        self.counters.add_cache(self.front_index, corrupt=rows)
        self.measured.cache_corrupt.inc(rows)
        if not self._told_corrupt:
            self._told_corrupt = True
            log.error("row cache %s: a stored row failed its checksum (a damaged file?); "
                      "answered as a miss and computed again (counted as 'corrupt' in "
                      "GET / and gpserve_cache_corrupt_rows_total; said once)", self.path)

    # -- writes (writer thread) ----------------------------------------------------------
    def store(self, keys: list[bytes], outputs: list[str], arrays: list[np.ndarray]) -> None:
        """Queue computed rows for writing; ``arrays`` must be private (not shared memory)."""
        if self.enabled and keys:
            self._queue.put(("rows", (keys, outputs, arrays)))

    def _write_loop(self) -> None:
        while True:
            if time.monotonic() - self._watched >= WATCH_EVERY_S:
                self._watch_file()
            try:
                items = [self._queue.get(timeout=WATCH_EVERY_S)]
            except queue.Empty:
                continue
            while not self._queue.empty() and len(items) < 256:
                items.append(self._queue.get())
            flushes = [payload for kind, payload in items if kind in ("flush", "close")]
            closing = any(kind == "close" for kind, _ in items)
            items = [item for item in items if item[0] in ("rows", "raw")]
            for group in self._groups(items):
                if not self.enabled:
                    break
                try:
                    self._write_with_room(group)
                except Exception as e:        # never let the writer die: count, say, go on
                    self._failed(f"{type(e).__name__}: {e}")
            if closing:                       # the rows queued before are written
                self.enabled = False
                self.env.close()
                os.close(self._mapped)
            for done in flushes:
                done.set()
            if closing:
                return

    def _watch_file(self) -> None:
        """The mapped file cut short while serving (another process truncated it): stop
        reading it, move it aside and open a fresh environment, before a read past its
        end kills this front (SIGBUS). Checked once a second by the writer thread; a
        read in the instant between the cut and the check can still fault, and the
        supervisor then restarts the front, which checks before it maps."""
        self._watched = time.monotonic()
        if not self.enabled:
            return
        env = self.db.env
        try:
            mapped = os.fstat(self._mapped)
            need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        except (lmdb.Error, OSError):
            return
        if mapped.st_size >= need:
            return
        self.enabled = False
        why = f"{self.path / 'data.mdb'} shrank to {mapped.st_size} bytes under a running " \
              f"server (its pages need {need})"
        try:
            with integrity.exclusive(self.path):
                try:
                    still_ours = os.stat(self.path / "data.mdb").st_ino == mapped.st_ino
                except FileNotFoundError:
                    still_ours = False
                if still_ours:                    # no other front moved it yet
                    integrity.move_aside(self.path, why)
            os.close(self._mapped)
            self._open()              # the old environment stays mapped: readers may hold it
        except (lmdb.Error, OSError) as e:
            self._disable(f"cannot open a fresh cache after {why}: {type(e).__name__}: {e}")
            return
        self.enabled = True

    def _groups(self, items):
        """Items in transactions of at most a tenth of the map each: a transaction's pages
        must fit beside both generations (80% of the map at most)."""
        limit = (self.size_mb << 20) // 10
        group: list = []
        size = 0
        for kind, payload in items:
            n = (sum(len(v) for _, v in payload) if kind == "raw"
                 else sum(a.nbytes for a in payload[2]))
            if group and size + n > limit:
                yield group
                group, size = [], 0
            group.append((kind, payload))
            size += n
        if group:
            yield group

    def _write_with_room(self, items) -> None:
        """Write; on a full map clear the old generation and retry, then both."""
        try:
            return self._write(items)
        except lmdb.MapFullError:
            pass
        for clear_both in (False, True):
            self._rotate(clear_both)
            try:
                return self._write(items)
            except lmdb.MapFullError:
                pass
        self._failed(f"{len(items)} writes larger than --cache-size-mb "
                     f"{self.size_mb} even in an empty cache; dropped")

    def _failed(self, why: str) -> None:
        if why != self.last_error:            # logged once per distinct failure
            log.error("row cache write failed, rows dropped (the cache goes on): %s", why)
        self._count_error(why)

    def _write(self, items) -> None:
        env, meta, gens = self.db
        with env.begin(write=True) as txn:
            db = gens[_current(txn, meta)]
            written, computed = 0, []
            for kind, payload in items:
                if kind == "raw":
                    for key, value in payload:
                        txn.put(key, value, db=db)
                        written += 1
                    continue
                keys, outputs, arrays = payload
                for i, key in enumerate(keys):
                    value = merged(txn.get(key, db=db), list(outputs), [a[i] for a in arrays])
                    txn.put(key, value, db=db)
                    computed.append((key, value))
                    written += 1
            used = pages(txn.stat(db)) * txn.stat(db)["psize"]
            rotate = used > ROTATE_AT * (self.size_mb << 20)
        self.counters.add_cache(self.front_index, writes=written)
        self.measured.cache_bytes.set(used)
        if self.shared is not None:
            self.shared.write(computed)
        if rotate:
            self._rotate(clear_both=False)

    def _rotate(self, clear_both: bool) -> None:
        env, meta, gens = self.db
        with env.begin(write=True) as txn:
            current = _current(txn, meta)
            old = 1 - current
            evicted = txn.stat(gens[old])["entries"]
            txn.drop(gens[old], delete=False)
            if clear_both:
                evicted += txn.stat(gens[current])["entries"]
                txn.drop(gens[current], delete=False)
            txn.put(b"current", str(old).encode(), db=meta)
        # LMDB reuses the pages a transaction freed only from the transaction after next
        # (the last committed snapshot stays readable): commit one more, tiny, so that
        # the very next write can use them.
        with env.begin(write=True) as txn:
            txn.put(b"rotated", str(old).encode(), db=meta)
        self.counters.add_cache(self.front_index, evictions=evicted, rotations=1)
        self.measured.cache_evictions.inc(evicted)
        log.info("row cache: cleared the old generation%s", " and the current" if clear_both
                 else "")

    def stats(self) -> dict:
        """This front's view: the environment's sizes, and its own last write error."""
        if not self.enabled:
            return {"enabled": False, "path": str(self.path)}
        env, _, gens = self.db
        try:
            return {"enabled": True, "path": str(self.path), "last_error": self.last_error,
                    **environment_stats(env, gens)}
        except (lmdb.Error, OSError) as e:
            return {"enabled": True, "path": str(self.path), "error": str(e)}

    def put(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Sealed values found elsewhere (the shared tier), written as they are."""
        if self.enabled and pairs:
            self._queue.put(("raw", pairs))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every write queued before this call is done (tests, a clean stop)."""
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, then close the environment (its model was retired: the
        environment may be opened again, and LMDB allows one handle per process). No
        lookup may follow; returns without waiting."""
        if self.enabled:
            self._queue.put(("close", threading.Event()))
