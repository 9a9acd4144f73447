from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from accounts.models import PrivacyMode
from config import request_id as request_ids
from config.ids import uuid7


class Query(models.Model):
    """One accepted request: who asked what, the answer, tokens, timings and the outcome."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    class Endpoint(models.TextChoices):
        GLM_INFER = "glm_infer", "POST /v1/glm/infer"
        CHAT_COMPLETIONS = "chat_completions", "POST /v1/chat/completions"
        QUERIES = "queries", "POST /v1/queries"
        WEBSOCKET = "websocket", "WS /ws/v1/infer"
        RESPONSES = "responses", "POST /v1/responses"

    # Time-ordered (config/ids.py): new rows land at the right edge of the primary key's index.
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    tenant = models.ForeignKey("accounts.Tenant", on_delete=models.CASCADE, related_name="queries")
    api_key = models.ForeignKey(
        "accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="queries"
    )
    model = models.CharField(max_length=200)
    endpoint = models.CharField(max_length=32, choices=Endpoint.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)

    prompt = models.TextField(blank=True, help_text="the last user turn's text")
    # The conversation in the chat template's form (inference/engine/request.py): system, user,
    # assistant (tool_calls, reasoning_content) and tool messages, each image a {"type": "image"}
    # part standing for the query's image of the same rank (QueryImage.position).
    messages = models.JSONField(default=list, blank=True)
    params = models.JSONField(default=dict, blank=True)

    answer = models.TextField(blank=True, default="")
    reasoning = models.TextField(blank=True, default="", help_text="the model's thinking, apart from the answer")
    tool_calls = models.JSONField(default=list, blank=True, help_text="OpenAI-shaped tool calls of the answer")
    choices = models.JSONField(
        default=list, blank=True, help_text="every choice (n > 1) or the logprobs; empty for one plain answer"
    )
    finish_reason = models.CharField(max_length=16, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    reasoning_tokens = models.PositiveIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=32, blank=True, default="")
    error_message = models.TextField(blank=True, default="")

    client_ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=512, blank=True, default="")
    worker = models.CharField(max_length=200, blank=True, default="", help_text="who ran it")
    # The X-Request-ID of the request (or websocket connection) that created the row, taken from the
    # request's context by the default, so every path that writes a Query stores it.
    request_id = models.CharField(
        max_length=128, blank=True, default=request_ids.current, db_index=True, help_text="X-Request-ID"
    )
    reserved_tokens = models.PositiveIntegerField(default=0, help_text="tokens reserved against the monthly quota")
    settled_at = models.DateTimeField(
        null=True, blank=True, help_text="when its quota was settled and its usage added to the rollups"
    )
    # Money (config/money.py): the worst case reserved against the budgets at admission, and what it
    # cost at its model's price of its creation (null until it settles).
    reserved_cost = models.DecimalField(
        max_digits=24, decimal_places=9, default=0, db_default=0, help_text="worst-case cost reserved at admission"
    )
    cost = models.DecimalField(
        max_digits=24, decimal_places=9, null=True, blank=True, help_text="its cost, stored when it settled"
    )
    # Its model's price at its creation, as the admission read it (a ModelPrice row's three values;
    # all zero when the model had none): its settlement costs it at this price without reading the
    # prices again. Null on rows written before they were recorded, or without an admission: those
    # are priced from ModelPrice at created_at, which gives the same (prices in effect are never
    # rewritten).
    price_input_per_million = models.DecimalField(max_digits=18, decimal_places=9, null=True, blank=True)
    price_output_per_million = models.DecimalField(max_digits=18, decimal_places=9, null=True, blank=True)
    price_per_image = models.DecimalField(max_digits=18, decimal_places=9, null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    # What is kept of it (inference/privacy.py). db_default: rows a process of the previous release
    # writes during a rolling deploy get them too.
    privacy_mode = models.CharField(
        max_length=16,
        choices=PrivacyMode.choices,
        default=PrivacyMode.FULL,
        db_default=PrivacyMode.FULL,
        help_text="its tenant's privacy mode when it was accepted",
    )
    content_removed_at = models.DateTimeField(
        null=True, blank=True, help_text="when its prompt, conversation and answer were removed"
    )
    images_removed_at = models.DateTimeField(null=True, blank=True, help_text="when its images were removed")
    stored_images = models.PositiveSmallIntegerField(
        default=0, db_default=0, help_text="how many of its images are held in image storage"
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "queries"
        indexes = [
            models.Index(fields=["-created_at"], name="query_created"),  # the admin's list and date hierarchy
            models.Index(fields=["tenant", "-created_at"], name="query_tenant_created"),
            models.Index(fields=["api_key", "-created_at"], name="query_key_created"),
            # the sweeper's scan for finished queries whose quota was not settled
            models.Index(fields=["finished_at"], condition=models.Q(settled_at__isnull=True), name="query_unsettled"),
            # The pruner's scans (partial: only rows that still hold what it may remove).
            models.Index(
                fields=["tenant", "created_at"],
                condition=models.Q(content_removed_at__isnull=True),
                name="query_content_kept",
            ),
            models.Index(
                fields=["tenant", "created_at"], condition=models.Q(stored_images__gt=0), name="query_images_stored"
            ),
            models.Index(
                fields=["finished_at"],
                condition=models.Q(privacy_mode=PrivacyMode.METADATA, content_removed_at__isnull=True),
                name="query_metadata_held",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED)

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    @staticmethod
    def _seconds(start, end) -> float | None:
        return None if start is None or end is None else (end - start).total_seconds()

    @property
    def queue_seconds(self) -> float | None:
        """Time from acceptance until a worker started it."""
        return self._seconds(self.created_at, self.started_at)

    @property
    def first_token_seconds(self) -> float | None:
        """Time from acceptance to the first streamed token (what a client waits for)."""
        return self._seconds(self.created_at, self.first_token_at)

    @property
    def total_seconds(self) -> float | None:
        """Time from acceptance until the outcome was written."""
        return self._seconds(self.created_at, self.finished_at)


class QueryImage(models.Model):
    """One image of a query, in the conversation's order: what was sent (SHA-256, format, size and
    dimensions of the upload) and where what the model saw (RGB, scaled down, PNG) is kept: ``key``
    in image storage (inference/imagestore.py), empty once it is not kept."""

    query = models.ForeignKey(Query, on_delete=models.CASCADE, related_name="images")
    position = models.PositiveSmallIntegerField(help_text="0 for the conversation's first image part")
    sha256 = models.CharField(max_length=64, db_index=True, help_text="of the bytes sent")
    format = models.CharField(max_length=16, help_text="JPEG, PNG, WEBP, GIF or BMP, read from the content")
    size_bytes = models.PositiveIntegerField(help_text="of the upload")
    width = models.PositiveIntegerField(help_text="of the upload")
    height = models.PositiveIntegerField(help_text="of the upload")
    key = models.CharField(
        max_length=255,
        blank=True,
        default="",
        db_default="",
        help_text="the normalised image the model saw, in image storage; empty when it is not kept",
    )
    stored_bytes = models.PositiveIntegerField(null=True, blank=True, help_text="of the normalised PNG")
    # Before 0011 the PNG itself; 0012 (or manage.py move_images_to_storage) moves it to storage. Read
    # only for rows a process of the previous release writes during a rolling deploy; dropped later.
    content = models.BinaryField(null=True, blank=True, editable=False)
    content_type = models.CharField(max_length=32, default="image/png")

    class Meta:
        ordering = ["query", "position"]
        constraints = [models.UniqueConstraint(fields=["query", "position"], name="unique_query_image_position")]
        indexes = [
            models.Index(fields=["key"], condition=~models.Q(key=""), name="queryimage_key"),
            # rows whose PNG is still in the row (to move to storage)
            models.Index(fields=["id"], condition=models.Q(content__isnull=False), name="queryimage_in_row"),
        ]

    def __str__(self) -> str:
        return f"image {self.position} of {self.query_id}"

    @property
    def is_kept(self) -> bool:
        return bool(self.key)


class UsageDaily(models.Model):
    """Usage per tenant, key, model, endpoint and UTC day, settled from each outcome, so usage views
    never scan queries. Readers sum over the rows they need: a key's day is several rows (one per
    model and endpoint it used)."""

    # Upper bounds (ms) of the latency histogram's buckets; the last bucket is open.
    LATENCY_BUCKETS_MS = (50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 102400)

    date = models.DateField()
    # Null once its tenant was deleted: the rollup outlives it, anonymised (usage and billing figures).
    tenant = models.ForeignKey(
        "accounts.Tenant", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_days"
    )
    api_key = models.ForeignKey(
        "accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_days"
    )
    # The query's model and endpoint; "" on rows written before they were recorded (shown as "(earlier)").
    model = models.CharField(max_length=200, blank=True, default="", db_default="")
    endpoint = models.CharField(max_length=32, blank=True, default="", db_default="")
    requests = models.PositiveIntegerField(default=0, help_text="accepted queries that ended")
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    rejected = models.PositiveIntegerField(default=0, help_text="refused by a quota (429)")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_ms_total = models.PositiveBigIntegerField(default=0, help_text="sum over succeeded queries")
    latency_histogram = models.JSONField(default=list, blank=True, help_text="counts per LATENCY_BUCKETS_MS bucket")
    spend = models.DecimalField(
        max_digits=24, decimal_places=9, default=0, db_default=0, help_text="cost of the queries that ended"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["date", "tenant", "api_key", "model", "endpoint"], name="unique_usage_day_dims"
            )
        ]
        indexes = [models.Index(fields=["tenant", "date"], name="usage_tenant_date")]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.api_key_id} {self.model or '-'} {self.endpoint or '-'} {self.date}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def bucket_of(cls, latency_ms: float) -> int:
        for index, bound in enumerate(cls.LATENCY_BUCKETS_MS):
            if latency_ms <= bound:
                return index
        return len(cls.LATENCY_BUCKETS_MS)

    @classmethod
    def percentile_ms(cls, histogram: list[int], q: float) -> int | None:
        """The upper bound of the bucket holding the q-th percentile (None when empty)."""
        total = sum(histogram)
        if not total:
            return None
        running = 0
        for index, count in enumerate(histogram):
            running += count
            if running >= q / 100 * total:
                return cls.LATENCY_BUCKETS_MS[min(index, len(cls.LATENCY_BUCKETS_MS) - 1)]
        return cls.LATENCY_BUCKETS_MS[-1]


class ModelPrice(models.Model):
    """A served model's prices from ``effective_from`` on. A query costs what the row effective at
    its creation says (the latest ``effective_from`` <= ``created_at``); rows are added, never
    rewritten once in effect (inference/pricing.py)."""

    model = models.CharField(max_length=200, help_text="the served model's public name")
    input_per_million = models.DecimalField(
        max_digits=18, decimal_places=9, validators=[MinValueValidator(0)], help_text="per million input tokens"
    )
    output_per_million = models.DecimalField(
        max_digits=18, decimal_places=9, validators=[MinValueValidator(0)], help_text="per million output tokens"
    )
    per_image = models.DecimalField(
        max_digits=18, decimal_places=9, default=0, validators=[MinValueValidator(0)], help_text="per input image"
    )
    effective_from = models.DateTimeField(default=timezone.now, help_text="from when it applies (now or later)")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="unique_model_price_from"),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d %H:%M} UTC"

    def in_effect(self, now=None) -> bool:
        return self.effective_from <= (now or timezone.now())
