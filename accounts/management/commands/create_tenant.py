from django.core.management.base import BaseCommand, CommandError
from django.utils.text import slugify

from accounts import services
from accounts.models import Tenant


class Command(BaseCommand):
    help = "Create a tenant (prints its slug). With --if-missing, an existing slug is reused."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--slug")
        parser.add_argument("--if-missing", action="store_true", help="do nothing if the slug exists")
        parser.add_argument("--rpm", type=int, help="requests per minute (default 60)")
        parser.add_argument("--rpd", type=int, help="requests per day (default 10000)")
        parser.add_argument("--tokens-per-month", type=int)
        parser.add_argument("--concurrency", type=int, help="concurrent requests per key (default 4)")

    def handle(self, *args, name, slug, if_missing, rpm, rpd, tokens_per_month, concurrency, **options):
        quotas = {
            field: value
            for field, value in {
                "requests_per_minute": rpm,
                "requests_per_day": rpd,
                "tokens_per_month": tokens_per_month,
                "max_concurrent_requests": concurrency,
            }.items()
            if value is not None
        }
        slug = slug or slugify(name)
        existing = Tenant.objects.filter(slug=slug).first()
        if existing:
            if if_missing:
                self.stdout.write(existing.slug)
                return
            raise CommandError(f"A tenant with slug {slug!r} exists already.")
        tenant = services.create_tenant(name, slug=slug, **quotas)
        self.stdout.write(tenant.slug)
