"""Taking connections from the one listening socket, evenly across the fronts.

All fronts accept from the socket the supervisor holds. Left to the event loop, the
first front to wake takes every connection waiting: a client pool that opens 16
connections at once often lands all 16 on one front, and that front serves them alone
while the others idle (docs/benchmarks.md, "Figures behind design choices"). So each
front accepts one connection at a time, and a front
that holds clearly more connections than the least-loaded other front (shared
counters; more by over 2 and over a quarter of its own) waits ``YIELD_S`` first,
which gives that one the first pick; then it accepts anyway, so a busy or stuck front
never leaves a connection waiting. Small differences are let be: with clients that
open a connection per request they are the normal state, and waiting on them made
such clients several times slower. Counting happens per connection, not per request.

The cost: accepting in Python, a few percent of requests/s for clients that open a
connection per request; none for clients that keep connections open, which is how
inference clients and load balancers' upstream pools work.

uvicorn still runs each connection (its protocol, timeouts, drain); only its accept
loop is replaced, in :meth:`FrontServer.startup`.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys

import uvicorn

log = logging.getLogger("gpserve.front")
YIELD_S = 0.002
RETRY_S = 0.5             # after running out of file descriptors or memory


class BalancedListener:
    """Accepts from ``sock`` into ``factory``'s protocols; ``load()`` is (connections
    this front holds, how many more than the least-loaded other front). Has the two
    methods uvicorn's shutdown calls on a server: ``close`` and ``wait_closed``."""

    def __init__(self, sock: socket.socket, factory, load):
        self.sock, self.factory, self.load = sock, factory, load
        # uvicorn closes the sockets it was handed right after ``close()``, before this
        # task has seen its cancellation: the reader is removed by number, here and in
        # close(), never through the closed socket (whose fileno() is then -1)
        self.fd = sock.fileno()
        self.reading = False
        sock.setblocking(False)
        self.task = asyncio.create_task(self._accept_forever())

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            held, excess = self.load()
            if excess > max(2, held // 4):      # clearly more: another picks first
                await asyncio.sleep(YIELD_S)
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                await self._readable(loop)
                continue
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue
                if e.errno == errno.EINVAL:      # the supervisor stopped listening: the
                    return                       # drain follows, nothing to accept
                log.warning("accepting a connection failed: %s; retrying in %g s",
                            e.strerror, RETRY_S)
                await asyncio.sleep(RETRY_S)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await loop.connect_accepted_socket(self.factory, conn)
            except OSError:
                conn.close()                     # it went away before it was set up

    async def _readable(self, loop) -> None:
        ready = loop.create_future()
        loop.add_reader(self.fd, _settle, ready)
        self.reading = True
        try:
            await ready
        finally:
            self._stop_reading(loop)

    def _stop_reading(self, loop) -> None:
        if self.reading:
            self.reading = False
            loop.remove_reader(self.fd)

    def close(self) -> None:
        """Stop accepting now (uvicorn closes the socket next)."""
        self._stop_reading(asyncio.get_running_loop())
        self.task.cancel()

    async def wait_closed(self) -> None:
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class FrontServer(uvicorn.Server):
    """uvicorn's server with :class:`BalancedListener` as its accept loop.

    ``startup`` does what uvicorn's does for sockets it is handed (lifespan, then one
    listener per socket), with our listener in place of ``loop.create_server``."""

    def __init__(self, config: uvicorn.Config, load, on_listening):
        super().__init__(config)
        self.load, self.on_listening = load, on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn has just taken SIGINT and SIGTERM over: give them back to the
        # supervisor (ignored here, see supervisor.STOP_SIGNAL) and drain on its signal
        from .supervisor import STOP_SIGNAL
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(STOP_SIGNAL, self.handle_exit)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(3)                                  # uvicorn's STARTUP_FAILURE
        config = self.config

        def create_protocol(_loop=None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]  # uvicorn's own call
                config=config, server_state=self.server_state, app_state=self.lifespan.state,
                _loop=_loop)
        self.servers = [BalancedListener(  # type: ignore[misc]  # asyncio.Server's part we use
            sock, create_protocol, self.load) for sock in sockets or []]
        self.on_listening()
        self.started = True
