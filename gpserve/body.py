"""Reading a request body in a front: as it arrived, or streamed into shared memory,
within the body limits (size, a timeout, memory reserved for bodies still arriving)."""
from __future__ import annotations

import asyncio
import zlib

from .config import Config
from .errors import BodyTooLarge, ProtocolError, QueueFull, RequestTimeout, UnsupportedEncoding
from .logs import NOTES
from .regions import Regions, arena_full
from .shm import ALIGN, Arena, Region

STREAM_FROM = 1 << 20      # a body longer than this streams into the arena once this
                           # much of it has come; a shorter one is joined in memory


class BodyReader:
    def __init__(self, cfg: Config, arena: Arena):
        self.cfg, self.arena = cfg, arena
        self.arena_view = memoryview(arena.mm)
        self.unfilled = 0           # arena bytes reserved for bodies not yet arrived

    async def read(self, scope, receive, regions: Regions,
                   align_at: int | None = None) -> memoryview | bytes:
        """The request body; a streamed one occupies arena regions held by ``regions``.
        ``align_at``: a streamed body is placed so that its byte at this offset (where
        an Open Inference Protocol body's binary tensors start) is 64-byte aligned, so
        the tensors can be used where they lie.

        A body that arrives in one ASGI message is used as it is (0 copies here; tensors
        go to shared memory only if a worker needs them, 1 copy, in ``Regions.place``). A
        longer one streams into the arena chunk by chunk (1 copy), so its tensors are
        already in shared memory when decoded. uvicorn's ``receive`` has copied each
        chunk twice on its side before we see it.

        A body that stops arriving for ``--body-timeout-s`` is answered 408. A body of at
        most ``STREAM_FROM`` bytes that comes in pieces is joined in memory (1 copy; its
        tensors go to shared memory when a worker needs them, as for a body in one
        piece) and reserves nothing in the arena. A longer one is read into memory until
        ``STREAM_FROM`` of its bytes have come, and only then reserves its whole length in
        the arena (the bytes so far copied in, the rest streamed there): an idle client
        that announces a huge body holds at most that much, and the bytes reserved and
        not yet arrived, over all of this front's connections, may take at most half
        the arena. So idle announced bodies can refuse other large bodies for a while,
        never the ordinary ones."""
        coding = content_coding(scope["headers"])
        if coding is not None:                      # compressed: whole, then inflated
            plain = {"headers": [(k, v) for k, v in scope["headers"]
                                 if k != b"content-encoding"]}
            return self.inflate(await self.read(plain, receive, regions), coding)
        size = self._declared_size(scope["headers"])
        if _already_here(receive):                  # no waiting, so no timer to set
            chunk, _ = await _receive_chunk(receive)
            return self._whole(chunk, size)
        patience = self.cfg.body_timeout_s
        got = [0]                                   # bytes received, for the 408's message
        try:
            async with asyncio.timeout(patience) as timer:
                chunk, more = await _receive_chunk(receive)
                got[0] = len(chunk)
                if not more:
                    return self._whole(chunk, size)
                pieces, more = await self._gather(chunk, receive, timer, got, size)
                if not more:                        # whole, in memory
                    return self._whole(b"".join(pieces), size)
                assert size is not None, "a body of unknown length is gathered whole"
                return await self._stream(pieces, size, receive, timer, got, regions,
                                          -(align_at or 0) % ALIGN)
        except TimeoutError:
            NOTES.acted("body_timeout", f"answered 408 to requests whose body stopped "
                                        f"arriving for --body-timeout-s {patience:g}")
            raise RequestTimeout(
                f"the body stopped arriving: no bytes for {patience:g} s (--body-timeout-s) "
                f"after {got[0]} of {size if size is not None else '?'} bytes") from None

    async def _gather(self, chunk, receive, timer, got: list,
                      size: int | None) -> tuple[list, bool]:
        """The pieces of a body read into memory (the first piece came with more to
        follow): all of them for a chunked transfer (no Content-Length) or one of at
        most STREAM_FROM bytes; for a longer one, until STREAM_FROM bytes have come.
        (pieces, whether more follow)."""
        limit, patience = self.cfg.max_body_bytes, self.cfg.body_timeout_s
        stop_at = None if size is None or size <= STREAM_FROM else STREAM_FROM
        loop, chunks, more = asyncio.get_running_loop(), [chunk], True
        while more and (stop_at is None or got[0] < stop_at):
            timer.reschedule(loop.time() + patience)
            chunk, more = await _receive_chunk(receive)
            got[0] += len(chunk)
            if got[0] > limit:
                raise self._too_large()
            if size is not None and got[0] > size:
                raise ProtocolError(f"the body is longer than its Content-Length {size}")
            chunks.append(chunk)
        return chunks, more

    async def _stream(self, pieces: list, size: int, receive, timer, got: list,
                      regions: Regions, lead: int):
        """A body of known size in several pieces, the first ``pieces`` already here
        (STREAM_FROM bytes or more, which earned it its reservation), written into the
        arena as they come (1 copy), ``lead`` bytes into its region; its reservation
        counts as unfilled until its bytes are there."""
        patience, loop = self.cfg.body_timeout_s, asyncio.get_running_loop()
        region = self._reserve(size + lead)
        offset = region.offset
        mm, pos, end = self.arena.mm, offset + lead, offset + lead + size
        self.unfilled += size
        more = True                  # the pieces so far came with more to follow
        try:
            for chunk in pieces:
                mm[pos:pos + len(chunk)] = chunk                  # -> shared memory: 1 copy
                pos += len(chunk)
                self.unfilled -= len(chunk)
            while more:
                timer.reschedule(loop.time() + patience)
                chunk, more = await _receive_chunk(receive)
                if pos + len(chunk) > end:
                    raise ProtocolError(f"the body is longer than its Content-Length {size}")
                mm[pos:pos + len(chunk)] = chunk                  # -> shared memory: 1 copy
                pos += len(chunk)
                self.unfilled -= len(chunk)
                got[0] = pos - offset - lead
            if pos != end:
                raise ProtocolError(f"the body ended after {got[0]} of {size} bytes")
        except BaseException:
            region.release()
            raise
        finally:
            self.unfilled -= end - pos
        regions.hold(region)
        return self.arena_view[end - size:end]

    def _declared_size(self, headers) -> int | None:
        """The body's Content-Length (None: chunked), refused past --max-body-mb."""
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is None:
            return None
        try:
            size = int(length)
        except ValueError:
            raise ProtocolError(f"Content-Length {length!r} is not a number") from None
        if size > self.cfg.max_body_bytes:
            raise BodyTooLarge(f"the body is {size} bytes, over --max-body-mb "
                               f"{self.cfg.max_body_mb:g} MiB ({self.cfg.max_body_bytes} "
                               "bytes)")
        return size

    def inflate(self, body, coding: str) -> bytes:
        """A compressed body, decompressed (1 copy, into memory; its tensors then go to
        shared memory as a chunked body's do) to at most ``--max-body-mb``: a small
        body that inflates past it (a compression bomb) stops there."""
        limit = self.cfg.max_body_bytes
        # gzip: a gzip header; deflate: a zlib stream, or a raw one (both are sent)
        wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else (
            zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS)
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error as e:
            raise ProtocolError(f"the body is not valid {coding} data: {e}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise BodyTooLarge(f"the body inflates past --max-body-mb "
                               f"{self.cfg.max_body_mb:g} MiB ({limit} bytes)")
        if not inflater.eof:
            raise ProtocolError(f"the body's {coding} data ends before its stream does")
        return out

    def _whole(self, chunk: bytes, size: int | None) -> bytes:
        """A body that came in one message, checked against its Content-Length."""
        if size is not None and len(chunk) != size:
            raise ProtocolError(f"the body has {len(chunk)} bytes, its Content-Length "
                                f"says {size}")
        if len(chunk) > self.cfg.max_body_bytes:
            raise self._too_large()
        return chunk

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"the body is over --max-body-mb {self.cfg.max_body_mb:g} MiB "
                            f"({self.cfg.max_body_bytes} bytes)")

    def _reserve(self, size: int) -> Region:
        """Arena space for a body of ``size`` bytes that is still to arrive."""
        if self.unfilled + size > self.arena.size // 2:
            NOTES.acted("memory_held_by_slow_bodies",
                        "refused bodies: half of this front's shared memory is reserved for "
                        "bodies still arriving")
            raise QueueFull(
                f"this front's shared memory is held by bodies still arriving "
                f"({self.unfilled} bytes announced and not yet received; at most half of "
                f"{self.arena.size >> 20} MiB); retry later")
        region = self.arena.alloc(size)
        if region is None:
            raise arena_full(self.arena)
        return region


def content_coding(headers) -> str | None:
    """The body's ``Content-Encoding``: None (none, or ``identity``), ``gzip`` or
    ``deflate``; anything else (several codings, brotli) is 415, as Triton answers."""
    values = [v for k, v in headers if k == b"content-encoding"]
    if not values:
        return None
    coding = b",".join(values).strip().lower()
    if coding in (b"", b"identity"):
        return None
    if coding in (b"gzip", b"x-gzip"):
        return "gzip"
    if coding == b"deflate":
        return "deflate"
    raise UnsupportedEncoding(f"Content-Encoding {coding.decode('latin-1')!r} is not "
                              "supported: send gzip, deflate, or an uncompressed body")


def _already_here(receive) -> bool:
    """Whether uvicorn already holds the whole body, so that ``receive()`` returns it at
    once (a small request's body usually comes with its headers): its request cycle
    has seen the message end and has it ready. Read defensively: anything else (another
    server, a uvicorn without these) says no, and the body is awaited under its timer."""
    cycle = getattr(receive, "__self__", None)
    event = getattr(cycle, "message_event", None)
    return (type(event) is asyncio.Event and event.is_set()
            and getattr(cycle, "more_body", True) is False
            and not getattr(cycle, "disconnected", True))


async def _receive_chunk(receive) -> tuple[bytes, bool]:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ProtocolError("the client went away while sending the body")
    return message.get("body", b""), message.get("more_body", False)
