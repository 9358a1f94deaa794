"""Telemetry is sealed in time (ARCHITECTURE invariant 5): a reservation reads its nodes' readings only
from the interval it held them (active), never the tenant holding them before or after it, on every
surface -- REST telemetry, the reservation page, energy (detail and invoice) and the live feed."""

import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.conf import settings
from django.test import Client
from django.utils import timezone

from marketplace.models import Invoice, Reservation
from marketplace.money import month_start
from marketplace.selectors.reservations import reservation_energy_kwh
from marketplace.services.billing.invoicing import invoice_month
from marketplace.services.billing.metering import usage_rate
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_begin,
    reservation_cancel,
    reservation_create,
    reservation_release,
)
from marketplace.services.reservations.provisioning import node_audience
from provisioning.hooks import Audience
from provisioning.models import GpuRollup
from provisioning.services import telemetry, telemetry_ingest
from tests.conftest import key_client
from tests.factories import PASSWORD, OfferFactory, make_node, make_tenant

pytestmark = pytest.mark.django_db

A_POWER = 613.25  # a reading only tenant A's workload produced
A_ENERGY_MJ = 36_000_000  # 0.01 kWh per GPU-minute
B_POWER = 222.75


def minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def reserve(tenant, offer, start, end) -> Reservation:
    return reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=end)


def rollups(node, minutes, *, power: float, energy_mj: int) -> None:
    for at in minutes:
        for gpu in node.gpus.all():
            GpuRollup.objects.create(
                gpu=gpu,
                minute=minute(at),
                samples=60,
                power_n=60,
                power_sum=power * 60,
                power_max=power,
                energy_mj=energy_mj,
            )


def latest(node, *, power: float, at: float | None = None) -> None:
    """The node's latest batch in Redis, encoded by the ingest path as the agent consumer stores it."""
    stream = telemetry.node_stream(node_id=node.pk)
    frame = {
        "type": "telemetry",
        "at": at or time.time(),
        "gpus": [{"uuid": g.uuid, "index": g.index, telemetry.POWER: power} for g in node.gpus.order_by("index")],
    }
    at, readings = telemetry_ingest.validate(frame, stream)
    node_text = telemetry_ingest.encode(stream, at, readings).node
    redis.Redis.from_url(settings.REDIS_URL).hset(telemetry.LATEST_KEY, str(node.pk), node_text)


def page(tenant, reservation) -> str:
    client = Client()
    assert client.login(username=tenant.user.email, password=PASSWORD)
    response = client.get(f"/reservations/{reservation.id}/")
    assert response.status_code == 200
    return response.content.decode()


def rest(tenant, reservation) -> dict:
    client = key_client(tenant)
    telemetry_body = client.get(f"/api/v1/reservations/{reservation.id}/telemetry/?minutes=10080").json()
    detail = client.get(f"/api/v1/reservations/{reservation.id}/").json()
    return {**telemetry_body, "energy_kwh": detail["energy_kwh"]}


def powers(body: dict) -> set:
    seen = {r["power_max"] for r in body["rollups"]}
    seen |= {g.get(telemetry.POWER) for frame in body["latest"] for g in frame["gpus"]}
    return seen


@pytest.fixture
def node():
    return make_node(gpus=2)


@pytest.fixture
def node_offer(node):
    """An offer of the two-GPU ``node`` alone (not the shared ``offer``: readings here are that node's)."""
    return OfferFactory(site=node.rack.site, accelerator_type=node.accelerator_type, gpus_per_node=node.gpu_count)


def test_a_tenant_booked_later_on_the_node_reads_none_of_the_current_tenants_readings(node, node_offer):
    alice, bob = make_tenant(), make_tenant()
    now = timezone.now()
    a = reserve(alice, node_offer, None, now + timedelta(hours=1))
    assert reservation_begin(reservation_id=a.pk) and reservation_activate(reservation_id=a.pk)
    Reservation.objects.filter(pk=a.pk).update(activated_at=now - timedelta(minutes=30))
    rollups(node, [now - timedelta(minutes=m) for m in range(2, 20)], power=A_POWER, energy_mj=A_ENERGY_MJ)
    latest(node, power=A_POWER)
    b = reserve(bob, node_offer, now + timedelta(hours=1), now + timedelta(hours=2))  # the same node, next

    def sees_nothing_of_alice():
        body = rest(bob, b)
        assert body["rollups"] == [] and body["latest"] == [] and body["energy_kwh"] is None
        html = page(bob, b)
        assert f"{A_POWER:.0f} W" not in html  # a bare "613" may be in a CSRF token or an id: look for the reading
        assert reservation_energy_kwh(reservation=Reservation.objects.get(pk=b.pk)) is None

    sees_nothing_of_alice()  # booked, before its start
    assert A_POWER in powers(rest(alice, a))  # alice herself reads them: the fixture is real
    assert f"{A_POWER:.0f} W" in page(alice, a)

    reservation_cancel(tenant=bob, reservation=Reservation.objects.get(pk=b.pk))
    assert Reservation.objects.get(pk=b.pk).state == "cancelled"
    sees_nothing_of_alice()  # and after cancelling, at no cost, still nothing


def test_each_holder_reads_only_its_own_active_interval_whole_minutes(node, node_offer):
    alice, bob = make_tenant(), make_tenant()
    now = timezone.now()
    a = reserve(alice, node_offer, None, now + timedelta(minutes=30))
    b = reserve(bob, node_offer, now + timedelta(minutes=30), now + timedelta(hours=2))
    assert reservation_begin(reservation_id=a.pk) and reservation_activate(reservation_id=a.pk)
    a_start = minute(now) - timedelta(minutes=40, seconds=-20)  # mid-minute: its first minute is cut
    a_end = minute(now) - timedelta(minutes=20, seconds=-30)  # mid-minute: its last minute is cut
    assert reservation_release(reservation_id=a.pk)
    Reservation.objects.filter(pk=a.pk).update(activated_at=a_start, deactivated_at=a_end)
    # bob's node came up within alice's last minute (a fast re-provision): that minute is both's
    assert reservation_begin(reservation_id=b.pk, now=b.start) and reservation_activate(reservation_id=b.pk)
    b_start = a_end + timedelta(seconds=20)
    Reservation.objects.filter(pk=b.pk).update(activated_at=b_start)

    alices = [minute(a_start) + timedelta(minutes=m) for m in range(0, 20)]  # her first minute is cut
    rollups(node, alices[1:], power=A_POWER, energy_mj=A_ENERGY_MJ)
    rollups(node, [alices[0], minute(a_end)], power=999.0, energy_mj=999)  # the minutes at the edges
    bobs = [minute(b_start) + timedelta(minutes=m) for m in range(1, 15)]
    rollups(node, bobs, power=B_POWER, energy_mj=1)
    latest(node, power=B_POWER)

    a_body, b_body = rest(alice, a), rest(bob, b)
    assert powers(a_body) == {A_POWER}  # no edge minute, no bob, and no latest batch: she is done
    assert a_body["latest"] == []
    assert powers(b_body) == {B_POWER}  # his minutes and his latest batch, none of hers
    assert len(b_body["latest"]) == 1
    whole = len(alices) - 1  # minutes wholly inside [a_start, a_end)
    assert len({r["minute"] for r in a_body["rollups"]}) == whole
    kwh = 2 * whole * A_ENERGY_MJ / 3_600_000_000
    assert float(a_body["energy_kwh"]) == pytest.approx(kwh, abs=1e-4)
    assert f"{A_POWER:.0f} W" not in page(bob, b) and f"{B_POWER:.0f} W" in page(bob, b)
    assert f"{B_POWER:.0f} W" not in page(alice, a)


def test_a_latest_batch_measured_before_the_activation_is_not_shown(node, node_offer):
    bob = make_tenant()
    b = reserve(bob, node_offer, None, timezone.now() + timedelta(hours=1))
    latest(node, power=A_POWER, at=time.time() - 5)  # the previous holder's workload, a moment before
    assert reservation_begin(reservation_id=b.pk) and reservation_activate(reservation_id=b.pk)
    assert rest(bob, b)["latest"] == []
    latest(node, power=B_POWER)
    assert powers(rest(bob, b)) == {B_POWER}


def test_only_the_active_reservation_is_the_live_audience_of_a_node(node, node_offer):
    alice, bob = make_tenant(), make_tenant()
    now = timezone.now()
    a = reserve(alice, node_offer, None, now + timedelta(minutes=30))
    b = reserve(bob, node_offer, now + timedelta(minutes=30), now + timedelta(hours=1))
    whole = range(0, node.gpu_count)
    assert node_audience(node.pk) == []  # pending: booked is not held
    assert reservation_begin(reservation_id=a.pk)
    assert node_audience(node.pk) == []  # provisioning: not active yet
    assert reservation_activate(reservation_id=a.pk)
    assert node_audience(node.pk) == [Audience(f"reservation.{a.pk}", whole)]
    assert reservation_release(reservation_id=a.pk)  # releasing: its live allocation remains
    assert reservation_begin(reservation_id=b.pk, now=b.start) and reservation_activate(reservation_id=b.pk)
    assert node_audience(node.pk) == [Audience(f"reservation.{b.pk}", whole)]  # never both


def test_invoice_energy_counts_whole_minutes_inside_the_active_interval(node, node_offer):
    tenant = make_tenant()
    now = timezone.now()
    a = reserve(tenant, node_offer, None, now + timedelta(hours=1))
    assert reservation_begin(reservation_id=a.pk) and reservation_activate(reservation_id=a.pk)
    last_month = month_start(month_start(now.date()) - timedelta(days=1))
    start = datetime.combine(last_month, datetime.min.time(), tzinfo=UTC) + timedelta(days=3, seconds=30)
    end = start + timedelta(minutes=10)  # 10:30 past: minutes 1..9 are whole, 0 and 10 are cut
    assert reservation_release(reservation_id=a.pk)
    Reservation.objects.filter(pk=a.pk).update(activated_at=start, deactivated_at=end)
    rollups(node, [start + timedelta(minutes=m) for m in range(1, 10)], power=A_POWER, energy_mj=A_ENERGY_MJ)
    rollups(node, [start, end], power=999.0, energy_mj=900_000_000)  # shared with whoever was before/after
    usage_rate()
    assert invoice_month(month=last_month) == 1
    invoice = Invoice.objects.get(organization=tenant.organization)
    assert float(invoice.energy_kwh) == pytest.approx(2 * 9 * A_ENERGY_MJ / 3_600_000_000, abs=1e-3)
