"""One exception tree for the gateway; every class knows its HTTP status and OpenAI error fields.

    IIRError
    ├── InvalidRequest          400 invalid_request_error
    │   ├── UnsupportedParameter 400 invalid_request_error / unsupported_parameter
    │   └── MethodNotAllowed    405 invalid_request_error / method_not_allowed
    ├── ValidationFailed        422 invalid_request_error
    │   └── InvalidConfig       422 invalid_request_error / invalid_config (models.yaml, providers.yaml)
    ├── AuthenticationFailed    401 authentication_error / invalid_api_key
    ├── PermissionDenied        403 permission_error
    ├── NotFound                404 invalid_request_error / not_found
    │   └── ModelNotFound       404 invalid_request_error / model_not_found
    ├── PayloadTooLarge         413 invalid_request_error / request_too_large
    ├── RateLimited             429 rate_limit_error
    ├── ServiceUnavailable      503 service_unavailable
    └── UpstreamError           502 upstream_error   (a remote provider failed)

Routes raise these; ``serve_app.api.app`` renders them as ``{"error": {...}}``. Anything else becomes a
500 whose details are logged with the request id, never returned.
"""

from __future__ import annotations

from typing import Any


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


class ValidationFailed(IIRError):
    status_code = 422
    type = "invalid_request_error"
    code = "invalid_value"


class InvalidConfig(ValidationFailed):
    """A config file an operator asked to apply (``POST /v1/registry/refresh``) is invalid; the message
    names the file and the problem, and nothing was changed."""

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
