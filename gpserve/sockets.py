"""The sockets the supervisor holds for the run's life, and how it stops taking
connections without resetting any.

The fronts accept from one listening socket that the supervisor binds and holds:
connections that arrive while a front restarts wait in its backlog, and a stop shuts
it once, before the fronts drain. (One socket per front with SO_REUSEPORT was tried:
the kernel spreads connections more evenly, but each front's backlog is then emptied by
that front alone, and a drain reset the connections waiting there: see
docs/architecture.md.)
"""
from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import time
from collections.abc import Callable

from .config import Config

BACKLOG = 2048
DRAIN_BACKLOG_S = 2.0
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)      # classic BPF: "ret #0", drop the packet
SO_ATTACH_FILTER = 26
TCPI_UNACKED = 24            # struct tcp_info: a listener's accept-queue length is here


def listen(cfg: Config) -> socket.socket:
    """The one listening socket every front accepts from (inherited by them)."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"gpserve: cannot listen on {cfg.listen}: {e.strerror}"
                         + (" (is another server running there?)"
                            if e.errno == 98 else "")) from None
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def reserve_grpc_port(cfg: Config) -> socket.socket | None:
    """A socket bound to ``--grpc-listen`` with SO_REUSEPORT, held for the run: a port in
    use fails here, with a clear message, not in every front; and the port's group
    admits only processes of this user (the kernel's rule for SO_REUSEPORT). The
    fronts' gRPC servers bind it too and listen; this one never listens, so it takes
    no connections. First a bind *without* SO_REUSEPORT: it fails while any socket holds
    the port, another gpserve's group included, which a SO_REUSEPORT bind would join."""
    if not cfg.grpc_listen:
        return None
    host, _, port = cfg.grpc_listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, int(port)))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
    except OSError as e:
        if sock is not None:
            sock.close()
        raise SystemExit(f"gpserve: cannot listen on --grpc-listen {cfg.grpc_listen}: "
                         f"{e.strerror}") from None
    return sock


def stop_listening(sock: socket.socket, fronts_alive: Callable[[], bool]) -> None:
    """Stop taking connections without resetting any: new connection attempts are
    dropped first (a socket filter), so clients retry and are refused once the socket
    closes; the fronts, still running, accept what waits in the backlog (up to
    DRAIN_BACKLOG_S); then the socket stops listening, for every front at once. Shutting
    it at once would reset whatever waits in the backlog: with busy fronts, every drain
    under load did."""
    with contextlib.suppress(OSError):
        program = ctypes.create_string_buffer(_DROP_ALL)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                        struct.pack("HxxxxxxQ", 1, ctypes.addressof(program)))
        give_up = time.monotonic() + DRAIN_BACKLOG_S
        while time.monotonic() < give_up and fronts_alive():
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            if struct.unpack_from("<I", info, TCPI_UNACKED)[0] == 0:
                break
            time.sleep(0.01)        # polling the kernel's queue length: no event for it
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
