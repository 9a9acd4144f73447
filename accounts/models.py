from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


class PrivacyMode(models.TextChoices):
    """What is kept of a tenant's queries (README: Storage, retention and privacy)."""

    FULL = "full", "full: prompts, answers and images are kept"
    NO_IMAGES = "no_images", "no_images: prompts and answers are kept, images are not"
    METADATA = "metadata", "metadata: only sizes, hashes, tokens, timings and the outcome are kept"


# A new tenant's defaults come from the settings at its creation; each tenant then has its own.
def default_privacy_mode() -> str:
    return settings.DEFAULT_PRIVACY_MODE


def default_content_retention_days() -> int | None:
    return settings.RETENTION_CONTENT_DAYS


def default_image_retention_days() -> int | None:
    return settings.RETENTION_IMAGE_DAYS


class Tenant(models.Model):
    """A customer of the platform. Holds members, API keys and the default quotas of its keys."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    # Default quotas for the tenant's keys; a key may override each. None means unlimited.
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, default=60)
    requests_per_day = models.PositiveIntegerField(null=True, blank=True, default=10_000)
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True, default=2_000_000)
    max_concurrent_requests = models.PositiveIntegerField(null=True, blank=True, default=4)
    # The model names this tenant may use; empty means every model the platform serves.
    allowed_models = models.JSONField(default=list, blank=True)

    # What is kept of its queries, and for how long (None: until deleted).
    privacy_mode = models.CharField(
        max_length=16,
        choices=PrivacyMode.choices,
        default=default_privacy_mode,
        db_default=PrivacyMode.FULL,  # for rows a process of the previous release writes
        help_text="what is kept of new queries; queries already taken keep the mode they were taken under",
    )
    content_retention_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        default=default_content_retention_days,
        validators=[MinValueValidator(1)],
        help_text="days prompts, conversations and answers are kept; blank: until deleted",
    )
    image_retention_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        default=default_image_retention_days,
        validators=[MinValueValidator(1)],
        help_text="days images are kept; blank: until deleted",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="unique_membership")]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"


class ApiKey(models.Model):
    """An API key. Only its public prefix and the SHA-256 of the whole key are stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    # Per-key overrides of the tenant's quotas; None means "use the tenant's".
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    requests_per_day = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True)
    max_concurrent_requests = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} (sl_{self.prefix}_…)"

    # DRF treats the authenticated key as the request's user.
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class Invitation(models.Model):
    """A one-time link that makes whoever opens it a member of ``tenant`` with ``role``. Only the
    SHA-256 of its token is stored (like an API key's); the token is shown once, at creation."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invitations")
    role = models.CharField(max_length=16, choices=Membership.Role.choices, default=Membership.Role.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"invitation to {self.tenant} as {self.role} ({self.state()})"

    def state(self, now=None) -> str:
        """``pending``, ``accepted``, ``revoked`` or ``expired``."""
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= (now or timezone.now()):
            return "expired"
        return "pending"


class AuditEvent(models.Model):
    """One change to a tenant's members, invitations or keys: who did what to what, and when."""

    class Action(models.TextChoices):
        INVITATION_CREATED = "invitation.created", "created an invitation"
        INVITATION_REVOKED = "invitation.revoked", "revoked an invitation"
        INVITATION_ACCEPTED = "invitation.accepted", "accepted an invitation"
        ROLE_CHANGED = "member.role_changed", "changed a role"
        MEMBER_REMOVED = "member.removed", "removed a member"
        KEY_CREATED = "key.created", "created a key"
        KEY_REVOKED = "key.revoked", "revoked a key"
        KEY_EDITED = "key.edited", "edited a key"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="audit_events")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The actor's username when it happened (kept if the user is deleted); blank: the system.
    actor_name = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=32, choices=Action.choices)
    target = models.CharField(max_length=200)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="audit_tenant_recent")]

    def __str__(self) -> str:
        return f"{self.actor_name or 'system'} {self.get_action_display()} {self.target}"
