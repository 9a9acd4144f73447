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
