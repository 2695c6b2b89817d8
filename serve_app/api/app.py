"""``create_app``: the ingress's FastAPI app, made from a ``Gateway`` of collaborators."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api import routes_admin, routes_health, routes_openai
from serve_app.api.middleware import (
    AccessLogMiddleware,
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
    annotate,
)
from serve_app.errors import IIRError, InvalidRequest, MethodNotAllowed, NotFound
from serve_app.gateway import Gateway

logger = logging.getLogger(__name__)


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for start in gateway.on_startup:
            await start()
        yield
        for stop in gateway.on_shutdown:
            await stop()

    app = FastAPI(title="IIR", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_health.router)
    app.add_exception_handler(IIRError, _iir_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=gateway.settings.max_request_bytes)
    app.add_middleware(AccessLogMiddleware)  # inside RequestId (it logs the id), outside the size limit
    app.add_middleware(RequestIdMiddleware)
    return app


def _render(exc: IIRError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers)


async def _iir_error(request: Request, exc: IIRError) -> JSONResponse:
    annotate(request.scope, error=exc.reason)
    return _render(exc)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers schema violations with 400 invalid_request_error naming the parameter.
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return _render(InvalidRequest("the request body is not valid JSON", code="invalid_json"))
    message = first.get("msg", "invalid request")
    param = ".".join(loc) or None
    return _render(InvalidRequest(f"{param}: {message}" if param else message, param=param,
                                  code="invalid_value"))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return _render(NotFound("no such route"))
    if exc.status_code == 405:
        return _render(MethodNotAllowed("method not allowed for this route"))
    return _render(InvalidRequest(str(exc.detail)))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    logger.exception("unhandled error in request %s", request_id, exc_info=exc)
    body = {"error": {"message": f"internal error (request id {request_id})", "type": "server_error",
                      "param": None, "code": "internal_error"}}
    return JSONResponse(body, status_code=500)
