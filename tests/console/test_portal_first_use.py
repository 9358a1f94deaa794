"""What a new user meets first in the portal: the price step refuses what confirming would, the
form's help, where signing in lands, finished reservations as they really ran, and billing figures
that add up on screen."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.choices import Role
from marketplace.models import Quota, Reservation
from marketplace.services.billing.metering import usage_rate
from marketplace.services.reservations import lifecycle
from marketplace.services.reservations.lifecycle import reservation_check, reservation_create
from tests.conftest import key_client
from tests.factories import PASSWORD, activate, make_tenant, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.offer(price="2.50", nodes=3)]


def browser_for(user) -> Client:
    client = Client()
    assert client.login(username=user.email, password=PASSWORD)
    return client


def refusal(page: str) -> str:
    """The text of the form's refusal banner."""
    found = re.search(r'<div class="form-error" role="alert">(.+?)(?:\s*<a |</div>)', page, re.S)
    return found.group(1).strip() if found else ""


def both_steps(browser: Client, offer, form: dict):
    """The price step's and the confirm step's responses to the same form."""
    url = f"/offers/{offer.id}/reserve/"
    return browser.post(url, form), browser.post(url, {**form, "confirm": "1"})


# --- Item 13: the price step refuses what the confirm step would refuse ------------------------------


@pytest.mark.parametrize(
    ("case", "status", "says"),
    [
        ("capacity", 409, "Only 3 of the 9 nodes you asked for are free"),
        ("quota", 409, "may hold 8 "),
        ("balance", 402, "This needs a hold of $40.00 for its expected cost, and your organization has $0.00"),
        ("role", 403, "reserving capacity needs member or higher"),
    ],
)
def test_the_price_step_refuses_what_confirming_would_with_the_same_message(offer, case, status, says):
    role = Role.VIEWER if case == "role" else Role.MEMBER
    tenant = make_tenant(role=role, credit=None if case == "balance" else "100000")
    if case == "quota":
        Quota.objects.create(organization=tenant.organization, accelerator_type=offer.accelerator_type, max_gpus=8)
    quantity = {"capacity": 9, "quota": 2}.get(case, 1)
    quoted, confirmed = both_steps(
        browser_for(tenant.user), offer, {"quantity": quantity, "start": "", "duration_hours": "2"}
    )
    assert quoted.status_code == confirmed.status_code == status
    price_page = quoted.content.decode()
    assert says in refusal(price_page)
    assert refusal(price_page) == refusal(confirmed.content.decode())
    assert 'name="confirm"' not in price_page  # nothing to confirm that would be refused
    assert not Reservation.objects.exists()


def test_a_viewer_sees_the_price_and_no_confirm_button(offer):
    viewer = make_tenant(role=Role.VIEWER)
    page = browser_for(viewer.user).post(f"/offers/{offer.id}/reserve/", {"quantity": 1, "duration_hours": "1"})
    text = page.content.decode()
    assert "Estimated total" in text and "$20.00" in text
    assert 'name="confirm"' not in text and "Confirm reservation" not in text


def test_a_member_with_room_gets_the_confirm_button_and_the_check_writes_nothing(offer):
    member = make_tenant(role=Role.MEMBER)
    page = browser_for(member.user).post(f"/offers/{offer.id}/reserve/", {"quantity": 2, "duration_hours": "1"})
    assert page.status_code == 200 and 'name="confirm"' in page.content.decode()
    quote = reservation_check(
        tenant=member, offer=offer, quantity=3, start=None, end=timezone.now() + timedelta(hours=1)
    )
    assert quote.node_count == 3 and not Reservation.objects.exists()


# --- Item 14: the form's help ------------------------------------------------------------------------


def test_the_reserve_form_shows_its_help_and_hides_the_duration_for_a_term(offer):
    offer.term_discounts.create(term_months=3, percent_off=20)
    browser = browser_for(make_tenant(role=Role.MEMBER).user)
    page = browser.get(f"/offers/{offer.id}/reserve/").content.decode()
    assert "Leave empty to start now." in page
    assert "On demand only: a reserved term lasts its months." in page
    assert "<label data-duration-field >" in page  # shown for on demand
    with_term = browser.post(f"/offers/{offer.id}/reserve/", {"quantity": 1, "term_months": "3"}).content.decode()
    assert "<label data-duration-field hidden>" in with_term


# --- Item 15: where signing in lands -----------------------------------------------------------------


def sign_in(email: str) -> tuple[Client, object]:
    client = Client()
    landed = client.post("/login/", {"username": email, "password": PASSWORD}, follow=True)
    return client, landed


def test_an_operator_of_no_organization_lands_on_the_fleet_without_the_tenant_menu():
    operator = make_user("ops@example.com", is_superuser=True)
    client, landed = sign_in(operator.email)
    assert landed.status_code == 200 and landed.redirect_chain[-1][0] == "/fleet/"
    page = landed.content.decode()
    assert 'href="/admin/"' in page and 'href="/catalog/"' not in page and 'href="/billing/"' not in page
    assert client.get("/").headers["Location"] == "/fleet/"  # the brand link too


def test_an_operator_who_is_a_member_still_gets_the_tenant_pages():
    operator = make_user("ops@example.com", is_superuser=True)
    make_tenant(role=Role.MEMBER, user=operator)
    _client, landed = sign_in(operator.email)
    assert landed.redirect_chain[-1][0] == "/catalog/" and landed.status_code == 200
    assert 'href="/billing/"' in landed.content.decode() and 'href="/fleet/"' in landed.content.decode()


def test_someone_of_no_organization_sees_why_without_the_tenant_menu():
    nobody = make_user()
    _client, landed = sign_in(nobody.email)
    page = landed.content.decode()
    assert landed.status_code == 403 and "No organization yet" in page
    assert 'href="/catalog/"' not in page and 'href="/fleet/"' not in page


# --- Item 12: a finished reservation shows what really happened --------------------------------------


def finished_run(tenant, offer) -> Reservation:
    """One node (8 GPUs at $2.50: $20/h) booked for 5 h ($100 estimated), active for 2 h, released,
    completed and rated: $40 billed."""
    reservation = reservation_create(
        tenant=tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=5)
    )
    reservation = activate(reservation, since=timezone.now() - timedelta(hours=2))
    assert lifecycle.reservation_release(reservation_id=reservation.pk)
    assert lifecycle.reservation_complete(reservation_id=reservation.pk)
    usage_rate(reservation_ids=[reservation.pk])
    reservation.refresh_from_db()
    return reservation


def test_a_finished_reservation_shows_its_end_active_hours_and_bill(offer):
    tenant = make_tenant(role=Role.MEMBER)
    done = finished_run(tenant, offer)
    browser = browser_for(tenant.user)
    page = browser.get(f"/reservations/{done.id}/").content.decode()
    assert "<dt>Billed</dt><dd data-billed>$40.00</dd>" in page
    assert "2.00 h active" in page and f"{done.deactivated_at:%Y-%m-%d %H:%M} · completed" in page
    assert "Estimated total" not in page and "$100" not in page  # not the booked window's estimate
    assert f'data-live-cost="{done.id}"' not in page and 'data-telemetry-ws=""' in page  # nothing live

    listing = browser.get("/reservations/").content.decode()
    row = re.search(rf'<tr data-reservation="{done.id}">(.+?)</tr>', listing, re.S).group(1)
    assert "$40.00 <span" in row and "billed" in row and "data-live-cost" not in row and "$100" not in row


def test_the_api_says_when_it_ended_and_what_was_billed(offer):
    tenant = make_tenant(role=Role.MEMBER)
    done = finished_run(tenant, offer)
    waiting = reservation_create(
        tenant=tenant,
        offer=offer,
        quantity=1,
        start=timezone.now() + timedelta(hours=1),
        end=timezone.now() + timedelta(hours=2),
    )
    api = key_client(tenant)
    body = api.get(f"/api/v1/reservations/{done.id}/").json()
    assert body["billed"] == "40.00" and body["ended_at"] == done.deactivated_at.isoformat().replace("+00:00", "Z")
    listed = {r["id"]: r for r in api.get("/api/v1/reservations/").json()["results"]}
    assert listed[str(done.id)]["billed"] == "40.00"
    assert listed[str(waiting.id)]["billed"] is None and listed[str(waiting.id)]["ended_at"] is None
    lifecycle.reservation_cancel(tenant=tenant, reservation=waiting)
    cancelled = api.get(f"/api/v1/reservations/{waiting.id}/").json()
    assert cancelled["ended_at"] is not None and cancelled["billed"] is None


# --- Item 16: the billing page's figures add up --------------------------------------------------


def dollars(text: str) -> Decimal:
    return Decimal(text.replace("$", "").replace(",", "").replace("−", "-"))


def test_the_billing_page_figures_add_up_each_labelled(offer):
    tenant = make_tenant(role=Role.MEMBER, credit="1000")
    running = reservation_create(  # $20/h for 5 h: $100 held; active 30 minutes, not yet rated
        tenant=tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=5)
    )
    activate(running, since=timezone.now() - timedelta(minutes=30))
    page = browser_for(tenant.user).get("/billing/").content.decode()

    def figure(label: str) -> Decimal:
        found = re.search(rf"<dt>{label}</dt>(.*?)</dd>", page)
        assert found, label
        return dollars(re.sub(r"<[^>]+>", "", found.group(1)))

    balance, available, held = figure("Balance"), figure("Available"), figure("Held")
    unrated = -figure("Running, not yet rated")  # shown as what it takes off
    assert (available, held) == (Decimal("900.00"), Decimal("100.00"))
    assert Decimal("9.99") <= unrated <= Decimal("10.10")  # half an hour at $20/h, as the page was made
    assert balance == available + held - unrated
    assert "available + held − running, not yet rated" in page
