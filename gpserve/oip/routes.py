"""The Open Inference Protocol's REST routes as one table: method, path pattern, handler.

Why not Starlette's router: the inference route is a hot path (a small request costs
a few microseconds of routing there, matching each route in turn and building a child
scope); here a path is split once and looked up among the patterns of its length. A
``{name}`` segment takes any one segment, and is passed to the handler by name.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Handler = Callable[..., Awaitable]


class Refused(Exception):
    """A route that does not exist here (404) or a method it does not take (405): the
    protocol's own answers, with no GraphPipe error code."""

    def __init__(self, http_status: int, message: str):
        super().__init__(message)
        self.http_status, self.message = http_status, message


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    parts: tuple[str, ...]           # '{name}': any one segment, passed as ``name``
    handler: Handler

    def match(self, parts: list[str]) -> dict[str, str] | None:
        params = {}
        for want, got in zip(self.parts, parts):
            if want[0] == "{":
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


class Router:
    def __init__(self, routes: list[tuple[str, str, Handler]], not_found: str):
        """``routes``: (method, path, handler); ``not_found``: what a 404 adds."""
        self.by_length: dict[int, list[Route]] = {}
        for method, path, handler in routes:
            parts = tuple(path.strip("/").split("/"))
            self.by_length.setdefault(len(parts), []).append(Route(method, parts, handler))
        self.not_found = not_found

    def find(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler for a request and the path's parameters; Refused (404 or 405)."""
        parts = path.strip("/").split("/")
        allowed = []
        for route in self.by_length.get(len(parts), ()):
            params = route.match(parts)
            if params is None:
                continue
            if route.method == method or (route.method == "GET" and method == "HEAD"):
                return route.handler, params
            allowed.append(route.method)
        if allowed:
            raise Refused(405, f"{method} is not allowed here; use {' or '.join(allowed)}")
        raise Refused(404, f"no route {path!r}; {self.not_found}")
