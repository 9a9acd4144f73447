"""The REST API. Views stay thin: parse, call a service, render."""

from django.conf import settings
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from config.errors import ApiError
from inference import serializers, services
from inference.dispatch import get_dispatcher
from inference.images import decode_base64_image
from inference.models import Query

_ERRORS = {
    status: OpenApiResponse(serializers.ErrorSerializer, description=description)
    for status, description in {
        400: "invalid_request or invalid_image",
        401: "unauthorized, key_revoked or key_expired",
        413: "image_too_large (bytes or pixels)",
        429: "rate_limited or quota_exceeded",
        500: "internal_error",
        503: "model_unavailable or worker_lost",
        504: "timeout: the query goes on; poll it",
        507: "gpu_oom",
    }.items()
}


def client_info(request) -> services.ClientInfo:
    return services.ClientInfo(
        ip=request.META.get("REMOTE_ADDR") or None, user_agent=request.META.get("HTTP_USER_AGENT", "")
    )


def image_bytes_from(request) -> bytes | None:
    """The image of a multipart upload (file part ``image``) or of a JSON body (base64 or data URI)."""
    value = request.data.get("image")
    if value is None or value == "":
        return None
    if hasattr(value, "read"):
        if value.size > settings.MAX_IMAGE_BYTES:  # refuse before reading it into memory
            limit = settings.MAX_IMAGE_BYTES / (1024 * 1024)
            raise ApiError(
                "image_too_large",
                f"The image is {value.size / (1024 * 1024):.1f} MB; the limit is {limit:g} MB.",
                param="image",
            )
        return value.read()
    if isinstance(value, str):
        return decode_base64_image(value)
    raise ApiError("invalid_image", "'image' must be a file upload, base64 or a data URI.", param="image")


class GlmInferView(APIView):
    """``POST /v1/glm/infer``: an image and a question in, the answer out (the original wrapper's shape)."""

    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(
        operation_id="glm_infer",
        summary="Ask a question about an image",
        description=(
            "Send `multipart/form-data` with an `image` file and a `prompt`, or `application/json` with "
            "`image` as base64 or a data URI. Waits for the answer (at most SYNC_TIMEOUT seconds; past it, "
            "504 `timeout` with the `query_id`, and the query goes on)."
        ),
        request={
            "multipart/form-data": serializers.InferMultipartSerializer,
            "application/json": serializers.InferJsonSerializer,
        },
        responses={200: serializers.InferResultSerializer, **_ERRORS},
        examples=[
            OpenApiExample(
                "JSON",
                value={"image": "data:image/png;base64,iVBORw0KGgo...", "prompt": "What is in this picture?"},
                request_only=True,
                media_type="application/json",
            )
        ],
        tags=["inference"],
    )
    def post(self, request):
        data = services.check_input(
            prompt=request.data.get("prompt"),
            image_bytes=image_bytes_from(request),
            max_tokens=request.data.get("max_tokens"),
            temperature=request.data.get("temperature"),
            top_p=request.data.get("top_p"),
        )
        query = services.accept(request.auth, data, endpoint=Query.Endpoint.GLM_INFER, client=client_info(request))
        query = services.run_sync(query)
        if query.status != Query.Status.SUCCEEDED:
            raise services.error_of(query)
        return Response(
            {
                "result": query.answer,
                "code": 0,
                "cost_time": round(query.total_seconds or 0.0, 3),
                "query_id": str(query.pk),
                "usage": services.usage(query),
            }
        )


class HealthView(APIView):
    """``GET /health``: liveness, and whether the model is loaded."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(operation_id="health", responses={200: serializers.HealthSerializer}, tags=["health"])
    def get(self, request):
        status = get_dispatcher().status()
        return Response(
            {
                "status": "ok",
                "model_loaded": status["model_loaded"],
                "mode": status["mode"],
                "model": settings.INFERENCE_MODEL_NAME,
            }
        )
