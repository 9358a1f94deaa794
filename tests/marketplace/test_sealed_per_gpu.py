"""Telemetry is sealed per GPU (ARCHITECTURE invariant 5, with slices): tenants holding slices of ONE
node at the same time each read only their own GPUs' readings, on every surface -- REST telemetry, the
reservation page, energy (detail and invoice lines) and the live feed. The same rule in time is
tests/marketplace/test_sealed_in_time.py; the pure encoding per audience is
tests/provisioning/test_telemetry_ingest.py."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import redis
from asgiref.sync import async_to_sync
from django.conf import settings
from django.test import Client
from django.utils import timezone

from marketplace.models import InvoiceLine, Reservation
from marketplace.money import month_start
from marketplace.selectors.reservations import reservation_energy_kwh
from marketplace.services.billing.invoicing import invoice_month
from marketplace.services.billing.metering import usage_rate
from marketplace.services.catalog.offers import offer_create
from marketplace.services.reservations.lifecycle import reservation_create, reservation_release
from marketplace.services.reservations.provisioning import node_audience
from provisioning.hooks import Audience
from provisioning.models import GpuRollup, Node
from provisioning.services import telemetry, telemetry_ingest
from tests.conftest import key_client
from tests.factories import PASSWORD, activate, make_node, make_tenant, make_user
from tests.provisioning.test_agent_server import enrol
from tests.provisioning.test_telemetry import accepted, browser, cookie_for, frames, started

pytestmark = pytest.mark.django_db

# Readings only each tenant's workload produced (none ends in .5: the page and Python round halves apart).
POWER = {"a": 613.25, "b": 222.75, "c": 444.25}
ENERGY_MJ = {"a": 36_000_000, "b": 72_000_000, "c": 108_000_000}  # per GPU-minute: 0.01, 0.02, 0.03 kWh
SHAPES = {"a": 2, "b": 2, "c": 4}  # GPUs per instance: together the whole 8-GPU node
MJ_PER_KWH = 3_600_000_000


@dataclass
class Shared:
    node: Node
    tenants: dict
    reservations: dict[str, Reservation]

    def gpus(self, key: str) -> range:
        return self.reservations[key].allocations.get().gpu_indices

    def uuids(self, key: str) -> set[str]:
        held = self.gpus(key)
        return {g.uuid for g in self.node.gpus.all() if g.index in held}

    def owner(self, index: int) -> str:
        return next(key for key in SHAPES if index in self.gpus(key))


@pytest.fixture
def shared() -> Shared:
    """One 8-GPU node and three tenants holding slices of it at once, all active for the last 30
    minutes: a and b two GPUs each, c four -- booked as a tenant books them, through the services."""
    node = make_node(gpus=8)
    site, accelerator = node.rack.site, node.accelerator_type
    offers = {
        size: offer_create(
            site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("2.49"), gpus_per_instance=size
        )
        for size in (2, 4)
    }
    end = timezone.now() + timedelta(hours=1)
    tenants = {key: make_tenant() for key in SHAPES}
    reservations = {}
    for key, size in SHAPES.items():
        reservation = reservation_create(tenant=tenants[key], offer=offers[size], quantity=1, start=None, end=end)
        reservations[key] = activate(reservation, since=timezone.now() - timedelta(minutes=30))
    s = Shared(node=node, tenants=tenants, reservations=reservations)
    held = sorted(i for key in SHAPES for i in s.gpus(key))
    assert held == list(range(8)) and {a.node_id for r in reservations.values() for a in r.allocations.all()} == {
        node.pk
    }  # the fixture is real: one node, three tenants, every GPU someone's
    return s


def rollups(s: Shared, minutes: list[datetime]) -> None:
    """Each GPU's rollups with its holder's readings."""
    for at in minutes:
        for gpu in s.node.gpus.all():
            key = s.owner(gpu.index)
            GpuRollup.objects.create(
                gpu=gpu,
                minute=at.replace(second=0, microsecond=0),
                samples=60,
                power_n=60,
                power_sum=POWER[key] * 60,
                power_max=POWER[key],
                energy_mj=ENERGY_MJ[key],
            )


def batch(s: Shared) -> dict:
    """One batch of the node, each GPU reporting its holder's power."""
    gpus = [
        {"uuid": g.uuid, "index": g.index, telemetry.POWER: POWER[s.owner(g.index)]}
        for g in s.node.gpus.order_by("index")
    ]
    return {"type": "telemetry", "seq": 1, "at": time.time(), "gpus": gpus}


def latest(s: Shared) -> None:
    """The node's latest batch in Redis, as the ingest path stores it (every GPU of the node)."""
    stream = telemetry.node_stream(node_id=s.node.pk)
    at, readings = telemetry_ingest.validate(batch(s), stream)
    redis.Redis.from_url(settings.REDIS_URL).hset(
        telemetry.LATEST_KEY, str(s.node.pk), telemetry_ingest.encode(stream, at, readings).node
    )


def rest(tenant, reservation) -> dict:
    client = key_client(tenant)
    body = client.get(f"/api/v1/reservations/{reservation.id}/telemetry/?minutes=10080").json()
    return {**body, "energy_kwh": client.get(f"/api/v1/reservations/{reservation.id}/").json()["energy_kwh"]}


def page(tenant, reservation) -> str:
    client = Client()
    assert client.login(username=tenant.user.email, password=PASSWORD)
    response = client.get(f"/reservations/{reservation.id}/")
    assert response.status_code == 200
    return response.content.decode()


def test_tenants_sharing_a_node_read_only_their_own_gpus_on_the_api_the_page_and_energy(shared):
    s, now = shared, timezone.now()
    whole = [now - timedelta(minutes=m) for m in range(2, 22)]  # 20 whole minutes inside every holding
    rollups(s, whole)
    latest(s)

    for key, reservation in s.reservations.items():
        mine, others = s.uuids(key), {g.uuid for g in s.node.gpus.all()} - s.uuids(key)
        body = rest(s.tenants[key], reservation)
        assert {g["uuid"] for g in body["gpus"]} == mine and len(body["gpus"]) == SHAPES[key]
        assert {r["uuid"] for r in body["rollups"]} == mine
        assert {r["power_max"] for r in body["rollups"]} == {POWER[key]}
        assert len(body["rollups"]) == len(whole) * SHAPES[key]
        [frame] = body["latest"]
        assert {g["uuid"] for g in frame["gpus"]} == mine
        assert {g[telemetry.POWER] for g in frame["gpus"]} == {POWER[key]}
        kwh = Decimal(SHAPES[key] * len(whole) * ENERGY_MJ[key]) / MJ_PER_KWH
        assert Decimal(body["energy_kwh"]) == kwh.quantize(Decimal("0.0001"))
        assert reservation_energy_kwh(reservation=reservation) == kwh.quantize(Decimal("0.0001"))

        html = page(s.tenants[key], reservation)
        assert f"{POWER[key]:.0f} W" in html
        for other in set(SHAPES) - {key}:
            assert f"{POWER[other]:.0f} W" not in html  # another tenant's reading, on the same node
        assert all(f'data-gpu="{uuid}"' in html for uuid in mine)
        assert not any(uuid in html for uuid in others)


def test_invoice_lines_of_tenants_sharing_a_node_count_only_their_gpus_energy(shared):
    s = shared
    last_month = month_start(month_start(timezone.now().date()) - timedelta(days=1))
    start = datetime.combine(last_month, datetime.min.time(), tzinfo=UTC) + timedelta(days=3, seconds=30)
    end = start + timedelta(minutes=10)  # minutes 1..9 whole
    for reservation in s.reservations.values():
        assert reservation_release(reservation_id=reservation.pk)
        Reservation.objects.filter(pk=reservation.pk).update(activated_at=start, deactivated_at=end)
    rollups(s, [start + timedelta(minutes=m) for m in range(1, 10)])
    usage_rate()
    assert invoice_month(month=last_month) == 3
    for key, reservation in s.reservations.items():
        line = InvoiceLine.objects.get(reservation=reservation)
        assert line.invoice.organization == s.tenants[key].organization
        kwh = Decimal(SHAPES[key] * 9 * ENERGY_MJ[key]) / MJ_PER_KWH  # a 0.18, b 0.36, c 1.08: not the node's 1.62
        assert line.energy_kwh == kwh.quantize(Decimal("0.001"))


def test_the_live_audience_of_a_shared_node_is_each_active_slice_with_its_gpus(shared):
    s = shared
    audience = {a.group: a.gpus for a in node_audience(s.node.pk)}
    assert audience == {f"reservation.{r.pk}": s.gpus(key) for key, r in s.reservations.items()}
    assert all(isinstance(a, Audience) for a in node_audience(s.node.pk))
    assert reservation_release(reservation_id=s.reservations["b"].pk)  # releasing: no longer the audience
    assert {a.group for a in node_audience(s.node.pk)} == {
        f"reservation.{s.reservations[key].pk}" for key in ("a", "c")
    }


@pytest.mark.django_db(transaction=True)
def test_the_live_feed_of_a_shared_node_sends_each_tenant_only_its_gpus_readings(shared):
    s = shared
    secret = enrol(s.node)
    cookies = {key: cookie_for(tenant.user) for key, tenant in s.tenants.items()}
    operator = cookie_for(make_user(is_staff=True))
    one_batch = batch(s)

    async def scenario():
        feeds = {key: browser(f"/ws/reservations/{r.id}/", cookies[key]) for key, r in s.reservations.items()}
        fleet = browser("/ws/fleet/", operator)
        for ws in (*feeds.values(), fleet):
            await accepted(ws)
        agent = await started(s.node, secret)  # its stream's audience: the three slices, read at hello
        await agent.send(one_batch)
        received = {key: await frames(ws, until=lambda got: len(got) >= 1) for key, ws in feeds.items()}
        summaries = await frames(fleet, until=lambda got: any(f.get("node") == s.node.hostname for f in got))
        for ws in (*feeds.values(), fleet, agent.ws):
            await ws.disconnect()
        return received, summaries

    received, summaries = async_to_sync(scenario)()
    for key, got in received.items():
        assert len(got) == 1, f"{key} got {len(got)} frames"  # one text per audience, sent once
        assert {g["uuid"] for g in got[0]["gpus"]} == s.uuids(key)
        assert {g[telemetry.POWER] for g in got[0]["gpus"]} == {POWER[key]}
    summary = next(f for f in summaries if f.get("node") == s.node.hostname)
    assert summary["power"] == round(sum(POWER[key] * SHAPES[key] for key in SHAPES), 1)  # operators: the node
