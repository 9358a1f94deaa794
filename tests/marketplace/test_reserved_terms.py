"""A reserved term is a commitment (docs/billing.md): its discounted price is paid for the whole term.
Released early by its tenant, its nodes are freed at once and the rest of the term is still billed, as
it elapses, from the hold placed when it was made; cancelled before it starts, it costs nothing; released
by the platform (an operator, a failure), nothing more is owed."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum
from django.test import Client
from django.utils import timezone

from marketplace.models import Reservation, UsageRecord
from marketplace.money import cost, month_start, seconds_between
from marketplace.selectors.billing import hold_remaining, invoice_lines, reservation_cost
from marketplace.services.billing.credits import credits_grant
from marketplace.services.billing.metering import usage_rate
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_begin,
    reservation_cancel,
    reservation_complete,
    reservation_create,
    reservation_release,
)
from tests.conftest import key_client
from tests.factories import PASSWORD, make_tenant

pytestmark = [pytest.mark.django_db, pytest.mark.offer(price="2.00", nodes=1, term_discounts={1: "25"})]


@pytest.fixture
def tenant():
    tenant = make_tenant()
    credits_grant(organization=tenant.organization, amount=Decimal("20000"), memo="test")
    return tenant


def term(tenant, offer, start=None) -> Reservation:
    return reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=None, term_months=1)


def charged(reservation) -> Decimal:
    return UsageRecord.objects.filter(reservation=reservation).aggregate(total=Sum("amount"))["total"] or Decimal(0)


def whole(reservation, start, end) -> Decimal:
    return cost(
        price_per_gpu_hour=reservation.price_per_gpu_hour,
        gpus=reservation.gpu_count,
        seconds=seconds_between(start, end),
    )


def test_releasing_a_term_early_frees_the_nodes_and_bills_the_rest_of_the_term(tenant, offer):
    reservation = term(tenant, offer)
    assert reservation.price_per_gpu_hour == Decimal("1.5000")  # 25 % off 2.00
    assert reservation_begin(reservation_id=reservation.pk) and reservation_activate(reservation_id=reservation.pk)
    reservation_cancel(tenant=tenant, reservation=Reservation.objects.get(pk=reservation.pk))
    reservation.refresh_from_db()
    assert reservation.state == "releasing" and reservation.released_early_at == reservation.deactivated_at
    assert reservation_complete(reservation_id=reservation.pk)
    assert not reservation.allocations.filter(live=True).exists()  # the nodes are free for others now
    other = make_tenant()
    credits_grant(organization=other.organization, amount=Decimal("5000"), memo="test")
    later = reservation_create(
        tenant=other, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=2)
    )
    assert later.allocations.get().node_id == reservation.allocations.get().node_id

    held = hold_remaining(reservation_ids=[reservation.pk])[reservation.pk]
    ten_days = reservation.activated_at + timedelta(days=10)
    usage_rate(now=ten_days)
    reservation.refresh_from_db()
    assert charged(reservation) == whole(reservation, reservation.activated_at, ten_days)  # still owed, as it elapses
    assert reservation.billing_settled_at is None
    assert reservation_cost(reservation=reservation, now=ten_days) == charged(reservation)

    usage_rate(now=reservation.end + timedelta(hours=1))
    reservation.refresh_from_db()
    assert charged(reservation) == whole(reservation, reservation.activated_at, reservation.end)  # the whole term
    assert reservation.billing_settled_at is not None
    assert hold_remaining(reservation_ids=[reservation.pk]).get(reservation.pk, Decimal(0)) == 0
    assert charged(reservation) <= held + whole(reservation, reservation.start, reservation.activated_at)


def test_a_term_released_while_provisioning_owes_the_rest_of_the_term_from_the_release(tenant, offer):
    reservation = term(tenant, offer)
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_cancel(tenant=tenant, reservation=Reservation.objects.get(pk=reservation.pk))
    reservation.refresh_from_db()
    assert reservation.activated_at is None and reservation.released_early_at is not None
    usage_rate(now=reservation.end + timedelta(minutes=1))
    reservation.refresh_from_db()
    assert charged(reservation) == whole(reservation, reservation.released_early_at, reservation.end)
    assert reservation.billing_settled_at is not None


def test_a_term_cancelled_before_it_starts_costs_nothing(tenant, offer):
    reservation = term(tenant, offer, start=timezone.now() + timedelta(days=2))
    reservation_cancel(tenant=tenant, reservation=reservation)
    reservation.refresh_from_db()
    assert reservation.state == "cancelled" and reservation.released_early_at is None
    usage_rate(now=reservation.end + timedelta(days=1))
    assert charged(reservation) == 0
    assert hold_remaining(reservation_ids=[reservation.pk]).get(reservation.pk, Decimal(0)) == 0


def test_a_term_the_platform_releases_owes_only_its_active_time(tenant, offer):
    reservation = term(tenant, offer)
    assert reservation_begin(reservation_id=reservation.pk) and reservation_activate(reservation_id=reservation.pk)
    assert reservation_release(reservation_id=reservation.pk, reason="node failed")  # not the tenant's doing
    reservation.refresh_from_db()
    assert reservation.released_early_at is None
    usage_rate(now=reservation.deactivated_at + timedelta(days=3))
    reservation.refresh_from_db()
    assert charged(reservation) == whole(reservation, reservation.activated_at, reservation.deactivated_at)
    assert reservation.billing_settled_at is not None


def test_an_on_demand_reservation_released_early_owes_only_its_active_time(tenant, offer):
    reservation = reservation_create(
        tenant=tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=5)
    )
    assert reservation_begin(reservation_id=reservation.pk) and reservation_activate(reservation_id=reservation.pk)
    reservation_cancel(tenant=tenant, reservation=Reservation.objects.get(pk=reservation.pk))
    reservation.refresh_from_db()
    assert reservation.released_early_at is None
    usage_rate(now=reservation.end + timedelta(hours=1))
    assert charged(reservation) == whole(reservation, reservation.activated_at, reservation.deactivated_at)


def test_the_invoice_line_says_the_rest_of_the_term_is_committed(tenant, offer):
    reservation = term(tenant, offer)
    assert reservation_begin(reservation_id=reservation.pk) and reservation_activate(reservation_id=reservation.pk)
    reservation_cancel(tenant=tenant, reservation=Reservation.objects.get(pk=reservation.pk))
    usage_rate(now=timezone.now() + timedelta(minutes=5))
    lines = invoice_lines(organization_ids=[tenant.organization.pk], month=month_start(timezone.now().date()))
    (line,) = lines[tenant.organization.pk]
    assert "1-month term" in line["description"] and "committed" in line["description"]
    assert line["energy_kwh"] == 0  # no GPU draw after the release is joined to it


def test_the_reserve_form_and_the_api_state_the_commitment(tenant, offer):

    client = Client()
    assert client.login(username=tenant.user.email, password=PASSWORD)
    form = client.get(f"/offers/{offer.pk}/reserve/").content.decode()
    assert "A reserved term is a commitment" in form
    quote = client.post(f"/offers/{offer.pk}/reserve/", {"quantity": 1, "term_months": 1}).content.decode()
    assert "1-month commitment" in quote and "still bills the rest of the term" in quote
    schema = key_client(tenant).get("/api/v1/schema/?format=json").json()
    cancel = schema["paths"]["/api/v1/reservations/{id}/cancel/"]["post"]["description"]
    assert "commitment" in cancel
    reservation = term(tenant, offer)
    assert reservation_begin(reservation_id=reservation.pk) and reservation_activate(reservation_id=reservation.pk)
    api = key_client(tenant)
    assert api.post(f"/api/v1/reservations/{reservation.pk}/cancel/").status_code == 200
    assert api.get(f"/api/v1/reservations/{reservation.pk}/").json()["released_early_at"] is not None
