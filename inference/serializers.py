"""Request and response shapes, used to document the API (drf-spectacular) and to render answers."""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers


class CompletionDetailsSerializer(serializers.Serializer):
    reasoning_tokens = serializers.IntegerField()


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    completion_tokens_details = CompletionDetailsSerializer()


class _InferParams(serializers.Serializer):
    prompt = serializers.CharField(help_text="The question about the image; at most 8,000 characters.")
    # null is the default, as when the field is left out (OpenAI's SDKs send null for None).
    max_tokens = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, help_text="1..MAX_NEW_TOKENS (default 256)"
    )
    temperature = serializers.FloatField(
        required=False, allow_null=True, min_value=0, max_value=2, help_text="0 = greedy (the default)"
    )
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1, help_text="default 1")
    enable_thinking = serializers.BooleanField(
        required=False, allow_null=True, help_text="GLM thinks before answering (default false: faster)"
    )


class InferMultipartSerializer(_InferParams):
    image = serializers.FileField(help_text="JPEG, PNG, WebP, GIF (first frame) or BMP; at most 10 MB.")


class InferJsonSerializer(_InferParams):
    image = serializers.CharField(help_text="The image as base64, or a data URI (data:image/png;base64,...).")


class InferResultSerializer(serializers.Serializer):
    result = serializers.CharField(help_text="The model's answer (its reasoning apart, box markers removed).")
    reasoning = serializers.CharField(help_text="The model's thinking, when enable_thinking was true; else empty.")
    code = serializers.IntegerField(help_text="0 on success.")
    cost_time = serializers.FloatField(help_text="Seconds from acceptance to the answer.")
    query_id = serializers.UUIDField()
    usage = UsageSerializer()


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="A stable error code, e.g. invalid_image, unauthorized, rate_limited.")
    msg = serializers.CharField(help_text="What went wrong and what to fix.")
    query_id = serializers.UUIDField(required=False, help_text="Present when the query had been accepted.")


class HealthSerializer(serializers.Serializer):
    status = serializers.CharField()
    model_loaded = serializers.BooleanField()
    mode = serializers.CharField()
    model = serializers.CharField()


class QueryInputSerializer(InferMultipartSerializer):
    """The same inputs as /v1/glm/infer."""


class ImageInfoSerializer(serializers.Serializer):
    sha256 = serializers.CharField()
    format = serializers.CharField()
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    bytes = serializers.IntegerField()


class QueryErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class TimingsSerializer(serializers.Serializer):
    queue_seconds = serializers.FloatField(allow_null=True)
    first_token_seconds = serializers.FloatField(allow_null=True)
    total_seconds = serializers.FloatField(allow_null=True)


class QuerySerializer(serializers.Serializer):
    """A query of the log, as the async-jobs API shows it."""

    id = serializers.UUIDField()
    object = serializers.SerializerMethodField()
    status = serializers.CharField()
    model = serializers.CharField()
    endpoint = serializers.CharField()
    prompt = serializers.CharField()
    params = serializers.DictField()
    image = serializers.SerializerMethodField()
    answer = serializers.CharField()
    finish_reason = serializers.CharField()
    usage = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()
    timings = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True, help_text="null until a worker takes the query")
    finished_at = serializers.DateTimeField(allow_null=True, help_text="null until the query ends")

    def get_object(self, query) -> str:
        return "query"

    @extend_schema_field(ImageInfoSerializer)
    def get_image(self, query) -> dict:
        return {
            "sha256": query.image_sha256,
            "format": query.image_format,
            "width": query.image_width,
            "height": query.image_height,
            "bytes": query.image_bytes,
        }

    @extend_schema_field(UsageSerializer(allow_null=True))
    def get_usage(self, query) -> dict | None:
        if query.prompt_tokens is None:
            return None
        return {
            "prompt_tokens": query.prompt_tokens,
            "completion_tokens": query.completion_tokens or 0,
            "total_tokens": query.total_tokens,
        }

    @extend_schema_field(QueryErrorSerializer(allow_null=True))
    def get_error(self, query) -> dict | None:
        return {"code": query.error_code, "message": query.error_message} if query.error_code else None

    @extend_schema_field(TimingsSerializer)
    def get_timings(self, query) -> dict:
        return {
            "queue_seconds": query.queue_seconds,
            "first_token_seconds": query.first_token_seconds,
            "total_seconds": query.total_seconds,
        }


class QueryAcceptedSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    object = serializers.CharField()
    status = serializers.CharField()
    poll_url = serializers.CharField()


class ReadySerializer(serializers.Serializer):
    status = serializers.CharField(help_text="ok or unavailable")
    database = serializers.BooleanField()
    redis = serializers.BooleanField(allow_null=True)
    model_loaded = serializers.BooleanField()
    queues = serializers.DictField()


class QueryPageSerializer(serializers.Serializer):
    """A page of ``GET /v1/queries`` (cursor pagination, newest first)."""

    next = serializers.URLField(allow_null=True, help_text="The next page's URL; null on the last page.")
    previous = serializers.URLField(allow_null=True, help_text="The previous page's URL; null on the first page.")
    results = QuerySerializer(many=True)


class OpenAIErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    param = serializers.CharField(allow_null=True)
    code = serializers.CharField()


class OpenAIErrorSerializer(serializers.Serializer):
    """The OpenAI-compatible endpoints' error shape."""

    error = OpenAIErrorDetailSerializer()
