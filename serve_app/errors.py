"""One exception tree for the gateway; every class knows its HTTP status and OpenAI error fields.

    IIRError                     (abstract; anything unexpected is an ``InternalError``)
    ├── InvalidRequest          400 invalid_request_error       a request body, header or parameter is wrong
    │   ├── UnsupportedParameter 400 invalid_request_error / unsupported_parameter
    │   └── MethodNotAllowed    405 invalid_request_error / method_not_allowed
    ├── InvalidConfig           422 invalid_request_error / invalid_config
    │                               (the request is fine; the models.yaml/providers.yaml it applies is not)
    ├── AuthenticationFailed    401 authentication_error / invalid_api_key
    ├── PermissionDenied        403 permission_error
    ├── NotFound                404 invalid_request_error / not_found
    │   └── ModelNotFound       404 invalid_request_error / model_not_found
    ├── PayloadTooLarge         413 invalid_request_error / request_too_large
    ├── RateLimited             429 rate_limit_error
    ├── ServiceUnavailable      503 service_unavailable
    ├── UpstreamError           502 upstream_error   (a remote provider failed)
    └── InternalError           500 server_error / internal_error (a bug: details logged, never returned)

400 or 422: every malformed request body (bad JSON, a field of the wrong type or range, a bad
``/infer`` input) is a 400 ``invalid_request_error`` naming the parameter, as OpenAI answers; 422 is kept
for one case, a valid request whose configuration file is invalid (docs/API.md, "Errors").

Code raises these; ``error_response`` is the one place that renders them (the ingress's exception
handlers and its size-limit middleware); SSE error events carry the same ``to_body()``.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class IIRError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # A finer label for metrics and logs (say, why a key was refused); never sent to the caller.
        self.reason = reason or code or self.code
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    # Errors cross Ray process boundaries; keep them picklable with their fields.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))


def _rebuild(cls: type[IIRError], message: str, param: str | None, code: str | None,
             headers: dict[str, str]) -> IIRError:
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequest(IIRError):
    status_code = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class MethodNotAllowed(InvalidRequest):
    status_code = 405
    code = "method_not_allowed"


class InvalidConfig(IIRError):
    """A config file an operator asked to apply (``POST /v1/registry/refresh``) is invalid; the message
    names the file and the problem, and nothing was changed."""

    status_code = 422
    type = "invalid_request_error"
    code = "invalid_config"


class AuthenticationFailed(IIRError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(IIRError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(IIRError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(IIRError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(IIRError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(IIRError):
    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamError(IIRError):
    status_code = 502
    type = "upstream_error"
    code = "upstream_error"


class InternalError(IIRError):
    """A bug: the caller gets the request id to quote, the log gets the traceback."""

    code = "internal_error"

    def __init__(self, request_id: str, **_: Any) -> None:
        super().__init__(f"internal error (request id {request_id})")


def error_response(exc: IIRError) -> JSONResponse:
    """The one rendering of an error: ``{"error": {"message", "type", "param", "code"}}`` + its status."""
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers)
