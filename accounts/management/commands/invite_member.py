from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from accounts import services
from accounts.models import Membership, Tenant


class Command(BaseCommand):
    help = "Add a user (created if new) to a tenant with a role; they can then sign in to /dashboard/."

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="the tenant's slug")
        parser.add_argument("username")
        parser.add_argument("--role", choices=Membership.Role.values, default=Membership.Role.MEMBER)
        parser.add_argument("--password", help="for a new user (else they get an unusable one)")
        parser.add_argument("--email", default="")

    def handle(self, *args, tenant, username, role, password, email, **options):
        tenant_obj = Tenant.objects.filter(slug=tenant).first()
        if tenant_obj is None:
            raise CommandError(f"No tenant with slug {tenant!r}.")
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            user = services.create_user(username, password=password, email=email)
            self.stdout.write(f"created user {username}")
        services.add_member(tenant_obj, user, role)
        self.stdout.write(f"{username} is {role} of {tenant_obj.slug}")
