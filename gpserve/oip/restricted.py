"""API groups that must not be open to whoever can reach the port, and who may call them.

System shared memory lets a caller name files on this host for the server to read and
write: anyone who could reach the port could otherwise read (through an ordinary infer
call) or overwrite another program's file of the server's user, or take over another
client's regions; and the model repository API loads and unloads models. So the groups
here (``shared-memory``: registering, listing and unregistering regions, and any infer
call that reads or writes one; ``model-repository``: its index, load and unload) are,
by default, taken from clients on this host only (a loopback address: shared memory only
works between processes of one host anyway), and an operator may require a header as well,
as Triton's ``--http-restricted-api`` and ``--grpc-restricted-protocol`` do:

    --restricted-api "shared-memory:admin-key=s3cret"      (REST header, gRPC metadata)
    --restricted-api-clients any                            (not only loopback)

The value is compared in constant time; a refusal names the header, never its value.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field

from gpserve.errors import Forbidden

SHARED_MEMORY = "shared-memory"
MODEL_REPOSITORY = "model-repository"       # the repository extension: index, load, unload
GROUPS = (SHARED_MEMORY, MODEL_REPOSITORY)
FROM = ("loopback", "any")


@dataclass
class Restrictions:
    """Per group, the header a call needs (if any); and whether calls must be local."""

    required: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    loopback_only: bool = True

    @classmethod
    def parse(cls, text: str, clients: str = "loopback") -> "Restrictions":
        """``GROUP[,GROUP]:KEY=VALUE`` specs separated by ``;`` (the flag's syntax);
        raises ValueError naming what is wrong."""
        if clients not in FROM:
            raise ValueError(f"--restricted-api-clients {clients!r}: expected one of "
                             f"{', '.join(FROM)}")
        required: dict[str, tuple[str, bytes]] = {}
        for spec in filter(None, (p.strip() for p in text.split(";"))):
            groups, sep, pair = spec.partition(":")
            key, eq, value = pair.partition("=")
            if not sep or not eq or not key.strip() or not value:
                raise ValueError(f"--restricted-api {spec!r}: expected GROUP[,GROUP]:KEY=VALUE")
            for group in (g.strip() for g in groups.split(",")):
                if group not in GROUPS:
                    raise ValueError(f"--restricted-api {spec!r}: unknown API group "
                                     f"{group!r}; groups: {', '.join(GROUPS)}")
                if group in required:
                    raise ValueError(f"--restricted-api: group {group!r} is restricted twice")
                required[group] = (key.strip().lower(), value.encode())
        return cls(required, clients == "loopback")

    def check(self, group: str, host: str | None, header) -> None:
        """Raise Forbidden unless a call of ``group`` from ``host`` (an IP address,
        None if unknown) may go on; ``header(name)`` gives the call's value of a header
        or metadata key (lower case), or None."""
        if self.loopback_only and not _loopback(host):
            raise Forbidden(f"the {group} API takes calls from this host only; the operator "
                            "can allow others with --restricted-api-clients any")
        need = self.required.get(group)
        if need is not None:
            key, value = need
            got = header(key)
            if got is None or not hmac.compare_digest(
                    got if isinstance(got, bytes) else got.encode(), value):
                raise Forbidden(f"the {group} API is restricted on this server: calls need "
                                f"the header {key!r} with the value the operator set")


    def check_http(self, group: str, scope) -> None:
        """``check`` for an ASGI request: uvicorn's client address, its headers."""
        client, headers = scope.get("client"), scope["headers"]
        self.check(group, client[0] if client else None,
                   lambda key: next((v for k, v in headers if k == key.encode()), None))

    def check_grpc(self, group: str, context) -> None:
        """``check`` for a gRPC call: its peer's address, its metadata."""
        metadata = context.invocation_metadata() or ()
        self.check(group, grpc_peer_host(context.peer()),
                   lambda key: next((v for k, v in metadata if k == key), None))


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def grpc_peer_host(peer: str) -> str | None:
    """The address in grpcio's ``context.peer()`` ("ipv4:127.0.0.1:5000",
    "ipv6:[::1]:5000"); None for other transports."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return None
