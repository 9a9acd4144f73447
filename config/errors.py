"""Every rejection's stable error code, its HTTP status, and how errors are rendered.

One table holds the status of each code (DESIGN.md, "Errors"). Views raise ``ApiError``; DRF's own
exceptions (bad JSON, unsupported media type, missing credentials) are translated here so that
clients always receive one of these codes, never a traceback.

Two error shapes exist: Sightline's own ``{"code", "msg", "query_id"?}`` (``/v1/glm/infer`` and
the rest of the API) and OpenAI's ``{"error": {"message", "type", "param", "code"}}`` for the
OpenAI-compatible endpoints. A view picks OpenAI's with ``error_style = "openai"``; code that runs
outside a view (the body limit, Django's 400/404/500 handlers) picks by path (``error_style_for_path``).
"""

import logging
import uuid

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.views import defaults
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from config import request_id

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


# The OpenAI-compatible endpoint families: errors under these paths are in OpenAI's shape.
OPENAI_PATH_PREFIXES = ("/v1/chat/", "/v1/models", "/v1/responses", "/v1/completions", "/v1/embeddings")


def error_style_for_path(path: str) -> str:
    return "openai" if path.startswith(OPENAI_PATH_PREFIXES) else "sightline"


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
        return ApiError("invalid_request", _parse_error_message(str(exc.detail)))
    if isinstance(exc, drf_exceptions.Throttled):
        return ApiError("rate_limited", str(exc.detail))
    if isinstance(exc, drf_exceptions.ValidationError):
        return ApiError("invalid_request", _flatten(exc.detail))
    if isinstance(exc, RequestDataTooBig):
        limit_mb = settings.MAX_IMAGE_BYTES / (1024 * 1024)
        return ApiError("image_too_large", f"The request body is too large; an image may be at most {limit_mb:g} MB.")
    return None


def _parse_error_message(detail: str) -> str:
    """What to fix in a body that could not be parsed. DRF passes on the parser's own exception text,
    which for multipart bodies can be a Python repr of the stream; that never reaches a client."""
    if detail.startswith("Multipart form parse error"):
        return (
            "The multipart/form-data body could not be parsed: send a Content-Type with a boundary "
            "(multipart/form-data; boundary=...) and parts separated by that boundary, each with a "
            "Content-Disposition name ('image' for the file, 'prompt' for the text)."
        )
    if detail.startswith("JSON parse error"):
        return f"The body is not valid JSON ({detail.removeprefix('JSON parse error - ')})."
    return f"The request body could not be parsed: {detail}"


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
            logger.exception("unhandled error (request_id=%s)", request_id.current() or "-")
            error = _internal_error()
    response = error_response(error, style)
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="sightline"'
    return response


def _internal_error() -> ApiError:
    """The client's side of an unexpected error: the request id to quote (the log has the rest)."""
    rid = request_id.current() or uuid.uuid4().hex
    return ApiError("internal_error", f"Internal error; quote request id {rid} when reporting it.")


# --- Django's error views (config/urls.py handler400/404/500) -----------------------------------
# Under /v1/ every error is JSON in its family's shape, whatever raised it (an unknown path, a bad
# Host header, an error outside a DRF view); other paths (dashboard, admin) keep Django's pages.


def _json_error(request, error: ApiError) -> JsonResponse:
    return JsonResponse(error_body(error, error_style_for_path(request.path)), status=error.status)


def bad_request(request, exception, template_name="400.html"):
    if not request.path.startswith("/v1/"):
        return defaults.bad_request(request, exception, template_name)
    # Django's only routes here are a refused Host header (DisallowedHost) and other suspicious input.
    message = (
        "The Host header names a host this server does not serve; send the host name of the API."
        if exception.__class__.__name__ == "DisallowedHost"
        else "The request is malformed (headers or body); check it against the API documentation at /docs."
    )
    return _json_error(request, ApiError("invalid_request", message))


def permission_denied(request, exception, template_name="403.html"):
    if not request.path.startswith("/v1/"):
        return defaults.permission_denied(request, exception, template_name)
    return _json_error(request, ApiError("forbidden", "This request is not allowed."))


def page_not_found(request, exception, template_name="404.html"):
    if not request.path.startswith("/v1/"):
        return defaults.page_not_found(request, exception, template_name)
    path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
    return _json_error(
        request, ApiError("not_found", f"No endpoint at {path}; /docs lists the API's endpoints and methods.")
    )


def server_error(request, template_name="500.html"):
    # Django has logged the exception (django.request, with this request's id) before calling this.
    if not request.path.startswith("/v1/"):
        return defaults.server_error(request, template_name)
    return _json_error(request, _internal_error())
