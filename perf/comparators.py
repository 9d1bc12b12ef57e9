"""Servers that gpserve is measured against in the same run.

``json_app``: the seed's comparator, a plain Python JSON server (Starlette) that takes
``{"instances": [...]}`` and returns ``{"predictions": [...]}`` (echo), as JSON model
APIs do. ``floor_app``: a raw ASGI app on the same uvicorn that reads the body and
answers two bytes: what HTTP alone costs in Python on this machine. ``rows_floor_app``:
the same, answering a GraphPipe response of three floats made once (what a row-cache
hit answers for the OCR classifier): the floor under a cache hit.

    uvicorn --app-dir perf comparators:json_app --port 9200 --workers 2
"""
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gpserve import protocol as P


async def _echo(request: Request) -> JSONResponse:
    payload = await request.json()
    return JSONResponse({"predictions": payload["instances"]})


json_app = Starlette(routes=[Route("/", _echo, methods=["POST"])])


_THREE_FLOATS = bytes(P.encode_response(P.InferResponse([np.zeros((1, 3), np.float32)])))


async def rows_floor_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", b"%d" % len(_THREE_FLOATS))]})
    await send({"type": "http.response.body", "body": _THREE_FLOATS})


async def floor_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
