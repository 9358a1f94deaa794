"""Grant a tenant prepaid credit (operators; the admin has the same on the organization page).

    python manage.py grant_credits acme 500.00 [--memo "Pilot credit"]

The tenant is its slug or id. Prints the ledger transaction id and the new balance."""

from django.core.management.base import BaseCommand, CommandError

from console.kernel.errors import DomainError
from marketplace.money import cents
from marketplace.selectors.billing import balance_of
from marketplace.selectors.tenancy import organization_find
from marketplace.services.billing.credits import credits_grant


class Command(BaseCommand):
    help = "Grant a tenant organization prepaid credit (USD)."

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="The organization's slug or id.")
        parser.add_argument("amount", help="USD, e.g. 500 or 250.50.")
        parser.add_argument("--memo", default="", help="Why (shown in the ledger).")

    def handle(self, *args, tenant, amount, memo, **options):
        organization = organization_find(ref=tenant)
        if organization is None:
            raise CommandError(f"No organization {tenant!r}.")
        try:
            txn = credits_grant(organization=organization, amount=amount, memo=memo)
        except DomainError as error:
            raise CommandError(error.message) from None
        balance = balance_of(organization_id=organization.pk)["balance"]
        self.stdout.write(f"{txn.id}\tbalance {cents(balance)} USD")
