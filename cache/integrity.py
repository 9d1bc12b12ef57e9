"""Whether a cache file can be mapped safely, and what to do with one that cannot.

LMDB maps ``data.mdb`` and follows page numbers from its meta pages without checking
them against the file's size: a file cut short (a full disk, a careless copy, a
``truncate``) makes the first read past its end a ``SIGBUS`` that kills the process,
and every restarted front dies the same way. So before a front maps an environment it
reads the two meta pages itself and checks them against the file: the magic and
version LMDB writes, a sane page size, and that the newest meta's last page lies inside
the file. An environment that fails (or that LMDB then refuses to open) is moved aside,
never deleted, to ``<name>.damaged-<time>-<pid>`` beside it, and the front opens a fresh
one: the cache is rebuilt from traffic, and the operator keeps the file to look at.

Fronts check under an exclusive ``flock`` on ``<name>.lock`` beside the environment,
so of several fronts starting together exactly one moves a damaged environment aside
and the others open the fresh one. The layout read here is LMDB's (``lmdb.h``,
``mdb.c``: ``MDB_meta`` after a 16-byte page header; 64-bit builds).
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("gpserve.cache")

MAGIC = 0xBEEFC0DE          # MDB_MAGIC
DATA_VERSION = 1            # MDB_DATA_VERSION
_HEADER = 16                # the page header before MDB_meta
_MAGIC_AT = _HEADER         # mm_magic, mm_version: uint32 each
_PSIZE_AT = _HEADER + 24    # mm_dbs[FREE_DBI].md_pad holds the page size
_LAST_AT = _HEADER + 120    # mm_last_pg, then mm_txnid: uint64 each
_MIN_PAGE, _MAX_PAGE = 512, 1 << 16


def _meta(raw: bytes, at: int) -> tuple[int, int, int] | None:
    """(page size, last page, txnid) of the meta page at ``at``, or None if it is not one."""
    if len(raw) < at + _LAST_AT + 16:
        return None
    magic, version = struct.unpack_from("<II", raw, at + _MAGIC_AT)
    (psize,) = struct.unpack_from("<I", raw, at + _PSIZE_AT)
    last, txnid = struct.unpack_from("<QQ", raw, at + _LAST_AT)
    if magic != MAGIC or version != DATA_VERSION:
        return None
    if not _MIN_PAGE <= psize <= _MAX_PAGE or psize & (psize - 1):
        return None
    return psize, last, txnid


def damage(env_dir: Path) -> str | None:
    """Why the environment's ``data.mdb`` cannot be mapped safely, or None (sound, or no
    file yet: LMDB creates one)."""
    data = Path(env_dir) / "data.mdb"
    try:
        with open(data, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(_MAX_PAGE + _LAST_AT + 16)
    except FileNotFoundError:
        return None
    if size == 0:
        return None                        # created but never written: LMDB initialises it
    m0 = _meta(first, 0)
    if m0 is None:
        return f"{data} is not an LMDB data file (no valid meta page at its start)"
    psize = m0[0]
    metas = [m for m in (m0, _meta(first, psize)) if m is not None and m[0] == psize]
    _, last, txnid = max(metas, key=lambda m: m[2])      # the one LMDB opens with
    need = (last + 1) * psize
    if size < need:
        return (f"{data} is {size} bytes, but its newest meta page (transaction {txnid}) "
                f"needs {need}: the file was cut short")
    return None


def move_aside(env_dir: Path, why: str) -> Path:
    """Rename a damaged environment out of the way (kept for the operator, not deleted)."""
    env_dir = Path(env_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = env_dir.with_name(f"{env_dir.name}.damaged-{stamp}-{os.getpid()}")
    os.rename(env_dir, target)
    log.error("row cache %s cannot be trusted (%s): moved aside to %s; serving with a "
              "fresh cache", env_dir, why, target)
    return target


@contextmanager
def exclusive(env_dir: Path):
    """Hold ``<name>.lock`` beside the environment: one process checks (and moves aside)
    at a time."""
    env_dir = Path(env_dir)
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(env_dir.with_name(env_dir.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
