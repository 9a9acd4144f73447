from django.core.management.base import BaseCommand, CommandError

from accounts.models import Tenant
from inference import exports


class Command(BaseCommand):
    help = (
        "Write a tenant's query log as JSON Lines (what the dashboard's export gives its owners), oldest "
        "first, to a file or stdout. Image links point at the dashboard under --base-url."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", metavar="SLUG", required=True)
        parser.add_argument("--output", metavar="FILE", help="default: stdout")
        parser.add_argument("--base-url", default="http://localhost:8000", help="where the dashboard is served")

    def handle(self, *args, tenant, output, base_url, **options):
        target = Tenant.objects.filter(slug=tenant).first()
        if target is None:
            raise CommandError(f"no tenant {tenant!r}")
        base = base_url.rstrip("/")

        def image_url(query, position):
            return f"{base}/dashboard/queries/{query.pk}/image/{position}"

        out = open(output, "w", encoding="utf-8") if output else None  # noqa: SIM115
        try:
            count = 0
            for line in exports.lines(target.pk, image_url):
                if out is None:
                    self.stdout.write(line, ending="")
                else:
                    out.write(line)
                count += 1
        finally:
            if out is not None:
                out.close()
        self.stderr.write(f"{count} queries exported")
