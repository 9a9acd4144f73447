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
        try:
            tenant_obj = Tenant.objects.get(slug=tenant)
        except Tenant.DoesNotExist as exc:
            raise CommandError(f"No tenant with slug {tenant!r}; create it with create_tenant.") from exc
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        _, plaintext = services.create_api_key(tenant_obj, name, expires_at=expires_at)
        self.stdout.write(plaintext)
