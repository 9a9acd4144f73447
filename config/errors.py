"""Every rejection's stable error code, its HTTP status, and how errors are rendered.

One table holds the status of each code (DESIGN.md, "Errors"). Views raise ``ApiError``; DRF's own
exceptions (bad JSON, unsupported media type, missing credentials) are translated here so that
clients always receive one of these codes, never a traceback.

Two error shapes exist: Sightline's own ``{"code", "msg", "query_id"?}`` (``/v1/glm/infer`` and
the rest of the API) and OpenAI's ``{"error": {"message", "type", "param", "code"}}`` for the
OpenAI-compatible endpoints. A view picks OpenAI's with ``error_style = "openai"``.
"""

import logging
import uuid

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

logger = logging.getLogger("sightline.errors")

STATUS = {
    "invalid_request": 400,
    "unsupported_parameter": 400,
    "invalid_image": 400,
    "image_too_large": 413,
    "payload_too_large": 413,
    "unauthorized": 401,
    "key_revoked": 401,
    "key_expired": 401,
    "forbidden": 403,
    "not_found": 404,
    "model_not_found": 404,
    "method_not_allowed": 405,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "budget_exceeded": 429,
    "cancelled": 499,
    "timeout": 504,
    "gpu_oom": 507,
    "model_unavailable": 503,
    "worker_lost": 503,
    "service_unavailable": 503,
    "engine_error": 502,
    "internal_error": 500,
}

# OpenAI's error "type" for each status family.
OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """A rejection or failure with a stable code; the HTTP status comes from ``STATUS``."""

    def __init__(self, code: str, message: str, *, param: str | None = None, query_id=None, headers=None):
        if code not in STATUS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.query_id = query_id
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return STATUS[self.code]


def error_body(error: ApiError, style: str = "sightline") -> dict:
    if style == "openai":
        return {
            "error": {
                "message": error.message,
                "type": OPENAI_TYPE.get(error.status, "server_error" if error.status >= 500 else "api_error"),
                "param": error.param,
                "code": error.code,
            }
        }
    body = {"code": error.code, "msg": error.message}
    if error.query_id is not None:
        body["query_id"] = str(error.query_id)
    return body


def error_response(error: ApiError, style: str = "sightline") -> Response:
    response = Response(error_body(error, style), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def _from_drf(exc: Exception) -> ApiError | None:
    if isinstance(exc, drf_exceptions.NotAuthenticated):
        return ApiError(
            "unauthorized",
            "No API key was sent. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
        )
    if isinstance(exc, drf_exceptions.AuthenticationFailed):
        return ApiError("unauthorized", str(exc.detail))
    if isinstance(exc, drf_exceptions.PermissionDenied):
        return ApiError("forbidden", str(exc.detail))
    if isinstance(exc, drf_exceptions.NotFound):
        return ApiError("not_found", str(exc.detail))
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return ApiError("method_not_allowed", str(exc.detail))
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        return ApiError(
            "unsupported_media_type",
            f"{exc.detail} Send multipart/form-data or application/json.",
        )
    if isinstance(exc, drf_exceptions.ParseError):
        return ApiError("invalid_request", f"The request body could not be parsed: {exc.detail}")
    if isinstance(exc, drf_exceptions.Throttled):
        return ApiError("rate_limited", str(exc.detail))
    if isinstance(exc, drf_exceptions.ValidationError):
        return ApiError("invalid_request", _flatten(exc.detail))
    if isinstance(exc, RequestDataTooBig):
        limit_mb = settings.MAX_IMAGE_BYTES / (1024 * 1024)
        return ApiError("image_too_large", f"The request body is too large; an image may be at most {limit_mb:g} MB.")
    return None


def _flatten(detail) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{key}: {_flatten(value)}" for key, value in detail.items())
    if isinstance(detail, list):
        return " ".join(_flatten(item) for item in detail)
    return str(detail)


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error leaves in one of the two documented shapes."""
    view = context.get("view")
    style = getattr(view, "error_style", "sightline")
    if isinstance(exc, ApiError):
        error = exc
    else:
        error = _from_drf(exc)
        if error is None:
            request_id = uuid.uuid4().hex
            logger.exception("unhandled error (request_id=%s)", request_id)
            error = ApiError("internal_error", f"Internal error; quote request id {request_id} when reporting it.")
    response = error_response(error, style)
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="sightline"'
    return response
