"""The pipeline's ``Answer`` as an HTTP response: JSON, or server-sent events, with the headers the
steps collected in the request's context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from serve_app.ingress import sse
from serve_app.ingress.context import RequestContext
from serve_app.ingress.jobs import Answer


def render(ctx: RequestContext, answer: Answer) -> Response:
    if not answer.streaming:
        return JSONResponse(answer.body, headers=ctx.headers)
    assert answer.rest is not None
    events = (sse.typed_event_stream(answer.first, answer.rest, request_id=ctx.request_id)
              if answer.typed_events else
              sse.event_stream(answer.first, answer.rest, model_id=ctx.model, request_id=ctx.request_id))
    ctx.headers["cache-control"] = "no-cache"
    return EventStreamResponse(events, headers=ctx.headers)


class EventStreamResponse(Response):
    """A ``text/event-stream`` response sent from the request's own task.

    Starlette's ``StreamingResponse`` (on servers before ASGI 2.4, uvicorn among them) runs the stream
    in a second task of an anyio task group beside a disconnect listener: a task hop before the first
    event and a cancel scope per stream, for the time to first chunk that streams are judged by. Here
    the first event leaves at once, and one plain watcher task cancels the stream if the client goes,
    so the model stops generating for nobody (the pipeline's ``finally`` blocks then release the slot).
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], *, headers: Mapping[str, str]) -> None:
        # Response's own fields, set here: its __init__ would render a body there is none of.
        self.status_code = 200
        self.background = None
        self.events = events
        raw = MutableHeaders(headers=dict(headers))
        raw["content-type"] = "text/event-stream; charset=utf-8"
        self.raw_headers = raw.raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        client_gone = sent_all = False

        async def watch() -> None:
            nonlocal client_gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # noqa: BLE001 - a broken receive channel says nothing about the client
                return
            if not sent_all:
                client_gone = True
                streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            sent_all = True
        except asyncio.CancelledError:
            if not client_gone:
                raise
            streaming.uncancel()  # our own cancel: the client left, the request simply ends
        finally:
            watcher.cancel()
            await sse.close(self.events)
