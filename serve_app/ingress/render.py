"""The pipeline's ``Answer`` as an HTTP response: JSON, or server-sent events, with the headers the
steps collected in the request's context."""

from __future__ import annotations

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from serve_app.ingress import sse
from serve_app.ingress.context import RequestContext
from serve_app.ingress.pipeline import Answer


def render(ctx: RequestContext, answer: Answer) -> Response:
    if not answer.streaming:
        return JSONResponse(answer.body, headers=ctx.headers)
    assert answer.rest is not None
    events = sse.event_stream(answer.first, answer.rest, model_id=ctx.model, request_id=ctx.request_id)
    ctx.headers["cache-control"] = "no-cache"
    return StreamingResponse(events, media_type="text/event-stream", headers=ctx.headers)
