from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from accounts import services
from accounts.models import Tenant


class Command(BaseCommand):
    help = "Create an API key for a tenant. The key is printed once and never stored."

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="the tenant's slug")
        parser.add_argument("--name", default="default")
        parser.add_argument("--expires-in-days", type=int)

    def handle(self, *args, tenant, name, expires_in_days, **options):
        # 0 would read as "no expiry" and a negative value as already expired: both are mistakes.
        if expires_in_days is not None and expires_in_days <= 0:
            raise CommandError(
                f"--expires-in-days must be a positive number of days (got {expires_in_days}); "
                "leave it out for a key that never expires."
            )
        try:
            tenant_obj = Tenant.objects.get(slug=tenant)
        except Tenant.DoesNotExist as exc:
            raise CommandError(f"No tenant with slug {tenant!r}; create it with create_tenant.") from exc
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days is not None else None
        _, plaintext = services.create_api_key(tenant_obj, name, expires_at=expires_at)
        self.stdout.write(plaintext)
