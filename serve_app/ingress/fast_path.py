"""The model routes without FastAPI's machinery: same parsing, pipeline, rendering and errors.

Per request, FastAPI's exception and exit-stack middlewares, its router, its dependency solver and its
request handler cost about a fifth of the ingress's CPU on the model routes (py-spy, bench/ingress_cpu.py),
more than our whole pipeline. This ASGI layer sits inside our two middlewares and answers a POST to a
model route itself when its body is JSON: read the body, parse it, authenticate, validate it into the
route's schema, run the pipeline, render. Anything else (other routes, other methods, another content
type) goes on to the FastAPI app, which also still declares these routes for the OpenAPI schema.

The order of checks is FastAPI's: a body that is not JSON is a 400 before the key is looked at; then the
key (401/403); then the schema (400 naming the parameter). Errors render through errors.error_response,
as the app's exception handlers do (tests/ingress runs every route's error cases through this path).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import IIRError, InternalError, InvalidRequest, error_response
from serve_app.ingress.jobs import Job
from serve_app.ingress.middleware import context_of
from serve_app.ingress.pipeline import Pipeline
from serve_app.ingress.render import render

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRoute:
    schema: type[BaseModel]
    job: Callable[[Any, Mapping[str, str]], Job]  # (validated body, request headers) → the pipeline's job
    route: Any = None  # FastAPI's own route object, for the metrics' route label


def invalid_body(errors: list[Any]) -> InvalidRequest:
    """Pydantic's first error as OpenAI's 400: the parameter named, as FastAPI's handler does too."""
    first: dict[str, Any] = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequest("the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path"):  # where FastAPI found it; OpenAI names the parameter
        loc = loc[1:]
    message = first.get("msg", "invalid request")
    param = ".".join(loc) or None
    return InvalidRequest(f"{param}: {message}" if param else message, param=param, code="invalid_value")


class ModelRoutesFastPath:
    def __init__(self, app: ASGIApp, pipeline: Pipeline, routes: dict[str, ModelRoute]) -> None:
        self.app = app
        self.pipeline = pipeline
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        headers = Headers(scope=scope) if route is not None else None
        if route is None or headers is None or not _is_json(headers.get("content-type")):
            await self.app(scope, receive, send)
            return
        scope["route"] = route.route
        ctx = context_of(scope)
        try:
            response = await self._answer(route, headers, scope, receive)
        except IIRError as exc:
            ctx.error = exc.reason
            response = error_response(exc)
        except Exception:
            logger.exception("unhandled error in request %s", ctx.request_id)
            error = InternalError(ctx.request_id)
            ctx.error = error.reason
            response = error_response(error)
        await response(scope, receive, send)

    async def _answer(self, route: ModelRoute, headers: Headers, scope: Scope, receive: Receive) -> Response:
        raw = await _read_body(receive)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
        ctx = context_of(scope)
        await self.pipeline.authenticate(ctx, headers.get("authorization"))
        self.pipeline.require_inference(ctx)
        if data is None:
            raise InvalidRequest("Field required", code="invalid_value")  # FastAPI's, for a missing body
        try:
            # from_attributes, as FastAPI validates bodies: the same messages for a body of the wrong type
            body = route.schema.model_validate(data, from_attributes=True)
        except ValidationError as exc:
            raise invalid_body(exc.errors()) from None
        return render(ctx, await self.pipeline.run(ctx, route.job(body, headers)))


def _is_json(content_type: str | None) -> bool:
    # FastAPI reads a body as JSON without a content type, or with application/json or a +json type.
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
