"""An HTTP front process: Starlette on uvicorn, serving the socket the supervisor bound.

``POST /`` and ``POST /models/<name>[/versions/<v>]`` (GraphPipe: clients take a URL, so
any of them reaches a model by name) and ``/v2/...`` (the Open Inference Protocol,
:mod:`gpserve.oip.rest`) go straight to :class:`gpserve.inflight.FrontState`; the
metadata JSON and control routes are ordinary Starlette routes. A small ``POST /``
whose body came whole with its headers skips ASGI altogether: the connection calls
:meth:`FrontApp.post_whole` (see :func:`gpserve.connections.guarded_protocol`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gpserve.workers.batch_check import verdict

from . import __version__, heap, metrics, status_page
from . import protocol as P
from .answer import OCTETS, Answer
from .config import Config
from .errors import UnknownModel
from .front_state import FrontState
from .inflight import ModelState
from .oip.rest import RestApi, is_v2
from .protocol.messages import type_name

log = logging.getLogger("gpserve.front")
FAST_BODY_MAX = 256 * 1024       # bodies up to this often come whole in one read


async def _respond(send, status: int, body, headers=OCTETS, send_body=True) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body if send_body else b""})


class FrontApp:
    """The ASGI app: the protocols' routes (the hot paths) handled directly, the rest by
    Starlette.

    The inference routes skip Starlette's request/response objects and middleware: on
    small requests they cost about a quarter of a front's time.
    """

    def __init__(self, state: FrontState, other: Starlette):
        self.state, self.other = state, other
        self.v2 = RestApi(state)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.other(scope, receive, send)
            return
        started = time.perf_counter()
        if scope["method"] == "POST" and is_graphpipe(scope["path"]):
            answer = await self.post(scope, receive)
        elif is_v2(scope["path"]):
            answer = await self.v2.handle(scope, receive)
            answer.received = answer.received or next(
                (int(v) for k, v in scope["headers"] if k == b"content-length" and v.isdigit()),
                0)
        else:
            await self.other(scope, receive, send)
            return
        await _respond(send, answer.status, answer.body, answer.headers,
                       send_body=scope["method"] != "HEAD")
        self.record(scope.get("client"), scope["method"], scope["path"], answer,
                    time.perf_counter() - started)

    def record(self, client, method: str, path: str, answer: Answer, seconds: float):
        """Metrics, and the access-log line, for one HTTP request (``client``: uvicorn's
        (host, port))."""
        self.state.access.record(client[0] if client else None, method, path, answer.status,
                                 answer.kind, answer.received, len(answer.body), seconds)

    async def post_whole(self, body: bytes, client, url: bytes = b"/",
                         headers: Sequence[tuple[bytes, bytes]] = ()) -> Answer:
        """A request whose whole body is in hand (the connection's fast path): GraphPipe
        (``POST /``), or a v2 infer with the binary extension."""
        started = time.perf_counter()
        path = url.decode("latin-1")
        if is_graphpipe(path):
            with self.state.request() as request:
                try:
                    model = self.model_at(path)
                except UnknownModel as e:
                    answer = _error(request.fail(e), len(body))
                else:
                    answer = await self.answer(body, request, model)
        else:
            answer = await self.v2.infer_whole(path, body, {"client": client,
                                                              "headers": headers})
            answer.received = len(body)
        self.record(client, "POST", path, answer, time.perf_counter() - started)
        return answer

    async def post(self, scope, receive) -> Answer:
        """A GraphPipe request, its body read here."""
        with self.state.request() as request:
            try:        # resolved once, before the body: the open request holds it
                model = self.model_at(scope["path"])
                body = await self.state.body.read(scope, receive, request.regions)
            except Exception as e:
                return _error(request.fail(e))
            return await self.answer(body, request, model)

    async def answer(self, body, request, model: ModelState) -> Answer:
        """A GraphPipe body's answer from ``model`` (the one its URL names)."""
        try:
            req = P.decode_request(body, *model.string_limit)
            if isinstance(req, P.MetadataRequest):
                return Answer(200, model.metadata_body, "metadata", received=len(body))
            return Answer(200, await model.infer(req, request), "infer", received=len(body))
        except Exception as e:
            return _error(request.fail(e), len(body))

    def model_at(self, path: str) -> ModelState:
        """The model a GraphPipe URL names (``/``: the default model); UnknownModel if
        none is served there."""
        if path == "/":
            return self.state.model()
        parts = path.split("/")            # "", "models", name[, "versions", v]
        version = parts[4] if len(parts) == 5 and parts[3] == "versions" else None
        if len(parts) not in (3, 5) or (len(parts) == 5 and version is None):
            raise UnknownModel(f"no GraphPipe route {path!r}: post to / (the default "
                               "model) or /models/<name>[/versions/<version>]")
        return self.state.model(parts[2], version)


def is_graphpipe(path: str) -> bool:
    return path == "/" or path.startswith("/models/")


def _error(failure, received: int = 0) -> Answer:
    """A GraphPipe request that failed at any step: the GraphPipe ``Error`` body."""
    return Answer(failure.http_status, P.encode_error(failure.code, failure.message), "error",
                  received=received)


def info(state: FrontState) -> dict:
    """``GET /``: what is served, how, and how it goes; the top-level model fields are
    the default model's (or the first's; none while no model is loaded), every model is
    under ``models``."""
    first = state.first
    pids = state.counters.pids(0, state.cfg.fronts)
    if first is not None:
        pids["workers"] = first.counters.pids(first.cfg.workers, 0)["workers"]
    return {
        **_first_model(first), "version": __version__, "server": f"gpserve {__version__}",
        "default_model": state.default or None,
        "processes": {"fronts": state.cfg.fronts,
                      "workers": first.cfg.workers if first else 0, "pids": pids,
                      "this_front": os.getpid(),
                      "workers_linked": first.linked() if first else [],
                      "connections": state.counters.connections(state.cfg.fronts)},
        "models": [_model_info(model) for model in state.served],
        "protocols": {"graphpipe": "POST / (the default model), POST /models/<name>",
                      "open_inference_protocol": {
            "rest": "/v2", "grpc": state.cfg.grpc_listen or None,
            "system_shared_memory": state.cfg.shm_clients}},
        "stats": state.counters.snapshot(),
        "cache": _cache(first) if first else None,
    }


def _io(specs) -> list[dict]:
    return [{"name": s.name, "shape": s.shape, "type": type_name(s.dtype)} for s in specs]


def _first_model(model: ModelState | None) -> dict:
    """``GET /``'s top-level fields of one model (as with one model per server)."""
    if model is None:
        return {"name": None, "backend": None, "description": "no model loaded",
                "inputs": [], "outputs": [], "default_inputs": [], "default_outputs": [],
                "batching": None}
    spec, workers = model.spec, model.linked()
    return {"name": spec.name, "backend": spec.backend,
            "description": workers[0]["runs"] if workers else spec.description,
            "inputs": _io(spec.inputs), "outputs": _io(spec.outputs),
            "default_inputs": spec.default_inputs, "default_outputs": spec.default_outputs,
            "batching": _batching(model)}


def _model_info(model: ModelState) -> dict:
    """One model version's entry of ``GET /``."""
    spec, cfg = model.spec, model.cfg
    return {"name": model.name, "version": model.version,
            "versions": [str(v) for v in sorted(model.front.models[model.name], reverse=True)],
            "state": "READY" if model.ready else "UNAVAILABLE",
            "backend": spec.backend, "path": cfg.model_path, "placement": cfg.placement,
            "workers": cfg.workers, "inputs": _io(spec.inputs), "outputs": _io(spec.outputs),
            "graphpipe": f"/models/{model.name}/versions/{model.version}",
            "v2": f"/v2/models/{model.name}/versions/{model.version}",
            "batching": _batching(model), "stats": model.counters.snapshot(),
            "cache": _cache(model)}


def _batching(model: ModelState) -> dict:
    cfg, spec, counters = model.cfg, model.spec, model.counters
    return {"enabled": spec.batchable and cfg.batching != "off",
            "max_batch": cfg.max_batch, "max_delay_ms": cfg.max_delay_ms,
            "batch_sizes": cfg.batch_sizes, "warmed_sizes": counters.warmed_sizes(cfg.workers),
            "max_queue": cfg.max_queue, "timeout_ms": cfg.timeout_ms,
            **verdict(spec.batch_probe, counters.batch_checks())}


def _cache(model: ModelState) -> dict | None:
    if model.cache is None:
        return None
    shared = model.cache.shared
    return {**model.cache.stats(), **model.counters.cache_totals(),
            "size_mb": model.cfg.cache_size_mb,
            "shared": shared.stats() if shared is not None else None}


def build_app(state: FrontState) -> FrontApp:
    sampler = status_page.StatusSampler(state)

    async def get_info(request: Request) -> Response:
        if status_page.wants_html(request.scope["headers"]):      # a browser: the page
            page, media_type = status_page.static("page.html")
            return Response(page, media_type=media_type,
                            headers=status_page.SECURITY_HEADERS)
        return JSONResponse(info(state))

    async def get_status(request: Request) -> Response:
        return JSONResponse(sampler.data(), headers={"cache-control": "no-store"})

    async def get_static(request: Request) -> Response:
        try:
            body, media_type = status_page.static(request.path_params["name"])
        except KeyError:
            return PlainTextResponse("no such file", status_code=404)
        return Response(body, media_type=media_type, headers=status_page.SECURITY_HEADERS)

    async def get_metrics(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def is_ready(request: Request) -> Response:
        return PlainTextResponse("ok" if state.ready else "not ready",
                                 status_code=200 if state.ready else 503)

    async def is_alive(request: Request) -> Response:
        return PlainTextResponse("draining" if state.draining else "ok",
                                 status_code=503 if state.draining else 200)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.start()
        grpc_server = None
        if state.cfg.grpc_listen:
            from .oip import grpc_server as oip_grpc
            grpc_server = await oip_grpc.start(state, state.cfg.grpc_listen,
                                               state.cfg.max_body_bytes)
        heap.settle()
        yield
        if grpc_server is not None:          # answers what it holds, takes no more
            await grpc_server.stop(state.cfg.timeout_ms / 1000 + 1)
        for task in state.tasks:
            task.cancel()
        metrics.flush()

    return FrontApp(state, Starlette(routes=[
        Route("/", get_info, methods=["GET"]), Route("/metrics", get_metrics),
        Route("/_status/data", get_status), Route("/_status/{name}", get_static),
        Route("/control/is_ready", is_ready), Route("/control/is_alive", is_alive),
    ], lifespan=lifespan))


def _raise_file_limit() -> None:
    """Open files up to the hard limit: each connection is one, and the common soft limit
    of 1,024 is below --max-connections' default once the other files are counted."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(cfg: Config, index: int, sock) -> None:
    """Serve the models the supervisor published (gpserve/served.py) on ``sock``, the
    listening socket it holds for every front."""
    import uvicorn

    from .logs import setup
    setup(cfg.verbose, f"front{index}", cfg.log_format)
    from .connections import guarded_protocol
    from .listener import FrontServer
    _raise_file_limit()
    state = FrontState(cfg, index)
    counters = state.counters
    counters.set_connections(index, -1)      # not accepting yet: others need not yield

    def load() -> tuple[int, int]:    # (connections here, beyond the least-loaded front's)
        held = len(server.server_state.connections)
        fewest = counters.fewest_connections(cfg.fronts, index)
        return held, 0 if fewest is None else held - fewest
    app = build_app(state)
    config = uvicorn.Config(
        app, loop="uvloop",
        http=guarded_protocol(cfg.header_timeout_s,
                              lambda n: counters.set_connections(index, n),
                              fast_post=app.post_whole,
                              fast_limit=min(FAST_BODY_MAX, cfg.max_body_bytes),
                              max_head_bytes=cfg.max_header_kb * 1024),
        lifespan="on", access_log=False, log_config=None,   # our own access log and logging
        ws="none",         # no WebSocket: an Upgrade is ignored and the request answered
        log_level="warning" if cfg.verbose < 2 else "info",
        timeout_graceful_shutdown=int(cfg.timeout_ms / 1000) + 5, backlog=2048,
        timeout_keep_alive=cfg.keepalive_timeout_s,  # type: ignore[arg-type]  # seconds: float
        limit_concurrency=cfg.max_connections,
        proxy_headers=False, server_header=False)
    server = state.server = FrontServer(
        config, load, on_listening=lambda: counters.set_connections(index, 0))
    try:
        server.run(sockets=[sock])
    finally:
        state.arena.close()
