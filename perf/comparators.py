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


def _reads_the_body_and_answers(body: bytes, headers: list):
    """A raw ASGI app that reads the whole body, then answers ``body``."""
    head = {"type": "http.response.start", "status": 200,
            "headers": headers + [(b"content-length", b"%d" % len(body))]}

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send(head)
        await send({"type": "http.response.body", "body": body})
    return app


floor_app = _reads_the_body_and_answers(b"ok", [])
rows_floor_app = _reads_the_body_and_answers(
    bytes(P.encode_response(P.InferResponse([np.zeros((1, 3), np.float32)]))),
    [(b"content-type", b"application/octet-stream")])
