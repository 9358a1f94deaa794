"""The billing REST API: balance, usage, invoices (finalized, current, CSV), spend alerts, notices, and
what reservations cost through the API (reserved terms, 402 when the balance cannot cover a hold).

Usage is made the real way: reservations are made, begun and activated through the services and rated
with ``usage_rate(now=...)``; a month is finalized with ``invoice_month``. Rating up to a moment past
the end of this month lets this month be finalized without moving any clock."""

import csv
import io
import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from marketplace.choices import Role
from marketplace.models import (
    Allocation,
    IdempotencyRecord,
    Invoice,
    LedgerEntry,
    LedgerTransaction,
    Reservation,
    SpendAlert,
)
from marketplace.money import add_months, cents, cost, month_bounds, month_start, seconds_between
from marketplace.services.billing.credits import credits_grant
from marketplace.services.billing.invoicing import invoice_month
from marketplace.services.billing.metering import usage_rate
from marketplace.services.billing.spend import credit_limit_set, spend_alert_create
from marketplace.services.reservations.lifecycle import reservation_activate, reservation_begin, reservation_create
from marketplace.services.tenancy.members import membership_set
from marketplace.tenant_context import TenantContext
from tests.factories import PASSWORD, make_tenant, make_user

PRICE = Decimal("2.50")  # per GPU-hour; 8 GPUs a node: $20 an hour
# The shared offer: $2.50 per GPU-hour, 20% off for a one-month term, four free nodes.
pytestmark = [
    pytest.mark.django_db,
    pytest.mark.offer(price=PRICE, nodes=4, term_discounts={1: "20"}, max_duration_hours=48),
]
GPUS = 8


def active_reservation(tenant, offer, *, hours: int = 2) -> Reservation:
    """A reservation made, begun and activated through the services (active from now)."""
    reservation = reservation_create(
        tenant=tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=hours)
    )
    assert reservation_begin(reservation_id=reservation.pk)
    assert reservation_activate(reservation_id=reservation.pk)
    reservation.refresh_from_db()
    return reservation


def rate_for(reservation: Reservation, minutes: int = 30) -> Decimal:
    """Rate ``reservation`` for ``minutes`` of activity (within its month); returns the seconds rated."""
    until = min(
        reservation.activated_at + timedelta(minutes=minutes), month_bounds(month_start(reservation.activated_at))[1]
    )
    usage_rate(now=until, reservation_ids=[reservation.pk])
    return seconds_between(reservation.activated_at, until)


def charge(seconds: Decimal, price: Decimal = PRICE) -> Decimal:
    return cost(price_per_gpu_hour=price, gpus=GPUS, seconds=seconds)


def hold_of(reservation: Reservation, price: Decimal = PRICE) -> Decimal:
    return charge(seconds_between(reservation.start, reservation.end), price)


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if field:
        assert field in error["fields"], error
    return error


class TestBalance:
    def test_credits_holds_and_spend(self, tenant, client_for, offer):
        client = client_for(tenant)
        reservation = active_reservation(tenant, offer)
        hold = hold_of(reservation)
        assert client.get("/api/v1/balance/").json() == {
            "currency": "USD",
            "balance": "100000.00",
            "available": str(cents(Decimal(100000) - hold)),
            "held": str(cents(hold)),
            "credit_limit": "0.00",
            "spent": "0.00",
            "spent_this_month": "0.00",
            "depleted_at": None,
        }
        spent = charge(rate_for(reservation))
        body = client.get("/api/v1/balance/").json()
        assert body["spent"] == str(cents(spent))
        assert body["balance"] == str(cents(Decimal(100000) - spent))
        assert body["held"] == str(cents(hold - spent))  # usage is paid from the hold first
        assert body["available"] == str(cents(Decimal(100000) - hold))

    def test_each_tenant_sees_its_own(self, tenant, other_tenant, client_for, offer):
        active_reservation(other_tenant, offer)
        assert client_for(tenant).get("/api/v1/balance/").json()["held"] == "0.00"

    def test_viewers_read_it_and_so_do_browser_sessions(self, client_for):
        viewer = make_tenant(role=Role.VIEWER, credit="12.34")
        assert client_for(viewer).get("/api/v1/balance/").json()["balance"] == "12.34"
        browser = Client()
        assert browser.login(username=viewer.user.email, password=PASSWORD)
        assert browser.get("/api/v1/balance/").json()["available"] == "12.34"

    def test_without_a_key_it_is_401(self, api_client):
        assert_error(api_client.get("/api/v1/balance/"), 401, "not_authenticated")


class TestUsage:
    def test_this_month_per_reservation_with_totals(self, tenant, other_tenant, client_for, offer):
        reservation = active_reservation(tenant, offer)
        reservation_create(  # pending, never active: nothing to rate
            tenant=tenant,
            offer=offer,
            quantity=1,
            start=timezone.now() + timedelta(hours=5),
            end=timezone.now() + timedelta(hours=6),
        )
        rate_for(active_reservation(other_tenant, offer), minutes=50)
        seconds = rate_for(reservation)
        amount = charge(seconds)
        body = client_for(tenant).get("/api/v1/usage/").json()
        gpu_hours = str((seconds * GPUS / 3600).quantize(Decimal("0.0001")))
        assert body["lines"] == [
            {
                "reservation": str(reservation.pk),
                "offer": str(offer),
                "offer_id": offer.pk,
                "term_months": None,
                "gpu_count": GPUS,
                "price_per_gpu_hour": "2.5000",
                "seconds": f"{seconds:.6f}",
                "gpu_hours": gpu_hours,
                "amount": str(cents(amount)),
                "amount_exact": f"{amount:.10f}",
            }
        ]
        assert body["currency"] == "USD" and body["gpu_hours"] == gpu_hours
        assert body["amount"] == str(cents(amount)) and body["amount_exact"] == f"{amount:.10f}"
        start, end = parse_datetime(body["start"]), parse_datetime(body["end"])
        assert start == month_bounds(month_start(timezone.now()))[0] and start < end <= timezone.now()

    def test_a_window_without_usage_is_empty(self, tenant, client_for, offer):
        rate_for(active_reservation(tenant, offer))
        body = client_for(tenant).get("/api/v1/usage/", {"start": "2020-01-01", "end": "2020-02-01T00:00:00Z"}).json()
        assert body["lines"] == [] and body["amount"] == "0.00" and body["seconds"] == "0.000000"
        assert parse_datetime(body["end"]) == parse_datetime("2020-02-01T00:00:00Z")

    @pytest.mark.parametrize(
        ("query", "field"),
        [
            ({"start": "yesterday"}, "start"),
            ({"end": "2026-02-30"}, "end"),
            ({"start": "2026-03-02", "end": "2026-03-01"}, "end"),
            ({"start": "2026-03-01T00:00:00Z", "end": "2026-03-01T00:00:00Z"}, "end"),
            ({"end": "2001-01-01"}, "end"),  # before the default start
            ({"start": "2024-01-01", "end": "2025-03-01"}, "end"),  # more than about 13 months
        ],
    )
    def test_bad_windows_are_400_in_the_error_shape(self, tenant, client_for, query, field):
        response = client_for(tenant).get("/api/v1/usage/", query)
        assert_error(response, 400, "validation_error", field)


@pytest.fixture
def invoiced(offer):
    """This month finalized for two tenants: ``mine`` with two reservations, ``theirs`` with one."""
    mine = make_tenant(role=Role.MEMBER)
    theirs = make_tenant(role=Role.OWNER)
    reservations = [active_reservation(mine, offer), active_reservation(mine, offer), active_reservation(theirs, offer)]
    month = month_start(reservations[0].activated_at)
    month_end = month_bounds(month)[1]
    usage_rate(now=month_end + timedelta(hours=1))  # a piece in the next month too, not on this invoice
    assert invoice_month(month=month) == 2
    return {
        "mine": mine,
        "theirs": theirs,
        "month": month,
        "reservations": reservations[:2],
        "invoice": Invoice.objects.get(organization=mine.organization),
        "their_invoice": Invoice.objects.get(organization=theirs.organization),
        "amounts": [cents(charge(seconds_between(r.activated_at, month_end))) for r in reservations[:2]],
    }


class TestInvoices:
    def test_list_shows_only_this_tenants_finalized_invoices(self, invoiced, client_for):
        body = client_for(invoiced["mine"]).get("/api/v1/invoices/").json()
        assert body["count"] == 1
        (invoice,) = body["results"]
        month = invoiced["month"]
        assert invoice["id"] == str(invoiced["invoice"].pk)
        assert invoice["number"] == f"NC-{month:%Y%m}-{invoiced['mine'].organization.slug}"
        assert invoice["month"] == month.isoformat() and invoice["status"] == "finalized"
        assert invoice["currency"] == "USD" and invoice["total"] == str(sum(invoiced["amounts"]))
        assert "lines" not in invoice

    def test_detail_has_a_line_per_reservation(self, invoiced, client_for):
        invoice = invoiced["invoice"]
        body = client_for(invoiced["mine"]).get(f"/api/v1/invoices/{invoice.pk}/").json()
        month_end = month_bounds(invoiced["month"])[1]
        lines = {line["reservation"]: line for line in body["lines"]}
        assert set(lines) == {str(r.pk) for r in invoiced["reservations"]}
        for reservation, amount in zip(invoiced["reservations"], invoiced["amounts"], strict=True):
            line = lines[str(reservation.pk)]
            seconds = seconds_between(reservation.activated_at, month_end)
            assert line["amount"] == str(amount) and line["seconds"] == f"{seconds:.6f}"
            assert line["gpu_count"] == GPUS and line["price_per_gpu_hour"] == "2.5000"
            assert line["description"].startswith("1× 8× H100 SXM node")
        assert body["total"] == str(sum(invoiced["amounts"]))

    def test_csv_parses_and_its_total_is_the_invoice_total(self, invoiced, client_for):
        invoice = invoiced["invoice"]
        response = client_for(invoiced["mine"]).get(f"/api/v1/invoices/{invoice.pk}/csv/")
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/csv")
        assert response["Content-Disposition"] == f'attachment; filename="{invoice.number}.csv"'
        rows = list(csv.DictReader(io.StringIO(response.content.decode())))
        assert list(rows[0]) == [
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
        *lines, total = rows
        assert {row["reservation"] for row in lines} == {str(r.pk) for r in invoiced["reservations"]}
        assert total["description"] == "Total" and total["reservation"] == ""
        assert Decimal(total["amount"]) == invoice.total == sum(Decimal(row["amount"]) for row in lines)
        assert Decimal(total["gpu_hours"]) == sum(Decimal(row["gpu_hours"]) for row in lines)
        assert sorted(Decimal(row["amount"]) for row in lines) == sorted(invoiced["amounts"])

    def test_another_tenants_invoice_is_404_everywhere(self, invoiced, client_for):
        client = client_for(invoiced["mine"])
        theirs = invoiced["their_invoice"].pk
        for path in [f"/api/v1/invoices/{theirs}/", f"/api/v1/invoices/{theirs}/csv/", "/api/v1/invoices/nope/"]:
            assert_error(client.get(path), 404, "not_found")
        assert client.get("/api/v1/invoices/").json()["count"] == 1

    def test_viewers_read_invoices(self, invoiced, client_for):
        organization = invoiced["mine"].organization
        user = make_user()
        membership_set(organization=organization, user=user, role=Role.VIEWER)
        viewer = TenantContext(organization=organization, user=user, role=Role.VIEWER)
        client = client_for(viewer)
        assert client.get("/api/v1/invoices/").json()["count"] == 1
        assert client.get(f"/api/v1/invoices/{invoiced['invoice'].pk}/csv/").status_code == 200

    def test_current_is_the_month_in_progress_as_a_draft(self, tenant, other_tenant, client_for, offer):
        reservation = active_reservation(tenant, offer)
        amount = cents(charge(rate_for(reservation)))
        rate_for(active_reservation(other_tenant, offer))
        body = client_for(tenant).get("/api/v1/invoices/current/").json()
        assert body["status"] == "draft" and body["currency"] == "USD"
        assert body["month"] == month_start(timezone.now()).isoformat()
        assert [(line["reservation"], line["amount"]) for line in body["lines"]] == [(str(reservation.pk), str(amount))]
        assert body["total"] == str(amount)
        assert parse_datetime(body["as_of"]) <= timezone.now()

    def test_current_without_usage_is_empty(self, tenant, client_for):
        body = client_for(tenant).get("/api/v1/invoices/current/").json()
        assert body["lines"] == [] and body["total"] == "0.00"


@pytest.fixture
def admin():
    return make_tenant(role=Role.ADMIN)


class TestSpendAlerts:
    def test_admins_set_them_and_everyone_reads_them(self, admin, client_for):
        client = client_for(admin, role=Role.ADMIN)
        first = client.post("/api/v1/spend-alerts/", {"threshold": "250.00"}, format="json")
        assert first.status_code == 201, first.content
        assert first.json()["threshold"] == "250.00" and first.json()["last_notified_month"] is None
        second = client.post("/api/v1/spend-alerts/", {"threshold": 100.5}, format="json")
        assert second.status_code == 201 and second.json()["threshold"] == "100.50"

        user = make_user()
        membership_set(organization=admin.organization, user=user, role=Role.VIEWER)
        viewer = TenantContext(organization=admin.organization, user=user, role=Role.VIEWER)
        listed = client_for(viewer).get("/api/v1/spend-alerts/").json()
        assert [alert["threshold"] for alert in listed["results"]] == ["100.50", "250.00"]

    def test_the_same_threshold_twice_is_409(self, admin, client_for):
        client = client_for(admin, role=Role.ADMIN)
        assert client.post("/api/v1/spend-alerts/", {"threshold": "50"}, format="json").status_code == 201
        assert_error(client.post("/api/v1/spend-alerts/", {"threshold": 50}, format="json"), 409, "duplicate_alert")
        assert SpendAlert.objects.filter(organization=admin.organization).count() == 1

    @pytest.mark.parametrize(
        "threshold",
        ["-5", "0", 0, "0.00", "abc", "1.234", 1.234, "", "   ", "NaN", "Infinity", "1e12", "1e30", None, True],
    )
    def test_bad_thresholds_are_400_with_the_field_and_change_nothing(self, admin, client_for, threshold):
        response = client_for(admin, role=Role.ADMIN).post(
            "/api/v1/spend-alerts/", {"threshold": threshold}, format="json"
        )
        assert response.status_code == 400, response.content
        error = response.json()["error"]
        assert error["message"] and error["fields"]["threshold"]
        assert not SpendAlert.objects.exists()

    def test_a_missing_threshold_is_400(self, admin, client_for):
        assert_error(
            client_for(admin, role=Role.ADMIN).post("/api/v1/spend-alerts/", {}, format="json"), 400, "validation_error"
        )

    @pytest.mark.parametrize("role", [Role.VIEWER, Role.MEMBER])
    def test_viewers_and_members_cannot_set_or_remove_them(self, admin, client_for, role):
        alert = spend_alert_create(tenant=admin, threshold="10")

        user = make_user()
        membership_set(organization=admin.organization, user=user, role=role)
        client = client_for(TenantContext(organization=admin.organization, user=user, role=role))
        assert_error(client.post("/api/v1/spend-alerts/", {"threshold": "20"}, format="json"), 403, "permission_denied")
        assert_error(client.delete(f"/api/v1/spend-alerts/{alert.pk}/"), 403, "permission_denied")
        assert list(SpendAlert.objects.values_list("threshold", flat=True)) == [Decimal("10.00")]

    def test_an_admin_key_of_an_owner_may_but_a_viewer_key_may_not(self, client_for):
        owner = make_tenant(role=Role.OWNER)
        body = {"threshold": "10"}
        assert client_for(owner, role=Role.ADMIN).post("/api/v1/spend-alerts/", body, format="json").status_code == 201
        response = client_for(owner, role=Role.VIEWER).post("/api/v1/spend-alerts/", body, format="json")
        assert_error(response, 403, "permission_denied")

    def test_admins_remove_them_but_not_another_tenants(self, admin, other_tenant, client_for):
        mine = spend_alert_create(tenant=admin, threshold="10")
        theirs = spend_alert_create(tenant=other_tenant, threshold="10")
        client = client_for(admin, role=Role.ADMIN)
        assert_error(client.delete(f"/api/v1/spend-alerts/{theirs.pk}/"), 404, "not_found")
        assert_error(client.delete("/api/v1/spend-alerts/x/"), 404, "not_found")
        assert client.delete(f"/api/v1/spend-alerts/{mine.pk}/").status_code == 204
        assert list(SpendAlert.objects.all()) == [theirs]
        assert client.get("/api/v1/spend-alerts/").json()["count"] == 0

    def test_a_retry_with_the_same_key_makes_one_alert(self, admin, client_for):
        client = client_for(admin, role=Role.ADMIN)
        first = client.post("/api/v1/spend-alerts/", {"threshold": "75"}, format="json", HTTP_IDEMPOTENCY_KEY="k1")
        again = client.post("/api/v1/spend-alerts/", {"threshold": "75"}, format="json", HTTP_IDEMPOTENCY_KEY="k1")
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
        assert SpendAlert.objects.count() == 1

    def test_a_reached_alert_becomes_a_notice(self, admin, other_tenant, client_for, offer):
        client = client_for(admin, role=Role.ADMIN)
        assert client.post("/api/v1/spend-alerts/", {"threshold": "5"}, format="json").status_code == 201
        rate_for(active_reservation(admin, offer))  # $10
        notices = client.get("/api/v1/billing-notices/").json()
        assert notices[0]["kind"] == "spend_alert" and "$5.00" in notices[0]["message"]
        alert = client.get("/api/v1/spend-alerts/").json()["results"][0]
        assert alert["last_notified_month"] == month_start(timezone.now()).isoformat()
        assert all(n["kind"] != "spend_alert" for n in client_for(other_tenant).get("/api/v1/billing-notices/").json())


class TestNotices:
    def test_latest_first_limited_and_sealed(self, tenant, other_tenant, client_for):
        for amount in ("1", "2", "3"):
            credits_grant(organization=tenant.organization, amount=amount)
        client = client_for(tenant)
        notices = client.get("/api/v1/billing-notices/").json()
        assert [n["kind"] for n in notices] == ["credits_granted"] * 4  # with the fixture's grant
        assert "$3.00" in notices[0]["message"] and "$100,000.00" in notices[-1]["message"]
        assert len(client.get("/api/v1/billing-notices/", {"limit": 2}).json()) == 2
        theirs = client_for(other_tenant).get("/api/v1/billing-notices/").json()
        assert len(theirs) == 1 and "$3.00" not in theirs[0]["message"]

    @pytest.mark.parametrize("limit", ["0", "101", "x"])
    def test_a_bad_limit_is_400(self, tenant, client_for, limit):
        assert_error(client_for(tenant).get("/api/v1/billing-notices/", {"limit": limit}), 400, "validation_error")


def post_reservation(client, body, **headers):
    return client.post("/api/v1/reservations/", body, format="json", **headers)


def nothing_written_for(tenant) -> None:
    organization = tenant.organization
    assert not Reservation.objects.filter(organization=organization).exists()
    assert not Allocation.objects.filter(reservation__organization=organization).exists()
    assert (
        not LedgerEntry.objects.filter(account__organization=organization).exclude(transaction__kind="grant").exists()
    )
    assert not LedgerTransaction.objects.filter(organization=organization).exclude(kind="grant").exists()
    assert not IdempotencyRecord.objects.filter(organization=organization).exists()


class TestReservationsCostMoney:
    def test_a_term_reservation_gets_the_discount_and_ends_after_its_months(self, tenant, client_for, offer):
        client = client_for(tenant)
        response = post_reservation(client, {"offer": offer.pk, "term_months": 1})
        assert response.status_code == 201, response.content
        body = response.json()
        start, end = parse_datetime(body["start"]), parse_datetime(body["end"])
        assert body["term_months"] == 1 and body["price"]["per_gpu_hour"] == "2.0000"  # 20% off 2.50
        assert end == add_months(start, 1)
        reservation = Reservation.objects.get(pk=body["id"])
        hold = hold_of(reservation, Decimal("2.00"))
        assert body["price"]["estimated_total"] == str(cents(hold))
        assert client.get("/api/v1/balance/").json()["held"] == str(cents(hold))

    @pytest.mark.parametrize(("term", "code"), [(3, "invalid_term"), (2, "validation_error")])
    def test_a_term_the_offer_does_not_have_is_400(self, tenant, client_for, offer, term, code):
        response = post_reservation(client_for(tenant), {"offer": offer.pk, "term_months": term})
        assert_error(response, 400, code, "term_months")
        nothing_written_for(tenant)

    def test_without_credit_it_is_402_and_nothing_is_made(self, client_for, offer):
        poor = make_tenant(role=Role.MEMBER, credit=None)
        client = client_for(poor)
        for headers in ({}, {"HTTP_IDEMPOTENCY_KEY": "first-try"}):
            response = post_reservation(client, {"offer": offer.pk, "duration_hours": 1}, **headers)
            error = assert_error(response, 402, "insufficient_balance")
            assert "$20.00" in error["message"] and "Add credit" in error["message"]
            assert error["required"] == "20.00" and error["available"] == "0.00"
            nothing_written_for(poor)
        assert client.get("/api/v1/balance/").json()["held"] == "0.00"

    def test_with_an_operator_credit_line_it_is_made(self, client_for, offer):
        poor = make_tenant(role=Role.MEMBER, credit=None)
        credit_limit_set(organization=poor.organization, limit="100")
        client = client_for(poor)
        response = post_reservation(
            client, {"offer": offer.pk, "duration_hours": 1}, HTTP_IDEMPOTENCY_KEY="with-a-credit-line"
        )
        assert response.status_code == 201, response.content
        hold = hold_of(Reservation.objects.get(pk=response.json()["id"]))
        balance = client.get("/api/v1/balance/").json()
        assert balance["credit_limit"] == "100.00" and balance["held"] == str(cents(hold))
        assert balance["available"] == str(cents(-hold)) and balance["balance"] == "0.00"

    def test_an_extension_beyond_the_balance_is_402_and_keeps_the_end(self, client_for, offer):
        tenant = make_tenant(role=Role.MEMBER, credit="30")
        client = client_for(tenant)
        created = post_reservation(client, {"offer": offer.pk, "duration_hours": 1})
        assert created.status_code == 201, created.content
        reservation_id, end = created.json()["id"], parse_datetime(created.json()["end"])
        entries = LedgerEntry.objects.count()
        response = client.post(
            f"/api/v1/reservations/{reservation_id}/extend/",
            {"end": (end + timedelta(hours=1)).isoformat()},
            format="json",
        )
        error = assert_error(response, 402, "insufficient_balance")
        assert error["required"] == "20.00"
        assert parse_datetime(client.get(f"/api/v1/reservations/{reservation_id}/").json()["end"]) == end
        assert {a.period.upper for a in Allocation.objects.filter(reservation_id=reservation_id)} == {end}
        assert LedgerEntry.objects.count() == entries
        # A shorter extension that the balance covers goes through.
        response = client.post(
            f"/api/v1/reservations/{reservation_id}/extend/",
            {"end": (end + timedelta(minutes=15)).isoformat()},
            format="json",
        )
        assert response.status_code == 200, response.content


def test_the_openapi_schema_documents_billing_without_warnings(tmp_path):
    target = tmp_path / "schema.json"
    call_command("spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json", "--file", str(target))
    paths = json.loads(target.read_text())["paths"]
    for path in [
        "/api/v1/balance/",
        "/api/v1/usage/",
        "/api/v1/invoices/",
        "/api/v1/invoices/{id}/",
        "/api/v1/invoices/{id}/csv/",
        "/api/v1/invoices/current/",
        "/api/v1/spend-alerts/",
        "/api/v1/spend-alerts/{id}/",
        "/api/v1/billing-notices/",
    ]:
        assert path in paths, path
    assert "text/csv" in paths["/api/v1/invoices/{id}/csv/"]["get"]["responses"]["200"]["content"]
    assert "402" in paths["/api/v1/reservations/"]["post"]["responses"]
    assert "402" in paths["/api/v1/reservations/{id}/extend/"]["post"]["responses"]
    assert set(paths["/api/v1/spend-alerts/"]) == {"get", "post"}
