"""The billing part of the portal: the dashboard, the billing page, invoices (page and CSV), spend
alerts, and reserving with a term or without the credit for the hold. Real data through the real
services: reservations made, activated and rated, a month finalized."""

import csv
import io
import json
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.choices import Role
from marketplace.models import Invoice, OfferTermDiscount, Reservation, SpendAlert
from marketplace.money import add_months, month_start
from marketplace.selectors.billing import daily_spend
from marketplace.services.billing.credits import credits_grant
from marketplace.services.billing.invoicing import invoice_month
from marketplace.services.billing.metering import usage_rate
from marketplace.services.billing.spend import spend_alert_create
from marketplace.services.reservations import lifecycle
from marketplace.services.reservations.lifecycle import reservation_create
from marketplace.services.tenancy.members import membership_set
from marketplace.tenant_context import TenantContext
from tests.factories import PASSWORD, make_tenant, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.offer(price="2.50", nodes=3)]


def browser_for(user) -> Client:
    client = Client()
    assert client.login(username=user.email, password=PASSWORD)
    return client


def run_for(tenant: TenantContext, offer, *, hours: int = 1, length: int | None = None) -> Reservation:
    """A reservation of one node (8 GPUs at $2.50: $20/h) for ``length`` hours (held) made, active,
    and rated for ``hours``."""
    end = timezone.now() + timedelta(hours=length or hours + 1)
    reservation = reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=end)
    lifecycle.reservation_begin(reservation_id=reservation.pk)
    lifecycle.reservation_activate(reservation_id=reservation.pk)
    reservation.refresh_from_db()
    usage_rate(now=reservation.activated_at + timedelta(hours=hours), reservation_ids=[reservation.pk])
    return reservation


def finalized(tenant: TenantContext, reservation: Reservation) -> Invoice:
    invoice_month(month=month_start(reservation.activated_at))
    return Invoice.objects.get(organization=tenant.organization)


def json_script(page: str, element_id: str):
    return json.loads(re.search(rf'<script id="{element_id}" type="application/json">(.+?)</script>', page).group(1))


def member_of(tenant: TenantContext, role: str):
    user = make_user()
    membership_set(organization=tenant.organization, user=user, role=role)
    return user


def test_anonymous_home_goes_to_sign_in_and_members_get_their_dashboard(offer):
    assert Client().get("/")["Location"] == "/login/"
    owner = make_tenant(name="Dash Labs")
    reservation = run_for(owner, offer)
    page = browser_for(owner.user).get("/").content.decode()
    assert "Dash Labs" in page and "Running now" in page
    # The running cost as the ticker computes it, ready for the live updates.
    cost = re.search(rf'data-live-cost="{reservation.id}">\$([\d,.]+)<', page).group(1)
    assert Decimal(cost.replace(",", "")) >= Decimal("0.00")
    assert "data-live-burn>$20.00<" in page  # 8 GPUs x $2.50/h
    tick = json_script(page, "billing-tick")
    assert tick["per_hour"] == "20.0000" and str(reservation.id) in tick["reservations"]
    # The balance: $100,000 of credit less the hour rated (the second hour is held, not spent).
    assert "data-live-balance>$99,980.00<" in page


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN, Role.MEMBER, Role.VIEWER])
def test_every_role_sees_billing_and_only_admins_manage_alerts(offer, role):
    owner = make_tenant(name="Billing Co")
    spend_alert_create(tenant=owner, threshold="25")
    reservation = run_for(owner, offer, hours=2)
    invoice = finalized(owner, reservation)
    user = owner.user if role == Role.OWNER else member_of(owner, role)
    browser = browser_for(user)

    page = browser.get("/billing/").content.decode()
    assert "data-live-balance>$99,960.00<" in page  # two hours at $20
    assert 'data-balance-field="spent_this_month">$40.00<' in page
    assert invoice.number in page and f"/billing/invoices/{invoice.id}/csv/" in page
    assert "$25.00" in page  # the alert
    assert "Spend this month reached $40.00" in page  # ... which fired at the rating
    chart = json.loads(
        re.search(r'<script id="spend-chart-data" type="application/json">(.+?)</script>', page).group(1)
    )
    assert Decimal(chart["amounts"][-1]) + sum(Decimal(a) for a in chart["amounts"][:-1]) == Decimal("40.00")
    assert "Total so far" in page and "$40.00" in page  # the month's preview
    admin = role in (Role.OWNER, Role.ADMIN)
    assert ("Add alert" in page) is admin
    assert ("Remove" in page) is admin
    assert ("Admins and owners set spend alerts" in page) is not admin

    sheet = browser.get(f"/billing/invoices/{invoice.id}/").content.decode()
    assert invoice.number in sheet and "Billing Co" in sheet and "$40.00" in sheet and "Download CSV" in sheet
    assert browser.get("/").status_code == 200
    assert browser.get(f"/reservations/{reservation.id}/").status_code == 200


def test_another_tenants_invoice_is_not_found(offer):
    mine, theirs = make_tenant(), make_tenant()
    reservation = run_for(theirs, offer)
    invoice = finalized(theirs, reservation)
    browser = browser_for(mine.user)
    for path in [f"/billing/invoices/{invoice.id}/", f"/billing/invoices/{invoice.id}/csv/"]:
        response = browser.get(path)
        assert response.status_code == 404 and invoice.number not in response.content.decode()
    assert browser.get("/billing/invoices/00000000-0000-0000-0000-000000000000/").status_code == 404
    assert invoice.number not in browser.get("/billing/").content.decode()


def test_the_invoice_csv_has_a_line_per_reservation_and_the_totals(offer):
    tenant = make_tenant(name="Csv Inc")
    first = run_for(tenant, offer, hours=1)
    second = run_for(tenant, offer, hours=3)
    invoice = finalized(tenant, second)
    response = browser_for(tenant.user).get(f"/billing/invoices/{invoice.id}/csv/")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"] == f'attachment; filename="{invoice.number}.csv"'
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0] == [
        "reservation",
        "description",
        "gpu_count",
        "gpu_hours",
        "price_per_gpu_hour",
        "amount",
        "energy_kwh",
        "endpoint",
        "replica_hours",
        "requests",
        "input_tokens",
    ]
    lines, total = rows[1:-1], rows[-1]
    assert sorted(row[0] for row in lines) == sorted([str(first.id), str(second.id)])
    assert sorted(Decimal(row[5]) for row in lines) == [Decimal("20.00"), Decimal("60.00")]
    assert total[1] == "Total" and Decimal(total[5]) == sum(Decimal(row[5]) for row in lines) == invoice.total
    assert Decimal(total[3]) == sum(Decimal(row[3]) for row in lines) == Decimal("32")  # 8 GPUs x 4 h


def test_admins_add_and_remove_alerts_and_bad_input_changes_nothing(offer):
    owner = make_tenant()
    admin = browser_for(member_of(owner, Role.ADMIN))
    added = admin.post("/billing/", {"threshold": "250"})
    assert added.status_code == 302 and added["Location"] == "/billing/"
    alert = SpendAlert.objects.get(organization=owner.organization)
    assert alert.threshold == Decimal("250.00")
    assert "reaches $250.00" in admin.get("/billing/").content.decode()

    for bad, status, says in [
        ("250", 409, "There is already an alert at $250"),
        ("lots", 400, "Enter a number"),
        ("-5", 400, "greater than or equal to 0.01"),
        ("1.234", 400, "no more than 2 decimal places"),
        ("", 400, "This field is required"),
    ]:
        response = admin.post("/billing/", {"threshold": bad})
        assert response.status_code == status, bad
        assert says in response.content.decode(), bad
    assert list(SpendAlert.objects.values_list("threshold", flat=True)) == [Decimal("250.00")]

    member = browser_for(member_of(owner, Role.MEMBER))
    refused = member.post("/billing/", {"threshold": "999"})
    assert refused.status_code == 403 and "setting spend alerts needs admin" in refused.content.decode()
    kept = member.post(f"/billing/alerts/{alert.id}/remove/", follow=True)
    assert "removing spend alerts needs admin" in kept.content.decode()
    assert SpendAlert.objects.count() == 1

    stranger = browser_for(make_tenant().user)
    assert stranger.post(f"/billing/alerts/{alert.id}/remove/").status_code == 404
    assert SpendAlert.objects.count() == 1

    removed = admin.post(f"/billing/alerts/{alert.id}/remove/", follow=True)
    assert "Removed the $250.00 alert." in removed.content.decode()
    assert not SpendAlert.objects.exists()


def test_reserve_with_a_term_at_its_discount(offer):
    OfferTermDiscount.objects.create(offer=offer, term_months=3, percent_off=Decimal("20"))
    tenant = make_tenant(role=Role.MEMBER)
    browser = browser_for(tenant.user)
    form_page = browser.get(f"/offers/{offer.id}/reserve/").content.decode()
    assert "On demand · $2.50/GPU-h" in form_page and "3 months · $2.00/GPU-h (−20%)" in form_page

    form = {"quantity": 1, "start": "", "duration_hours": "", "term_months": "3"}
    review = browser.post(f"/offers/{offer.id}/reserve/", form)
    assert review.status_code == 200
    page = review.content.decode()
    assert "$2.0000 per GPU-hour · 3-month reserved term" in page and "Held from your balance now" in page
    assert not Reservation.objects.exists()

    confirmed = browser.post(f"/offers/{offer.id}/reserve/", {**form, "confirm": "1"})
    reservation = Reservation.objects.get()
    assert confirmed["Location"] == f"/reservations/{reservation.id}/"
    assert reservation.term_months == 3 and reservation.price_per_gpu_hour == Decimal("2.0000")
    assert reservation.end == add_months(reservation.start, 3)
    detail = browser.get(confirmed["Location"]).content.decode()
    assert "3-month reserved term" in detail and "nothing until it is active" in detail

    # On demand still needs its hours.
    missing = browser.post(f"/offers/{offer.id}/reserve/", {"quantity": 1, "duration_hours": ""})
    assert missing.status_code == 400 and "How many hours?" in missing.content.decode()


def test_reserving_without_credit_for_the_hold_is_refused_on_the_form(offer):
    tenant = make_tenant(role=Role.MEMBER, credit=None)
    browser = browser_for(tenant.user)
    form = {"quantity": 1, "start": "", "duration_hours": "2"}
    review = browser.post(f"/offers/{offer.id}/reserve/", form)
    assert review.status_code == 402 and "$40.00" in review.content.decode()
    assert "your organization has $0.00 available for holds" in review.content.decode()

    refused = browser.post(f"/offers/{offer.id}/reserve/", {**form, "confirm": "1"})
    page = refused.content.decode()
    assert refused.status_code == 402
    assert "This needs a hold of $40.00 for its expected cost" in page and "See your balance" in page
    assert "your organization has $0.00 available for holds" in page
    assert not Reservation.objects.exists()


def test_the_reservation_page_shows_its_cost_and_the_balance(offer):
    tenant = make_tenant(role=Role.MEMBER)
    reservation = run_for(tenant, offer)
    page = browser_for(tenant.user).get(f"/reservations/{reservation.id}/").content.decode()
    assert f'data-live-cost="{reservation.id}"' in page and "Cost so far" in page
    assert f'<span data-live-rate="{reservation.id}">$20.00</span>/h while active' in page
    assert "data-live-balance>$99,980.00<" in page
    assert "Held for it" in page and "$20.00" in page  # two hours held, one spent


def test_a_depleted_balance_shows_its_notice_as_a_banner(offer):
    tenant = make_tenant(role=Role.MEMBER, credit="40")
    reservation = run_for(tenant, offer, hours=3, length=2)  # $60 of usage on $40 of credit (all held)
    for path in ["/", "/billing/", f"/reservations/{reservation.id}/"]:
        page = browser_for(tenant.user).get(path).content.decode()
        assert 'class="notice-banner notice-balance_depleted" role="alert">Your balance has run out.' in page, path
        assert "data-live-balance>-$20.00<" in page, path


def test_daily_spend_counts_each_day_of_the_month(offer):
    tenant = make_tenant()
    reservation = run_for(tenant, offer, hours=2)
    month = month_start(reservation.activated_at)
    days = daily_spend(tenant=tenant, month=month, now=reservation.activated_at)
    assert days[0]["day"] == month and days[-1]["day"] == reservation.activated_at.date()
    assert [d["day"].day for d in days] == list(range(1, len(days) + 1))
    assert sum(d["amount"] for d in days) == Decimal("40")
    whole = daily_spend(tenant=tenant, month=month_start(month - timedelta(days=1)))
    assert len(whole) >= 28 and not any(d["amount"] for d in whole)  # last month: every day, nothing spent
    assert not any(d["amount"] for d in daily_spend(tenant=make_tenant(), month=month))


def test_every_page_header_shows_the_tenants_own_balance():
    tenant = make_tenant(credit="1234.5")
    make_tenant(credit="777")  # another tenant's money never shows
    client = browser_for(tenant.user)
    page = client.get("/catalog/").content.decode()
    assert re.search(r'class="nav-balance"[^>]*>\s*<span data-live-balance>\$1,234\.50</span>', page)
    credits_grant(organization=tenant.organization, amount="1000")
    assert "$2,234.50" in client.get("/reservations/").content.decode()
    assert "$777.00" not in page

    loner = make_user()  # signed in, in no organization: no balance at all
    assert "nav-balance" not in browser_for(loner).get("/catalog/").content.decode()
