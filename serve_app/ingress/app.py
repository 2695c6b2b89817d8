"""``create_app``: the ingress's FastAPI app, made from a ``Gateway`` of collaborators.

    RequestContextMiddleware   request id, RequestContext, access log and traffic metrics
      BodySizeLimitMiddleware  413 before any body is read
        ModelRoutesFastPath    JSON POSTs to the model routes, without FastAPI (fast_path.py)
        routes                 parse → Pipeline (pipeline.py) → render (render.py)
        exception handlers     every error through errors.error_response
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import (
    IIRError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    error_response,
)
from serve_app.ingress.fast_path import ModelRoutesFastPath, invalid_body
from serve_app.ingress.gateway import Gateway
from serve_app.ingress.middleware import BodySizeLimitMiddleware, RequestContextMiddleware, context_of
from serve_app.ingress.pipeline import Pipeline
from serve_app.ingress.routes import admin, health, inference

logger = logging.getLogger(__name__)


def create_app(gateway: Gateway, *, fast_path: bool = True) -> FastAPI:
    """``fast_path=False`` leaves every request to FastAPI: tests/ingress/test_fast_path.py compares."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for start in gateway.on_startup:
            await start()
        yield
        for stop in gateway.on_shutdown:
            await stop()

    app = FastAPI(title="IIR", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    app.state.pipeline = Pipeline(gateway)
    app.include_router(inference.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.add_exception_handler(IIRError, _iir_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    # Innermost first: the fast path sees requests after the size limit and the request context.
    routes = {path: replace(spec, route=next(r for r in inference.router.routes
                                             if getattr(r, "path", None) == path))
              for path, spec in inference.MODEL_ROUTES.items()}
    if fast_path:
        app.add_middleware(ModelRoutesFastPath, pipeline=app.state.pipeline, routes=routes)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=gateway.settings.max_request_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app


async def _iir_error(request: Request, exc: IIRError) -> JSONResponse:
    context_of(request.scope).error = exc.reason
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Every malformed body is a 400 invalid_request_error naming the parameter, as OpenAI answers.
    return await _iir_error(request, invalid_body(list(exc.errors())))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return await _iir_error(request, NotFound("no such route"))
    if exc.status_code == 405:
        return await _iir_error(request, MethodNotAllowed("method not allowed for this route"))
    return await _iir_error(request, InvalidRequest(str(exc.detail)))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    ctx = context_of(request.scope)
    logger.exception("unhandled error in request %s", ctx.request_id, exc_info=exc)
    return await _iir_error(request, InternalError(ctx.request_id))
