"""System shared memory (Triton's extension): a client on this host puts a tensor in a
POSIX shared-memory region, registers the region once, then sends only a reference
(region, offset, byte size); outputs can be written into a region the same way.

Trust nothing (docs/open-inference-protocol.md):
- off unless the server runs with ``--shm-clients``; then, by default, only for clients
  on this host, and behind a header when the operator sets one (``restricted.py``);
- a key names a file directly under ``/dev/shm`` (no other folder, no symbolic link),
  a regular file owned by the user the server runs as with exactly one link, that is
  none of the server's own segments under any name (they hold other requests);
- a key that cannot be used gets one answer, whatever the reason, so that nothing is
  learnt about files that were never registered;
- offsets and sizes are integers below 2**62, checked without overflow, and the
  registration's offset is applied once, at the use;
- every use is checked against the registered size and against the file's size then;
- an output is written only into the registration the request was decoded against: a
  region unregistered or registered again while the request ran is an error, not a
  write into the new file;
- regions are never mapped: inputs are read with ``preadv`` straight into the front's
  arena (1 copy, where the worker reads them), outputs written with ``pwrite`` (1 copy,
  instead of the copy into a response body). A client that truncates, replaces or
  unregisters a region while a request uses it gets a short read and a clear error;
  no process of the server can fault on a mapping that shrank under it.

Registrations are shared by every front (a client's register and infer calls may land
on different fronts): one small JSON file per region in the run's folder under
``/dev/shm``, written atomically, removed with the run.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import uuid

import orjson

from gpserve.errors import ProtocolError
from gpserve.shm import PREFIX, SHM_DIR, segment_path

MAX_REGIONS = 1024
MAX_OFFSET = 1 << 62          # offsets and sizes: far past any file, far from overflow


class SharedMemoryError(ProtocolError):
    """A register call or a region reference that cannot be honoured (HTTP 400)."""


class NoSuchRegion(SharedMemoryError):
    http_status = 404


class ClientRegions:
    """The registered regions of one server run, as every front sees them."""

    def __init__(self, run_id: str, enabled: bool):
        self.enabled = enabled
        self.folder = segment_path(run_id, "client-regions")
        if enabled:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)

    # -- the registry ------------------------------------------------------------------
    def register(self, name: str, key, offset, byte_size) -> None:
        self._check_on()
        if not isinstance(key, str) or not key:
            raise SharedMemoryError("'key' must name a POSIX shared-memory object, e.g. "
                                    "'/input0'")
        _non_negative(f"region {name!r}", offset=offset, byte_size=byte_size)
        if os.path.exists(self._entry(name)):
            raise SharedMemoryError(f"region {name!r} is already registered; unregister "
                                    "it first")
        if len(os.listdir(self.folder)) >= MAX_REGIONS:
            raise SharedMemoryError(f"{MAX_REGIONS} regions are registered, the most this "
                                    "server takes; unregister some")
        fd = _open(key)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in _server_segments():      # ours, by another name
                raise _unusable(key)
            if offset + byte_size > st.st_size:
                raise SharedMemoryError(
                    f"region {name!r}: offset {offset} + byte_size {byte_size} is past the "
                    f"end of {key!r} ({st.st_size} bytes)")
        finally:
            os.close(fd)
        entry = {"name": name, "key": key, "offset": offset, "byte_size": byte_size,
                 "inode": [st.st_dev, st.st_ino], "id": uuid.uuid4().hex}
        tmp = os.path.join(self.folder, f".{entry['id']}")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(entry))
        try:
            os.link(tmp, self._entry(name))           # atomic; fails if one raced us
        except FileExistsError:
            raise SharedMemoryError(f"region {name!r} is already registered") from None
        finally:
            os.unlink(tmp)

    def unregister(self, name: str | None) -> None:
        """One region, or (``None``) every region."""
        self._check_on()
        names = [name] if name is not None else [e["name"] for e in self.status(None)]
        for n in names:
            try:
                os.unlink(self._entry(n))
            except FileNotFoundError:
                if name is not None:
                    raise NoSuchRegion(f"no registered region {name!r}") from None

    def status(self, name: str | None) -> list[dict]:
        self._check_on()
        if name is not None:
            return [_public(self._lookup(name))]
        out = []
        for file in sorted(os.listdir(self.folder)):
            if not file.startswith("."):
                try:
                    out.append(_public(self._read(os.path.join(self.folder, file))))
                except FileNotFoundError:
                    pass
        return out

    # -- use ---------------------------------------------------------------------------
    def read(self, name: str, offset, nbytes, alloc, where: str) -> memoryview:
        """``nbytes`` of a registered region, read into ``alloc(nbytes)`` (called once
        the reference is known good; 1 copy, kernel to that buffer)."""
        with self._use(name, offset, nbytes, where, os.O_RDONLY) as (fd, at):
            dst = alloc(nbytes)
            got = os.preadv(fd, [dst], at) if nbytes else 0
            if got != nbytes:
                raise SharedMemoryError(f"{where}: region {name!r} ended after {got} of "
                                        f"{nbytes} bytes (was its file truncated?)")
            return dst

    def registration(self, name: str) -> str:
        """The id of a region's registration now: a request that will write into the
        region takes it when decoded, and ``write`` refuses any other."""
        self._check_on()
        return self._lookup(name)["id"]

    def write(self, name: str, offset, nbytes, data: memoryview, where: str,
              registration: str | None = None) -> None:
        """Write ``data`` (at most ``nbytes``) into a registered region (1 copy), if it
        is still the ``registration`` the request was decoded against."""
        with self._use(name, offset, nbytes, where, os.O_RDWR, registration) as (fd, at):
            if len(data) > nbytes:
                raise SharedMemoryError(f"{where}: the output has {len(data)} bytes; its "
                                        f"shared_memory_byte_size is {nbytes}")
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], at + done)

    @contextlib.contextmanager
    def _use(self, name, offset, nbytes, where, mode, registration=None):
        """(the region's open file, where the bytes are in it), for one read or write."""
        self._check_on()
        _non_negative(where, shared_memory_offset=offset, shared_memory_byte_size=nbytes)
        entry = self._lookup(name)
        if registration is not None and entry["id"] != registration:
            raise SharedMemoryError(f"{where}: region {name!r} was unregistered and "
                                    "registered again while the request ran; nothing "
                                    "written")
        if offset + nbytes > entry["byte_size"]:
            raise SharedMemoryError(
                f"{where}: offset {offset} + {nbytes} bytes is past the end of region "
                f"{name!r} ({entry['byte_size']} bytes)")
        try:
            fd = _open(entry["key"], mode)
        except SharedMemoryError:
            raise SharedMemoryError(f"{where}: region {name!r}'s file {entry['key']!r} is "
                                    "gone or no longer usable; register it again") from None
        st = os.fstat(fd)
        if [st.st_dev, st.st_ino] != entry["inode"]:
            os.close(fd)
            raise SharedMemoryError(f"{where}: region {name!r}'s file {entry['key']!r} was "
                                    "replaced since it was registered; register it again")
        try:
            yield fd, entry["offset"] + offset
        finally:
            os.close(fd)

    def _lookup(self, name: str) -> dict:
        try:
            entry = self._read(self._entry(name))
        except FileNotFoundError:
            entry = None
        if entry is None or entry["name"] != name:
            raise NoSuchRegion(f"no registered region {name!r}")
        return entry

    @staticmethod
    def _read(path: str) -> dict:
        with open(path, "rb") as f:
            return orjson.loads(f.read())

    def _entry(self, name) -> str:
        """The registration's file: named by a hash of the region's name (any name fits
        a file name; the entry holds the name itself, checked on lookup)."""
        if not isinstance(name, str) or not name or len(name) > 255:
            raise SharedMemoryError(f"a region name must be 1 to 255 characters, not {name!r}")
        return os.path.join(self.folder, hashlib.sha256(name.encode()).hexdigest())

    def _check_on(self) -> None:
        if not self.enabled:
            raise SharedMemoryError("system shared memory is off on this server: it lets "
                                    "local clients hand over tensors by reference; start "
                                    "gpserve with --shm-clients to allow it")


def _non_negative(where: str, **values) -> None:
    for what, v in values.items():
        if type(v) is not int or not 0 <= v < MAX_OFFSET:
            raise SharedMemoryError(f"{where}: {what} must be a non-negative integer "
                                    f"below 2**62, not {v!r}")


def _unusable(key: str) -> SharedMemoryError:
    """One answer for every key that cannot be used, so that it tells nothing about files
    that were never registered (whether they exist, whose they are)."""
    return SharedMemoryError(
        f"key {key!r} cannot be used as a shared-memory region: it must name an existing "
        f"regular file directly under {SHM_DIR}, owned by the user this server runs as, "
        "with one link, and not one of the server's own")


def _open(key: str, mode: int = os.O_RDONLY) -> int:
    """The file of a shared-memory key, if a client may name it (see the module doc)."""
    base = key[1:] if key.startswith("/") else key
    if not base or "/" in base or base in (".", "..") or "\0" in base:
        raise SharedMemoryError(f"key {key!r} must name a file directly under {SHM_DIR} "
                                "(e.g. '/input0')")
    if base.startswith(PREFIX):
        raise _unusable(key)
    try:
        fd = os.open(os.path.join(SHM_DIR, base),     # never a link; never waits (a FIFO)
                     mode | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise _unusable(key) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1:
        os.close(fd)
        raise _unusable(key)
    return fd


def _server_segments() -> set[tuple[int, int]]:
    """(device, inode) of every gpserve segment in /dev/shm (any run of this user)."""
    out = set()
    for name in os.listdir(SHM_DIR):
        if name.startswith(PREFIX):
            try:
                st = os.lstat(os.path.join(SHM_DIR, name))
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


def _public(entry: dict) -> dict:
    return {k: entry[k] for k in ("name", "key", "offset", "byte_size")}
