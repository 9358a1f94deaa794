"""Create an organization with its owner (creating the owner's user if needed).

    python manage.py create_tenant "Acme AI" --owner ops@acme.example [--slug acme] [--password ...]
                                  [--credit 500.00]

Prints the organization's slug and id, tab-separated, so scripts can capture them."""

import os

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from console.kernel.errors import DomainError
from marketplace.selectors.tenancy import user_find
from marketplace.services.billing.credits import credits_grant
from marketplace.services.tenancy.members import organization_create, user_create


class Command(BaseCommand):
    help = "Create a tenant organization and its owner."

    def add_arguments(self, parser):
        parser.add_argument("name", help="The organization's display name.")
        parser.add_argument("--owner", required=True, help="Owner's email; the user is created if missing.")
        parser.add_argument("--slug", help="URL-safe identifier (default: from the name).")
        parser.add_argument(
            "--password",
            help="Password for a newly created owner (or set OWNER_PASSWORD). Without one, the "
            "owner cannot sign in until an operator sets one.",
        )
        parser.add_argument("--credit", help="Starting prepaid credit in USD (granted in the ledger).")

    @transaction.atomic
    def handle(self, *args, name, owner, slug=None, password=None, credit=None, **options):
        password = password or os.environ.get("OWNER_PASSWORD")
        try:
            user = user_find(email=owner) or user_create(email=owner, password=password)
            organization = organization_create(name=name, owner=user, slug=slug)
            if credit is not None:
                credits_grant(organization=organization, amount=credit, memo="Starting credit")
        except DomainError as error:
            raise CommandError(error.message) from None
        self.stdout.write(f"{organization.slug}\t{organization.id}")
