"""A front's listening socket on the shared port (and the supervisor's hold on it)."""
from __future__ import annotations

import socket


def port_socket(host: str, port: int, shared: bool) -> socket.socket:
    """A TCP socket bound to host:port; ``shared``: with ``SO_REUSEPORT`` (the fronts'
    listening sockets, and the supervisor's holder of the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
