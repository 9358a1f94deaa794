"""Billing driven by the real processes: a reservation made through the API holds its expected cost,
goes active through an agent, beat pushes its running cost to the tenant's group every second, and on
cancel the worker rates it to the microsecond of its release and gives back the rest of the hold."""

import asyncio
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from console.kernel.events import tenant_group
from marketplace.models import LedgerEntry, Reservation, UsageRecord
from marketplace.money import cost, seconds_between
from marketplace.selectors.billing import balance_of, hold_remaining
from marketplace.services.tenancy.api_keys import api_key_create
from tests.e2e.conftest import Api, wait_for
from tests.e2e.test_provisioning import connected, fleet_of, state_of
from tests.factories import make_tenant

pytestmark = [pytest.mark.slow]


def cost_ticks_for(organization_id, count: int, timeout: float) -> list[dict]:
    """The next ``count`` billing.cost pushes to the tenant's group, as a browser would get them."""

    async def listen():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(tenant_group(organization_id), channel)
        ticks = []
        try:
            async with asyncio.timeout(timeout):
                while len(ticks) < count:
                    message = await layer.receive(channel)
                    if message["event"] == "billing.cost":
                        ticks.append(message["data"])
        except TimeoutError:
            pass
        finally:
            await layer.group_discard(tenant_group(organization_id), channel)
        return ticks

    return async_to_sync(listen)()


def test_a_live_reservation_is_pushed_its_cost_and_billed_exactly_its_active_time(stack, tmp_path):
    stack.env.update({"BILLING_TICK_SECONDS": "1", "BILLING_RATE_SECONDS": "2"})
    nodes, offer, tokens = fleet_of(1)
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "4")
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")

    tenant = make_tenant(credit="500")
    _key, plaintext = api_key_create(tenant=tenant, name="e2e")
    api = Api(stack.base, plaintext)
    status, body = api.call("POST", "/api/v1/reservations/", {"offer": offer.id, "quantity": 1, "duration_hours": 2})
    assert status == 201, body
    reservation_id = body["id"]
    expected_hold = Decimal(body["price"]["estimated_total"])
    organization_id = tenant.organization.pk
    assert abs(balance_of(organization_id=organization_id)["held"] - expected_hold) <= Decimal("0.01")

    wait_for(lambda: state_of(api, reservation_id) == "active", timeout=90, what="the reservation to become active")
    ticks = cost_ticks_for(organization_id, count=3, timeout=30)
    assert len(ticks) == 3, "beat pushes the running cost every BILLING_TICK_SECONDS"
    costs = [Decimal(t["reservations"][reservation_id]["cost"]) for t in ticks]
    assert costs == sorted(costs) and costs[-1] > 0  # it runs up while active
    assert Decimal(ticks[-1]["per_hour"]) == offer.price_per_gpu_hour * 8

    # Beat also rates it while active (every 2 s here).
    wait_for(lambda: UsageRecord.objects.filter(reservation_id=reservation_id).exists(), timeout=30, what="rating")

    status, _ = api.call("POST", f"/api/v1/reservations/{reservation_id}/cancel/")
    assert status == 200
    settled = wait_for(
        lambda: Reservation.objects.filter(pk=reservation_id, billing_settled_at__isnull=False).first(),
        timeout=60,
        what="the worker to rate the released reservation and settle it",
    )
    active = seconds_between(settled.activated_at, settled.deactivated_at)
    records = list(UsageRecord.objects.filter(reservation_id=reservation_id).order_by("period"))
    assert sum(r.seconds for r in records) == active  # to the microsecond
    assert records[0].period.lower == settled.activated_at and records[-1].period.upper == settled.deactivated_at
    charged = sum(r.amount for r in records)
    assert charged == cost(price_per_gpu_hour=settled.price_per_gpu_hour, gpus=settled.gpu_count, seconds=active)
    assert hold_remaining(reservation_ids=[settled.pk]) == {}
    balance = balance_of(organization_id=organization_id)
    assert balance["held"] == 0 and balance["balance"] == Decimal("500") - charged
    assert LedgerEntry.objects.filter(reservation_id=reservation_id).count() >= 4  # hold, usage, release
