"""Create an API key for a member of a tenant and print it once, alone on stdout.

KEY=$(python manage.py create_api_key acme --user ops@acme.example --name ci [--role viewer] [--expires-in-days 30])
"""

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from console.kernel.errors import DomainError
from marketplace.choices import Role
from marketplace.selectors.tenancy import organization_find, tenant_context_for_user, user_find
from marketplace.services.tenancy.api_keys import api_key_create


class Command(BaseCommand):
    help = "Create an API key acting for a member of a tenant; prints the key once."

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="Organization slug or id.")
        parser.add_argument("--user", required=True, help="Email of the member the key acts for.")
        parser.add_argument("--name", default="created by operator", help="A label to tell the key apart.")
        parser.add_argument("--role", choices=Role.values, help="Role of the key (at most the member's role).")
        parser.add_argument("--expires-in-days", type=int, help="Expire after this many days (default: never).")

    def handle(self, *args, tenant, user, name, role=None, expires_in_days=None, **options):
        organization = organization_find(ref=tenant)
        if organization is None:
            raise CommandError(f"No organization {tenant!r}.")
        member = user_find(email=user)
        context = tenant_context_for_user(user=member, organization_id=organization.id) if member else None
        if context is None or context.organization.pk != organization.pk:
            raise CommandError(f"{user} is not a member of {organization.slug}.")
        if expires_in_days is not None and expires_in_days <= 0:
            raise CommandError("--expires-in-days must be positive.")
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        try:
            _key, plaintext = api_key_create(tenant=context, name=name, role=role, expires_at=expires_at)
        except DomainError as error:
            raise CommandError(error.message) from None
        self.stdout.write(plaintext)
