from django.core.management.base import BaseCommand, CommandError

from accounts.models import ApiKey, Tenant
from inference import privacy


class Command(BaseCommand):
    help = (
        "Delete a tenant's or a key's queries: their rows and stored images, in batches. The usage rollups "
        "stay. With --delete-tenant the tenant goes too (keys, members), its rollups kept anonymised."
    )

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--tenant", metavar="SLUG")
        which.add_argument("--key", metavar="PREFIX_OR_ID", help="a key's id, or its prefix (sl_XXXXXXXX or XXXXXXXX)")
        parser.add_argument("--delete-tenant", action="store_true", help="with --tenant: delete the tenant too")
        parser.add_argument("--batch-size", type=int, default=500, metavar="ROWS")
        parser.add_argument("--yes", action="store_true", help="do not ask")

    def handle(self, *args, tenant, key, delete_tenant, batch_size, yes, **options):
        if delete_tenant and not tenant:
            raise CommandError("--delete-tenant goes with --tenant")
        if tenant:
            target = Tenant.objects.filter(slug=tenant).first()
            if target is None:
                raise CommandError(f"no tenant {tenant!r}")
            what = f"tenant {target.slug}" + (" (and the tenant itself)" if delete_tenant else "")
        else:
            prefix = key.removeprefix("sl_").split("_")[0]
            target = ApiKey.objects.filter(prefix=prefix).first() or (
                ApiKey.objects.filter(pk=int(key)).first() if key.isdigit() else None
            )
            if target is None:
                raise CommandError(f"no key {key!r}")
            what = f"key {target.name} (sl_{target.prefix}_…) of tenant {target.tenant.slug}"
        if not yes and input(f"Delete every query of {what}? [y/N] ").strip().lower() != "y":
            raise CommandError("nothing deleted")
        if tenant and delete_tenant:
            counts = privacy.delete_tenant(target, batch=batch_size)
        elif tenant:
            counts = privacy.delete_queries(tenant_id=target.pk, batch=batch_size)
        else:
            counts = privacy.delete_queries(api_key_id=target.pk, batch=batch_size)
        self.stdout.write(
            f"deleted {counts['queries']} queries, {counts['images']} image rows, {counts['objects']} stored images"
            + (f"; {counts['rollups_anonymised']} usage rollups anonymised" if "rollups_anonymised" in counts else "")
        )
