"""Operators' billing in the admin: credit grants, credit lines, reversals and the price book all go
through the billing services; the ledger is read-only."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from marketplace.choices import TransactionKind
from marketplace.models import LedgerTransaction, OfferPrice
from marketplace.selectors.billing import balance_of
from marketplace.selectors.catalog import price_in_force
from tests.factories import PASSWORD, OfferFactory, make_tenant, make_user

pytestmark = pytest.mark.django_db


def grant_url(tenant):
    return reverse("admin:marketplace_organization_grant_credits", args=[tenant.organization.pk])


def test_grant_and_credit_line_pages(operator_client):
    tenant = make_tenant(credit=None)
    page = operator_client.get(grant_url(tenant))
    assert page.status_code == 200 and b"Grant prepaid credit" in page.content

    done = operator_client.post(grant_url(tenant), {"grant": "1", "amount": "250.50", "memo": "pilot"})
    assert done.status_code == 302
    assert balance_of(organization_id=tenant.organization.pk)["balance"] == Decimal("250.50")
    txn = LedgerTransaction.objects.get(organization=tenant.organization, kind=TransactionKind.GRANT)
    assert txn.created_by == operator_client.user and txn.memo == "pilot"

    operator_client.post(grant_url(tenant), {"credit_line": "1", "credit_limit": "1000"})
    assert balance_of(organization_id=tenant.organization.pk)["credit_limit"] == Decimal("1000")

    refused = operator_client.post(grant_url(tenant), {"grant": "1", "amount": "-5"})
    assert refused.status_code == 200  # the form again, with its error
    assert LedgerTransaction.objects.filter(organization=tenant.organization).count() == 1

    change = operator_client.get(reverse("admin:marketplace_organization_change", args=[tenant.organization.pk]))
    assert b"$250.50" in change.content


def test_staff_without_ledger_permission_cannot_grant():
    tenant = make_tenant(credit=None)
    clerk = make_user("clerk@example.com", is_staff=True)
    client = Client()
    assert client.login(username=clerk.email, password=PASSWORD)
    assert client.post(grant_url(tenant), {"grant": "1", "amount": "10"}).status_code == 403
    assert balance_of(organization_id=tenant.organization.pk)["balance"] == 0


def test_reversing_a_grant_from_the_ledger_list(operator_client):
    tenant = make_tenant(credit="75")
    txn = LedgerTransaction.objects.get(organization=tenant.organization, kind=TransactionKind.GRANT)
    changelist = reverse("admin:marketplace_ledgertransaction_changelist")
    operator_client.post(changelist, {"action": "reverse", "_selected_action": [str(txn.pk)]})
    assert balance_of(organization_id=tenant.organization.pk)["balance"] == 0
    assert LedgerTransaction.objects.filter(reverses=txn, kind=TransactionKind.REVERSAL).count() == 1
    # A second reversal is refused (and said so), not applied.
    operator_client.post(changelist, {"action": "reverse", "_selected_action": [str(txn.pk)]})
    assert LedgerTransaction.objects.filter(reverses=txn).count() == 1
    # The ledger is read-only in the admin.
    page = operator_client.get(reverse("admin:marketplace_ledgertransaction_change", args=[txn.pk]))
    assert page.status_code == 200 and b'name="_save"' not in page.content


def test_scheduling_a_price_from_the_offer_page(operator_client):
    offer = OfferFactory(price_per_gpu_hour=Decimal("2.49"))
    url = reverse("admin:marketplace_offer_change", args=[offer.pk])
    form = operator_client.get(url)
    assert form.status_code == 200
    later = timezone.now() + timedelta(days=2)
    data = {
        "site": offer.site_id,
        "accelerator_type": offer.accelerator_type_id,
        "shape": offer.shape,
        "gpus_per_node": offer.gpus_per_node,
        "gpus_per_instance": offer.gpus_per_instance,
        "max_duration_hours": offer.max_duration_hours,
        "is_active": "on",
        "prices-TOTAL_FORMS": "0",
        "prices-INITIAL_FORMS": "0",
        "prices-2-TOTAL_FORMS": "1",
        "prices-2-INITIAL_FORMS": "0",
        "prices-2-0-effective_from_0": later.strftime("%Y-%m-%d"),
        "prices-2-0-effective_from_1": later.strftime("%H:%M:%S"),
        "prices-2-0-price_per_gpu_hour": "1.99",
        "prices-2-0-note": "winter sale",
        "term_discounts-TOTAL_FORMS": "0",
        "term_discounts-INITIAL_FORMS": "0",
    }
    saved = operator_client.post(url, data)
    assert saved.status_code == 302, saved.content.decode()[:2000]
    assert OfferPrice.objects.filter(offer=offer, price_per_gpu_hour=Decimal("1.99"), note="winter sale").exists()
    assert price_in_force(offer=offer) == Decimal("2.49")  # not yet
    assert price_in_force(offer=offer, at=later + timedelta(seconds=1)) == Decimal("1.99")

    past = timezone.now() - timedelta(days=1)
    data.update(
        {
            "prices-2-0-effective_from_0": past.strftime("%Y-%m-%d"),
            "prices-2-0-effective_from_1": past.strftime("%H:%M:%S"),
            "prices-2-0-price_per_gpu_hour": "0.50",
        }
    )
    refused = operator_client.post(url, data)
    assert refused.status_code == 200 and b"cannot be changed in the past" in refused.content
    assert not OfferPrice.objects.filter(price_per_gpu_hour=Decimal("0.50")).exists()
