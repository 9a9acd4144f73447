"""Request and response shapes, used to document the API (drf-spectacular) and to render answers."""

from rest_framework import serializers


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class _InferParams(serializers.Serializer):
    prompt = serializers.CharField(help_text="The question about the image; at most 8,000 characters.")
    max_tokens = serializers.IntegerField(required=False, min_value=1, help_text="1..MAX_NEW_TOKENS (default 256)")
    temperature = serializers.FloatField(required=False, min_value=0, max_value=2, help_text="0 = greedy")
    top_p = serializers.FloatField(required=False, min_value=0, max_value=1)


class InferMultipartSerializer(_InferParams):
    image = serializers.FileField(help_text="JPEG, PNG, WebP, GIF (first frame) or BMP; at most 10 MB.")


class InferJsonSerializer(_InferParams):
    image = serializers.CharField(help_text="The image as base64, or a data URI (data:image/png;base64,...).")


class InferResultSerializer(serializers.Serializer):
    result = serializers.CharField(help_text="The model's answer.")
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
    started_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField()

    def get_object(self, query) -> str:
        return "query"

    def get_image(self, query) -> dict:
        return {
            "sha256": query.image_sha256,
            "format": query.image_format,
            "width": query.image_width,
            "height": query.image_height,
            "bytes": query.image_bytes,
        }

    def get_usage(self, query) -> dict | None:
        if query.prompt_tokens is None:
            return None
        return {
            "prompt_tokens": query.prompt_tokens,
            "completion_tokens": query.completion_tokens or 0,
            "total_tokens": query.total_tokens,
        }

    def get_error(self, query) -> dict | None:
        return {"code": query.error_code, "message": query.error_message} if query.error_code else None

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
