"""Inference endpoints on usage and invoices (selectors.billing.invoice_lines and usage_of): an endpoint
is one line, its replicas' slice reservations added up -- replica-hours, GPU-hours, energy, and the
requests and input tokens its gateways answered -- for exactly the money those reservations were
rated (metering is unchanged), rounded once; sealed per tenant on every surface.

Everything is made the real way: endpoints and their replicas through the endpoint services, the
replicas' reservations through the lifecycle, usage rated by metering, energy written by the telemetry
service, traffic counted by a gateway's TrafficCounter, handed over through Redis and collected by
traffic_collect, a month finalized by invoice_month."""

import csv
import io
from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
import redis
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.db.models import Sum
from django.test import Client
from django.utils import timezone

from marketplace.models import Invoice, InvoiceLine, LedgerEntry, Reservation, UsageRecord
from marketplace.money import cents, cost, month_bounds, month_start, seconds_between
from marketplace.selectors.billing import invoice_lines
from marketplace.services.billing.invoicing import invoice_month
from marketplace.services.billing.metering import usage_rate
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.lifecycle import endpoint_create
from marketplace.services.endpoints.traffic import COLLECT_LOCK_KEY, TRAFFIC_KEY, TrafficCounter, traffic_collect
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_begin,
    reservation_complete,
    reservation_create,
    reservation_release,
)
from provisioning.choices import SiteKind
from provisioning.models import Gpu
from provisioning.services.telemetry import rollups_write
from provisioning.services.telemetry_ingest import GpuMinute
from tests.factories import PASSWORD, RackFactory, SiteFactory, activate, make_node, make_served_model, make_tenant

# The shared offer (a plain rental beside the endpoint): $2.49 per GPU-hour, whole 8-GPU nodes.
pytestmark = [pytest.mark.django_db, pytest.mark.offer(price="2.49", nodes=2)]
SLICE_PRICE = Decimal("1.00")  # make_served_model's 1-GPU slice offer
MJ_A_GPU_MINUTE = 36_000_000  # 0.01 kWh


def previous(month: date) -> date:
    return month_start(month_bounds(month)[0] - timedelta(days=1))


MONTH = previous(previous(month_start(timezone.now())))  # ended, and the month after it too
MONTH_START, MONTH_END = month_bounds(MONTH)


def at(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return MONTH_START.replace(day=day, hour=hour, minute=minute)


@pytest.fixture
def model(db):
    """A served 1-GPU model and one 8-GPU edge node in eu-central to run it on, at $1.00 per GPU-hour."""
    return make_served_model(region="eu-central", nodes=1)


@pytest.fixture(autouse=True)
def _no_waiting_traffic():
    """This test database's Redis (REDIS_URL is ours alone) holds no batch from an earlier test."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(TRAFFIC_KEY, COLLECT_LOCK_KEY)
    yield
    client.delete(TRAFFIC_KEY, COLLECT_LOCK_KEY)


def deploy(tenant, model, *, replicas: int = 2, name: str = "embed"):
    endpoint = endpoint_create(
        tenant=tenant, name=name, model=model, region="eu-central", min_replicas=replicas, max_replicas=replicas
    )
    return endpoint, [replica.reservation for replica in endpoint.replicas.select_related("reservation")]


def run(reservation: Reservation, start: datetime, end: datetime) -> Reservation:
    """Take it through its whole lifecycle, then move its recorded active interval to [start, end):
    tests cannot wait for months to pass."""
    assert reservation_begin(reservation_id=reservation.pk)
    assert reservation_activate(reservation_id=reservation.pk)
    assert reservation_release(reservation_id=reservation.pk)
    assert reservation_complete(reservation_id=reservation.pk)
    Reservation.objects.filter(pk=reservation.pk).update(activated_at=start, deactivated_at=end)
    reservation.refresh_from_db()
    return reservation


def gateway_traffic(*counts) -> int:
    """``(endpoint, replica reservation or None, when, status, input tokens each, how many)``: counted by a
    gateway's TrafficCounter, pushed to Redis as one batch and merged by the collector, as in production."""
    counter = TrafficCounter()
    for endpoint, reservation, when, status, tokens, how_many in counts:
        for _ in range(how_many):
            counter.record(
                endpoint_id=str(endpoint.pk),
                replica_id=str(reservation.replica.pk) if reservation else None,
                status=status,
                latency_ms=20.0,
                input_tokens=tokens,
                now=when.timestamp(),
            )
    redis.Redis.from_url(settings.REDIS_URL).rpush(TRAFFIC_KEY, counter.batch())
    added = traffic_collect()
    assert added == sum(count[-1] for count in counts)
    return added


def gpu_energy(gpus, minutes: list[datetime], mj: int) -> None:
    rollups_write(
        [
            GpuMinute(
                gpu_id=gpu.pk,
                minute=int(minute.timestamp()),
                samples=1,
                util_n=1,
                util_sum=50.0,
                util_max=50.0,
                power_n=1,
                power_sum=300.0,
                power_max=300.0,
                temp_max=55.0,
                fb_used_max=1000.0,
                energy_mj=mj,
            )
            for gpu in gpus
            for minute in minutes
        ]
    )


def held_gpus(reservation: Reservation) -> list[Gpu]:
    allocation = reservation.allocations.get()
    return list(Gpu.objects.filter(node_id=allocation.node_id, index__in=list(allocation.gpu_indices)))


def usage_in(organization, start: datetime, end: datetime, reservations=None) -> Decimal:
    """Every usage record of ``organization`` inside [start, end), exactly as the ledger charged them."""
    records = UsageRecord.objects.filter(
        organization=organization, period__contained_by=DateTimeTZRange(start, end, "[)")
    )
    if reservations is not None:
        records = records.filter(reservation__in=reservations)
    return records.aggregate(total=Sum("amount"))["total"] or Decimal(0)


def browser_for(user) -> Client:
    client = Client()
    assert client.login(username=user.email, password=PASSWORD)
    return client


@pytest.fixture
def invoiced(model, offer):
    """MONTH finalized: Alice with a plain node rental and an endpoint of two replicas (one running past
    the month's end), Bob with an endpoint of one replica on the same node, at the same time."""
    alice, bob = make_tenant(name="Alice AI"), make_tenant(name="Bob Labs")
    endpoint, (first, second) = deploy(alice, model)
    bobs_endpoint, (bobs,) = deploy(bob, model, replicas=1, name="embed")  # the same name, another org
    start = timezone.now()
    plain = reservation_create(tenant=alice, offer=offer, quantity=1, start=start, end=start + timedelta(hours=1))
    run(plain, at(5, 12), at(5, 13))  # 8 GPUs for an hour at $2.49: $19.92
    run(first, at(3, 10), at(3, 10) + timedelta(seconds=1020))  # 17 minutes
    run(second, MONTH_END - timedelta(seconds=1020), MONTH_END + timedelta(hours=1))  # 17 minutes in MONTH
    run(bobs, at(3, 10), at(3, 11))

    # Energy: 0.01 kWh a GPU-minute on Alice's replicas' GPUs in every minute they were active, and on
    # the minutes around; the node's other GPUs (Bob's slice, free ones) draw 99 times as much meanwhile.
    minutes = [at(3, 10) + timedelta(minutes=n) for n in range(-1, 18)]  # first's 17, one before, one after
    minutes += [MONTH_END - timedelta(minutes=n) for n in range(1, 18)] + [MONTH_END]  # second's 17, one after
    mine = held_gpus(first) + held_gpus(second)
    gpu_energy(mine, minutes, MJ_A_GPU_MINUTE)
    node = first.allocations.get().node_id
    others = Gpu.objects.filter(node_id=node).exclude(pk__in=[gpu.pk for gpu in mine])
    gpu_energy(others, minutes, 99 * MJ_A_GPU_MINUTE)

    gateway_traffic(
        (endpoint, first, at(3, 10, 5), 200, 100, 10),  # 10 answered, 100 input tokens each
        (endpoint, first, at(3, 10, 6), 400, 0, 2),  # refused
        (endpoint, second, MONTH_END - timedelta(minutes=5), 200, 50, 5),
        (endpoint, second, MONTH_END - timedelta(minutes=4), 502, 0, 1),
        (endpoint, None, at(3, 9, 59), 503, 0, 3),  # no replica ready yet
        (endpoint, second, MONTH_END + timedelta(minutes=1), 200, 1000, 7),  # the next month: not this invoice
        (endpoint, None, MONTH_START - timedelta(minutes=1), 503, 0, 4),  # the month before: neither
        (bobs_endpoint, bobs, at(3, 10, 30), 200, 9, 40),  # Bob's
    )
    usage_rate()
    entries = LedgerEntry.objects.count()
    assert invoice_month(month=MONTH) == 2
    assert LedgerEntry.objects.count() == entries  # invoicing moves no money: the ledger is untouched
    return {
        "alice": alice,
        "bob": bob,
        "endpoint": endpoint,
        "bobs_endpoint": bobs_endpoint,
        "replicas": [first, second],
        "plain": plain,
        "invoice": Invoice.objects.get(organization=alice.organization, month=MONTH),
        "bobs_invoice": Invoice.objects.get(organization=bob.organization, month=MONTH),
    }


class TestInvoice:
    def test_an_endpoint_is_one_line_with_its_replicas_hours_requests_tokens_energy_and_amount(self, invoiced):
        invoice, endpoint, (first, second) = invoiced["invoice"], invoiced["endpoint"], invoiced["replicas"]
        assert invoice.lines.count() == 2  # the plain rental and the endpoint, not one per replica
        assert not InvoiceLine.objects.filter(reservation__in=[first, second]).exists()
        line = invoice.lines.get(endpoint=endpoint)
        assert line.reservation_id is None
        assert line.seconds == Decimal(2040)  # 17 + 17 minutes of replicas in the month
        assert line.replica_hours == Decimal("0.5667") and line.gpu_hours == Decimal("0.5667")  # 1 GPU each
        assert line.gpu_count == 1 and line.price_per_gpu_hour == SLICE_PRICE
        assert line.requests == 10 + 2 + 5 + 1 + 3  # every outcome, in the month only
        assert line.input_tokens == 10 * 100 + 5 * 50
        assert line.energy_kwh == Decimal("0.340")  # 34 GPU-minutes at 0.01 kWh: only its GPUs, only while active
        assert "embed" in line.description and "2 replicas" in line.description

        # The amount: exactly what metering charged the replicas' reservations in the month, rounded once.
        exact = usage_in(invoice.organization, MONTH_START, MONTH_END, [first, second])
        one = cost(price_per_gpu_hour=SLICE_PRICE, gpus=1, seconds=Decimal(1020))
        assert exact == 2 * one == Decimal("0.5666666666")
        assert line.amount == cents(exact) == Decimal("0.57")  # not 0.28 + 0.28: rounded on the line only

    def test_the_total_is_all_the_months_usage_and_the_plain_rental_keeps_its_own_line(self, invoiced):
        invoice = invoiced["invoice"]
        plain = invoice.lines.get(reservation=invoiced["plain"])
        assert plain.endpoint_id is None and plain.amount == Decimal("19.92") and plain.gpu_hours == Decimal(8)
        assert plain.replica_hours is None and plain.requests is None and plain.input_tokens is None
        endpoint_line = invoice.lines.get(endpoint=invoiced["endpoint"])
        # Every usage record of the month is on exactly one line: the lines' exact sums are all the usage.
        everything = usage_in(invoice.organization, MONTH_START, MONTH_END)
        on_lines = usage_in(invoice.organization, MONTH_START, MONTH_END, [invoiced["plain"]]) + usage_in(
            invoice.organization, MONTH_START, MONTH_END, invoiced["replicas"]
        )
        assert on_lines == everything == Decimal("19.92") + Decimal("0.5666666666")
        assert invoice.total == plain.amount + endpoint_line.amount == cents(everything) == Decimal("20.49")
        assert invoice.gpu_hours == plain.gpu_hours + endpoint_line.gpu_hours
        assert invoice.energy_kwh == plain.energy_kwh + endpoint_line.energy_kwh == Decimal("0.340")

    def test_another_tenants_endpoint_is_on_its_own_invoice_only(self, invoiced):
        bobs = invoiced["bobs_invoice"]
        (line,) = bobs.lines.all()
        assert line.endpoint_id == invoiced["bobs_endpoint"].pk
        assert line.requests == 40 and line.input_tokens == 360 and line.seconds == Decimal(3600)
        assert line.amount == Decimal("1.00") and bobs.total == Decimal("1.00")
        # His GPU on the shared node drew 99x; none of it is Alice's, none of hers is his.
        assert line.energy_kwh == Decimal("0.990") * 18  # the 18 minutes written inside his hour
        assert not invoiced["invoice"].lines.filter(endpoint=invoiced["bobs_endpoint"]).exists()

    def test_the_api_shows_the_endpoint_line_and_another_tenant_gets_404(self, invoiced, client_for):
        invoice, endpoint = invoiced["invoice"], invoiced["endpoint"]
        body = client_for(invoiced["alice"]).get(f"/api/v1/invoices/{invoice.pk}/").json()
        (line,) = [line for line in body["lines"] if line["endpoint"] == str(endpoint.pk)]
        assert line == {
            "reservation": None,
            "endpoint": str(endpoint.pk),
            "description": invoice.lines.get(endpoint=endpoint).description,
            "seconds": "2040.000000",
            "gpu_count": 1,
            "gpu_hours": "0.5667",
            "price_per_gpu_hour": "1.0000",
            "amount": "0.57",
            "energy_kwh": "0.340",
            "replica_hours": "0.5667",
            "requests": 21,
            "input_tokens": 1250,
        }
        assert body["total"] == "20.49"
        plain = next(line for line in body["lines"] if line["reservation"] == str(invoiced["plain"].pk))
        assert plain["endpoint"] is None and plain["requests"] is None and plain["replica_hours"] is None

        rows = list(
            csv.DictReader(
                io.StringIO(client_for(invoiced["alice"]).get(f"/api/v1/invoices/{invoice.pk}/csv/").content.decode())
            )
        )
        (row,) = [row for row in rows if row["endpoint"] == str(endpoint.pk)]
        assert row["reservation"] == "" and row["amount"] == "0.57" and row["replica_hours"] == "0.5667"
        assert row["requests"] == "21" and row["input_tokens"] == "1250" and row["energy_kwh"] == "0.340"
        assert Decimal(rows[-1]["amount"]) == invoice.total

        bob = client_for(invoiced["bob"])
        for path in [f"/api/v1/invoices/{invoice.pk}/", f"/api/v1/invoices/{invoice.pk}/csv/"]:
            assert bob.get(path).status_code == 404
        (their,) = bob.get(f"/api/v1/invoices/{invoiced['bobs_invoice'].pk}/").json()["lines"]
        assert their["endpoint"] == str(invoiced["bobs_endpoint"].pk) and their["requests"] == 40

    def test_the_portal_invoice_shows_the_endpoint_and_another_tenant_gets_404(self, invoiced):
        invoice, endpoint = invoiced["invoice"], invoiced["endpoint"]
        page = browser_for(invoiced["alice"].user).get(f"/billing/invoices/{invoice.pk}/").content.decode()
        assert f'data-endpoint="{endpoint.pk}"' in page
        assert "0.5667 replica-hours" in page and "21 requests" in page and "1,250 input tokens" in page
        assert "$0.57" in page and "$20.49" in page
        assert str(invoiced["bobs_endpoint"].pk) not in page
        bob = browser_for(invoiced["bob"].user)
        assert bob.get(f"/billing/invoices/{invoice.pk}/").status_code == 404
        assert str(endpoint.pk) not in bob.get(f"/billing/invoices/{invoiced['bobs_invoice'].pk}/").content.decode()


@pytest.fixture
def running(model):
    """This month so far: Alice's endpoint with two replicas and Bob's with one, active for half an hour
    (or since the month began) and rated up to now, with traffic this month and the month before."""
    alice, bob = make_tenant(name="Alice AI"), make_tenant(name="Bob Labs")
    endpoint, replicas = deploy(alice, model)
    bobs_endpoint, (bobs,) = deploy(bob, model, replicas=1)
    now = timezone.now()
    this_month = month_bounds(month_start(now))[0]
    since = now - timedelta(minutes=30)
    for reservation in [*replicas, bobs]:
        activate(reservation, since=since)
    usage_rate(now=now)
    when = max(this_month, now - timedelta(minutes=5))
    gateway_traffic(
        (endpoint, replicas[0], when, 200, 7, 4),
        (endpoint, replicas[1], when, 200, 3, 2),
        (endpoint, None, when, 503, 0, 1),
        (endpoint, replicas[0], this_month - timedelta(minutes=1), 200, 9, 50),  # last month: not this period
        (bobs_endpoint, bobs, when, 200, 1, 99),
    )
    minute = now.replace(second=0, microsecond=0) - timedelta(minutes=10)  # a whole minute, well inside
    gpu_energy([gpu for r in replicas for gpu in held_gpus(r)], [minute], MJ_A_GPU_MINUTE)
    seconds = seconds_between(max(since, this_month), now)
    return {
        "alice": alice,
        "bob": bob,
        "endpoint": endpoint,
        "bobs_endpoint": bobs_endpoint,
        "replicas": replicas,
        "now": now,
        "this_month": this_month,
        "seconds": seconds,
        "energy_kwh": Decimal("0.020") if minute >= this_month else Decimal("0.000"),
    }


class TestUsageThisMonth:
    def test_the_usage_api_shows_each_endpoint_so_far_and_only_the_tenants_own(self, running, client_for):
        alice, endpoint = running["alice"], running["endpoint"]
        body = client_for(alice).get("/api/v1/usage/").json()
        exact = usage_in(alice.organization, running["this_month"], running["now"], running["replicas"])
        assert exact > 0 and exact == usage_in(alice.organization, running["this_month"], running["now"])
        seconds = 2 * running["seconds"]
        assert body["endpoints"] == [
            {
                "endpoint": str(endpoint.pk),
                "name": "embed",
                "model": "all-MiniLM-L6-v2",
                "replicas": 2,
                "seconds": f"{seconds:.6f}",
                "replica_hours": str((seconds / 3600).quantize(Decimal("0.0001"))),
                "gpu_count": 1,
                "gpu_hours": str((seconds / 3600).quantize(Decimal("0.0001"))),
                "price_per_gpu_hour": "1.0000",
                "requests": 4 + 2 + 1,
                "input_tokens": 4 * 7 + 2 * 3,
                "energy_kwh": str(running["energy_kwh"]),
                "amount": str(cents(exact)),
                "amount_exact": f"{exact:.10f}",
            }
        ]
        assert body["lines"] == []  # its replicas' reservations are the endpoint's, not lines of their own
        assert body["amount_exact"] == f"{exact:.10f}"  # the totals still count every usage record
        theirs = client_for(running["bob"]).get("/api/v1/usage/").json()["endpoints"]
        assert [(e["endpoint"], e["requests"], e["input_tokens"]) for e in theirs] == [
            (str(running["bobs_endpoint"].pk), 99, 99)
        ]

    def test_the_invoice_so_far_and_the_billing_page_show_the_endpoint(self, running, client_for):
        alice, endpoint = running["alice"], running["endpoint"]
        current = client_for(alice).get("/api/v1/invoices/current/").json()
        (line,) = current["lines"]
        assert line["endpoint"] == str(endpoint.pk) and line["reservation"] is None
        assert line["requests"] == 7 and line["input_tokens"] == 34 and line["energy_kwh"] == str(running["energy_kwh"])
        assert current["total"] == line["amount"]

        page = browser_for(alice.user).get("/billing/").content.decode()
        assert f'data-endpoint="{endpoint.pk}"' in page and f"/endpoints/{endpoint.pk}/" in page
        assert "7 requests" in page and "34 input tokens" in page and "replica-hours" in page
        assert str(running["bobs_endpoint"].pk) not in page
        for reservation in running["replicas"]:
            assert f"/reservations/{reservation.pk}/" not in page
        bobs_page = browser_for(running["bob"].user).get("/billing/").content.decode()
        assert str(endpoint.pk) not in bobs_page and "99 requests" in bobs_page


def test_replicas_at_two_prices_are_one_line_of_their_exact_sum_without_one_price(model, client_for):
    """Nine replicas: eight fill the edge node at $1.00, the ninth goes to a hall in the region at $2.00."""
    accelerator = model.accelerator_types.get()
    hall = SiteFactory(region="eu-central", kind=SiteKind.HALL)
    make_node(rack=RackFactory(site=hall), accelerator=accelerator)
    offer_create(site=hall, accelerator_type=accelerator, price_per_gpu_hour=Decimal("2.00"), gpus_per_instance=1)
    tenant = make_tenant()
    endpoint, replicas = deploy(tenant, model, replicas=9)
    assert {r.price_per_gpu_hour for r in replicas} == {Decimal("1.00"), Decimal("2.00")}
    now = timezone.now()
    for reservation in replicas:
        activate(reservation, since=now - timedelta(minutes=7))
    usage_rate(now=now)
    this_month = month_bounds(month_start(now))[0]
    (line,) = invoice_lines(organization_ids=[tenant.organization.pk], month=month_start(now))[tenant.organization.pk]
    exact = usage_in(tenant.organization, this_month, now, replicas)
    assert line["endpoint_id"] == endpoint.pk and line["price_per_gpu_hour"] is None
    assert line["amount"] == cents(exact) and "9 replicas" in line["description"] and hall.name in line["description"]
    page = browser_for(tenant.user).get("/billing/").content.decode()
    assert "varies" in page
    body = client_for(tenant).get("/api/v1/usage/").json()
    assert body["endpoints"][0]["price_per_gpu_hour"] is None and body["endpoints"][0]["replicas"] == 9


def test_the_database_refuses_a_line_of_both_a_reservation_and_an_endpoint_or_of_neither(invoiced):
    line = invoiced["invoice"].lines.get(endpoint=invoiced["endpoint"])
    fields = {
        "invoice": invoiced["bobs_invoice"],
        "description": "x",
        "seconds": 1,
        "gpu_count": 1,
        "gpu_hours": 0,
        "price_per_gpu_hour": 1,
        "amount": 0,
        "energy_kwh": 0,
    }
    endpoint_figures = {"replica_hours": 0, "requests": 0, "input_tokens": 0}
    for wrong in [
        {"reservation": invoiced["plain"], "endpoint": invoiced["endpoint"], **endpoint_figures},
        {},
        {"reservation": invoiced["plain"], **endpoint_figures},  # a reservation's line with an endpoint's figures
        {"endpoint": invoiced["endpoint"]},  # an endpoint's line without them
        {"endpoint": invoiced["bobs_endpoint"], **endpoint_figures},  # a second line of Bob's endpoint
    ]:
        with pytest.raises(IntegrityError), transaction.atomic():
            InvoiceLine.objects.create(**fields, **wrong)
    assert InvoiceLine.objects.get(pk=line.pk).amount == Decimal("0.57")
