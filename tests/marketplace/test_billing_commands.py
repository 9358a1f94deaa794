"""Billing's operator commands (grant_credits, create_tenant --credit, rate_usage), run as scripts would
run them: a separate process on the test database, output captured; refusals through call_command."""

from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from marketplace.choices import AccountKind, TransactionKind
from marketplace.models import BillingNotice, Invoice, LedgerEntry, LedgerTransaction, Organization, Reservation
from marketplace.money import month_bounds, month_start
from marketplace.selectors.billing import balance_of
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_begin,
    reservation_complete,
    reservation_create,
    reservation_release,
)
from tests.factories import OfferFactory, RackFactory, make_node, make_tenant
from tests.processes import manage


def credits_of(organization) -> Decimal:
    return balance_of(organization_id=organization.pk)["available"]


def ledger_rows() -> tuple[int, int]:
    return LedgerTransaction.objects.count(), LedgerEntry.objects.count()


class TestGrantCredits:
    @pytest.mark.django_db(transaction=True)
    def test_a_script_grants_credit_by_slug_or_id_and_prints_the_new_balance(self):
        tenant = make_tenant(name="Initech Labs", credit=None)
        org = tenant.organization

        by_slug = manage("grant_credits", org.slug, "250.50", "--memo", "Pilot credit")
        assert by_slug.returncode == 0, by_slug.stderr
        txn_id, balance = by_slug.stdout.strip().split("\t")
        txn = LedgerTransaction.objects.get(pk=txn_id)
        assert txn.kind == TransactionKind.GRANT and txn.memo == "Pilot credit" and txn.organization_id == org.pk
        assert balance == "balance 250.50 USD"

        by_id = manage("grant_credits", str(org.pk), "10")
        assert by_id.returncode == 0, by_id.stderr
        assert by_id.stdout.strip().endswith("\tbalance 260.50 USD")
        assert credits_of(org) == Decimal("260.50")
        assert LedgerTransaction.objects.filter(organization=org, kind=TransactionKind.GRANT).count() == 2

    @pytest.mark.django_db(transaction=True)
    def test_a_refused_grant_exits_non_zero_and_writes_nothing(self):
        tenant = make_tenant(credit=None)
        before = ledger_rows()
        refused = manage("grant_credits", tenant.organization.slug, "-5")
        assert refused.returncode != 0 and "positive" in refused.stderr and not refused.stdout
        assert ledger_rows() == before

    @pytest.mark.django_db
    @pytest.mark.parametrize(
        "ref,amount,message",
        [
            ("no-such-org", "10", "No organization"),
            ("00000000-0000-0000-0000-000000000000", "10", "No organization"),
            ("SLUG", "-5", "positive"),
            ("SLUG", "0", "positive"),
            ("SLUG", "abc", "not an amount"),
            ("SLUG", "1.001", "two decimals"),
            ("SLUG", "1e12", "too large"),
        ],
    )
    def test_an_unknown_tenant_or_a_bad_amount_is_a_command_error(self, ref, amount, message):
        tenant = make_tenant(credit=None)
        before = ledger_rows(), BillingNotice.objects.count()
        with pytest.raises(CommandError, match=message):
            call_command("grant_credits", tenant.organization.slug if ref == "SLUG" else ref, amount)
        assert (ledger_rows(), BillingNotice.objects.count()) == before

    @pytest.mark.django_db
    def test_the_output_is_the_transaction_and_the_balance_holds_included(self):
        tenant = make_tenant(credit="100")
        offer = OfferFactory(price_per_gpu_hour=Decimal("3.60"))
        make_node(rack=RackFactory(site=offer.site), accelerator=offer.accelerator_type)
        start = timezone.now()
        reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=1))
        out = StringIO()
        call_command("grant_credits", tenant.organization.slug, "0.01", stdout=out)
        txn_id, balance = out.getvalue().strip().split("\t")
        assert LedgerTransaction.objects.filter(pk=txn_id, kind=TransactionKind.GRANT).exists()
        assert balance == "balance 100.01 USD"  # 71.21 available + 28.80 held


class TestCreateTenant:
    @pytest.mark.django_db(transaction=True)
    def test_a_starting_credit_is_granted_in_the_ledger(self):
        made = manage("create_tenant", "Globex", "--owner", "hank@globex.example", "--credit", "100")
        assert made.returncode == 0, made.stderr
        slug, org_id = made.stdout.strip().split("\t")
        org = Organization.objects.get(pk=org_id)
        assert slug == "globex" and credits_of(org) == Decimal("100")
        grant = LedgerTransaction.objects.get(organization=org)
        assert grant.kind == TransactionKind.GRANT and grant.memo == "Starting credit"

    @pytest.mark.django_db
    def test_without_credit_nothing_is_granted_and_a_bad_credit_creates_nothing(self):
        call_command("create_tenant", "Umbrella", "--owner", "a@umbrella.example", stdout=StringIO())
        org = Organization.objects.get(slug="umbrella")
        assert not LedgerEntry.objects.filter(account__organization=org).exists()
        assert balance_of(organization_id=org.pk)["balance"] == 0
        with pytest.raises(CommandError, match="not an amount"):
            call_command("create_tenant", "Soylent", "--owner", "b@soylent.example", "--credit", "lots")
        assert not Organization.objects.filter(slug="soylent").exists()
        assert not LedgerEntry.objects.filter(account__kind=AccountKind.CREDITS).exists()


class TestRateUsage:
    @pytest.mark.django_db(transaction=True)
    def test_rate_usage_rates_settles_and_closes_ended_months(self):
        """A reservation that ran two months ago and was never rated: the script rates it to its end,
        settles it and writes that month's invoice."""
        tenant = make_tenant()
        offer = OfferFactory(price_per_gpu_hour=Decimal("2.49"))
        make_node(rack=RackFactory(site=offer.site), accelerator=offer.accelerator_type)
        start = timezone.now()
        reservation = reservation_create(
            tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=1)
        )
        for step in (reservation_begin, reservation_activate, reservation_release, reservation_complete):
            assert step(reservation_id=reservation.pk)
        last_month = month_start(month_bounds(month_start(start))[0] - timedelta(days=1))
        month = month_start(month_bounds(last_month)[0] - timedelta(days=1))  # two months back: long ended
        active_from = month_bounds(month)[0] + timedelta(days=4, hours=10)
        Reservation.objects.filter(pk=reservation.pk).update(
            activated_at=active_from, deactivated_at=active_from + timedelta(hours=1)
        )

        ran = manage("rate_usage", "--close-invoices")
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == [
            "rated 1 reservations: 1 usage records, 1 settled",
            "finalized 1 invoices",
        ]
        invoice = Invoice.objects.get(organization=tenant.organization)
        assert invoice.month == month and invoice.total == Decimal("19.92")
        reservation.refresh_from_db()
        assert reservation.billing_settled_at is not None

        again = manage("rate_usage", "--close-invoices")
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines() == ["rated 0 reservations: 0 usage records, 0 settled", "finalized 0 invoices"]

    @pytest.mark.django_db
    def test_without_close_invoices_it_only_rates(self):
        out = StringIO()
        call_command("rate_usage", stdout=out, stderr=StringIO())
        assert out.getvalue().splitlines() == ["rated 0 reservations: 0 usage records, 0 settled"]
