"""Request and response shapes, used to document the API (drf-spectacular) and to render answers."""

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from inference import services


class CompletionDetailsSerializer(serializers.Serializer):
    reasoning_tokens = serializers.IntegerField()


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    completion_tokens_details = CompletionDetailsSerializer()


class _Numbers(serializers.Serializer):
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
    model = serializers.CharField(
        required=False,
        allow_null=True,
        help_text="A model of GET /v1/models (default: the server's INFERENCE_MODEL_NAME, if this key may use it)",
    )


class _InferParams(_Numbers):
    prompt = serializers.CharField(
        help_text="The question (about the images, if any); all text together at most MAX_PROMPT_CHARS (8,000)."
    )


MAX_IMAGES = settings.MAX_IMAGES_PER_REQUEST
IMAGES_HELP = (
    f"0..MAX_IMAGES_PER_REQUEST ({MAX_IMAGES}) images, in the order the model sees them, before the prompt; "
    "each JPEG, PNG, WebP, GIF (first frame) or BMP of at most MAX_IMAGE_BYTES (10 MB). Optional: "
    "the model answers text-only questions too."
)


class InferMultipartSerializer(_InferParams):
    image = serializers.ListField(
        child=serializers.FileField(),
        required=False,
        max_length=MAX_IMAGES,
        help_text=f"Repeat the `image` part for several. {IMAGES_HELP}",
    )


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "description": "one image, as base64 or a data URI"},
            {
                "type": "array",
                "items": {"type": "string"},
                "maxItems": MAX_IMAGES,
                "description": "several images, each as base64 or a data URI",
            },
        ]
    }
)
class ImagesField(serializers.Field):
    """``image`` of a JSON body: one string or a list of them."""


JSON_IMAGES_HELP = f"The image as base64 or a data URI (data:image/png;base64,...), or a list of them. {IMAGES_HELP}"


class InferJsonSerializer(_InferParams):
    image = ImagesField(required=False, allow_null=True, help_text=JSON_IMAGES_HELP)


class QueryJsonSerializer(_Numbers):
    """``POST /v1/queries`` as JSON: ``prompt`` and ``image`` as for /v1/glm/infer, or ``messages``."""

    prompt = serializers.CharField(
        required=False, help_text="The question (about the images, if any); required unless `messages` is sent."
    )
    image = ImagesField(required=False, allow_null=True, help_text=JSON_IMAGES_HELP)
    messages = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        min_length=1,
        help_text=(
            "In place of `prompt` and `image`: a conversation in OpenAI's chat form (as /v1/chat/completions "
            "takes it): system, developer, user, assistant (with `tool_calls`) and tool messages, text and "
            "`image_url` parts (data URIs) in any order, 0..MAX_IMAGES_PER_REQUEST images in user messages."
        ),
    )


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
    model = serializers.CharField(help_text="the model a request without `model` asks for")
    models = serializers.ListField(child=serializers.CharField(), help_text="every served model")


class QueryInputSerializer(InferMultipartSerializer):
    """The same inputs as /v1/glm/infer."""


class ImageInfoSerializer(serializers.Serializer):
    """One image of a query, as it was sent (the model saw it scaled down to MAX_IMAGE_SIDE)."""

    position = serializers.IntegerField(help_text="0 for the conversation's first image")
    sha256 = serializers.CharField(help_text="of the bytes sent")
    format = serializers.CharField(help_text="JPEG, PNG, WEBP, GIF or BMP, read from the content")
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    bytes = serializers.IntegerField(help_text="the upload's size")
    kept = serializers.BooleanField(help_text="whether the image itself is kept (privacy mode, retention)")


def image_info(image) -> dict:
    return {
        "position": image.position,
        "sha256": image.sha256,
        "format": image.format,
        "width": image.width,
        "height": image.height,
        "bytes": image.size_bytes,
        "kept": image.is_kept,
    }


class KeptSerializer(serializers.Serializer):
    """What is kept of a query, and why not the rest."""

    privacy_mode = serializers.ChoiceField(
        choices=["full", "no_images", "metadata"], help_text="its tenant's privacy mode when it was accepted"
    )
    not_kept = serializers.ListField(
        child=serializers.ChoiceField(choices=["prompt", "messages", "answer", "images"]),
        help_text="what is not kept of it (empty: everything is kept)",
    )
    content_removed_at = serializers.DateTimeField(allow_null=True, help_text="when retention removed its content")
    images_removed_at = serializers.DateTimeField(allow_null=True, help_text="when its images were removed")
    note = serializers.CharField(help_text="the same, in a sentence")


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
    messages = serializers.ListField(
        child=serializers.DictField(),
        help_text='The conversation in the chat template\'s form: each image a {"type": "image"} part, '
        "standing for the entry of `images` of the same rank.",
    )
    images = serializers.SerializerMethodField()
    image = serializers.SerializerMethodField()
    answer = serializers.CharField()
    finish_reason = serializers.CharField()
    usage = serializers.SerializerMethodField()
    cost = serializers.DecimalField(
        max_digits=24,
        decimal_places=9,
        allow_null=True,
        coerce_to_string=True,
        help_text="what it cost (a decimal string, exact to 10^-9 of `currency`); null until it settles",
    )
    currency = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()
    timings = serializers.SerializerMethodField()
    kept = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True, help_text="null until a worker takes the query")
    finished_at = serializers.DateTimeField(allow_null=True, help_text="null until the query ends")

    def get_object(self, query) -> str:
        return "query"

    @extend_schema_field(ImageInfoSerializer(many=True))
    def get_images(self, query) -> list[dict]:
        return [image_info(image) for image in _images_of(query)]

    @extend_schema_field(
        ImageInfoSerializer(allow_null=True, help_text="The first of `images`, or null (kept for older clients).")
    )
    def get_image(self, query) -> dict | None:
        images = _images_of(query)
        return image_info(images[0]) if images else None

    @extend_schema_field(UsageSerializer(allow_null=True))
    def get_usage(self, query) -> dict | None:
        return None if query.prompt_tokens is None else services.usage(query)

    def get_currency(self, query) -> str:
        return settings.CURRENCY

    @extend_schema_field(QueryErrorSerializer(allow_null=True))
    def get_error(self, query) -> dict | None:
        return {"code": query.error_code, "message": query.error_message} if query.error_code else None

    @extend_schema_field(KeptSerializer)
    def get_kept(self, query) -> dict:
        from inference import privacy

        return KeptSerializer(privacy.kept(query)).data

    @extend_schema_field(TimingsSerializer)
    def get_timings(self, query) -> dict:
        return {
            "queue_seconds": query.queue_seconds,
            "first_token_seconds": query.first_token_seconds,
            "total_seconds": query.total_seconds,
        }


def _images_of(query) -> list:
    """The query's images in order; prefetched by ``selectors.with_images`` where lists show them."""
    return sorted(query.images.all(), key=lambda image: image.position)


class QueryAcceptedSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    object = serializers.CharField()
    status = serializers.CharField()
    poll_url = serializers.CharField()


class ReadySerializer(serializers.Serializer):
    status = serializers.CharField(help_text="ok or unavailable")
    database = serializers.BooleanField()
    redis = serializers.BooleanField(allow_null=True)
    model_loaded = serializers.BooleanField(help_text="every served model (or the one asked for) has a live worker")
    queues = serializers.DictField(help_text="per queue: its model, whether it is loaded, its workers and engines")


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
