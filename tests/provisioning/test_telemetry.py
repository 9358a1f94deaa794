"""Telemetry from agents to browsers, over real WebSockets into the real ASGI app (Redis channel layer,
PostgreSQL): who receives what, what is refused, and what is stored."""

import asyncio
import json
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from console.routing import browser as browser_route
from marketplace.consumers import ReservationTelemetryConsumer, TenantConsumer
from marketplace.models import Reservation
from marketplace.selectors.reservations import reservation_energy_kwh
from marketplace.services.reservations.lifecycle import reservation_activate, reservation_begin, reservation_create
from provisioning.consumers import FleetConsumer
from provisioning.models import GpuRollup
from provisioning.services import telemetry, telemetry_ingest
from provisioning.services.telemetry_ingest import GpuMinute, RollupBuffer
from tests.factories import PASSWORD, OfferFactory, make_node, make_user
from tests.provisioning.test_agent_server import Agent, enrol

pytestmark = pytest.mark.django_db(transaction=True)
db = database_sync_to_async


def cookie_for(user) -> str:
    client = Client()
    assert client.login(username=user.email, password=PASSWORD)
    return f"sessionid={client.cookies['sessionid'].value}"


def browser(path: str, cookie: str) -> WebsocketCommunicator:
    # The browser routes built now, with the real consumers and middleware; a browser sends the page's
    # Host and Origin (the origin check compares them, scheme, host and port).
    from channels.routing import URLRouter

    app = URLRouter(_browser_routes())
    headers = [(b"cookie", cookie.encode()), (b"host", b"testserver"), (b"origin", b"http://testserver")]
    return WebsocketCommunicator(app, path, headers=headers)


def _browser_routes():
    from django.urls import path as route

    return [
        route("ws/tenant/", browser_route(TenantConsumer)),
        route("ws/reservations/<uuid:pk>/", browser_route(ReservationTelemetryConsumer)),
        route("ws/fleet/", browser_route(FleetConsumer)),
    ]


def batch(node, *, at=None, **overrides) -> dict:
    gpus = []
    for gpu in node.gpus.order_by("index"):
        reading = {
            "uuid": gpu.uuid,
            "index": gpu.index,
            telemetry.UTIL: 50 + gpu.index,
            telemetry.FB_USED: 1000,
            telemetry.FB_TOTAL: 81559,
            telemetry.POWER: 300.5,
            telemetry.TEMP: 40,
            telemetry.SM_CLOCK: 1400,
        }
        reading.update(overrides)
        gpus.append(reading)
    return {"type": "telemetry", "seq": 1, "at": at or time.time(), "gpus": gpus}


def held_by(tenant, node) -> Reservation:
    offer = OfferFactory(site=node.rack.site, accelerator_type=node.accelerator_type, gpus_per_node=node.gpu_count)
    reservation = reservation_create(
        tenant=tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=1)
    )
    reservation_begin(reservation_id=reservation.pk)
    reservation_activate(reservation_id=reservation.pk)
    return Reservation.objects.get(pk=reservation.pk)


async def started(node, secret) -> Agent:
    agent = Agent(secret)
    await agent.start(node, uuids=[g async for g in _uuids(node)])
    await asyncio.sleep(0.2)
    return agent


async def _uuids(node):
    for uuid in await db(lambda: list(node.gpus.order_by("index").values_list("uuid", flat=True)))():
        yield uuid


CONNECT_TIMEOUT = 15  # generous: CI machines are small and may be busy; never a timing assertion


async def accepted(ws) -> None:
    connected, code = await ws.connect(timeout=CONNECT_TIMEOUT)
    assert connected, f"refused with close code {code}"


async def refusal(ws) -> int:
    """The close code a feed answers with, having accepted (so a browser sees the code, not a 1006)."""
    await accepted(ws)
    return (await ws.receive_output(CONNECT_TIMEOUT))["code"]


async def frames(ws, *, until, timeout: float = 20, settle: float = 0.5) -> list[dict]:
    """Frames until ``until(received)`` holds (or ``timeout``), then whatever arrives in ``settle`` more
    seconds — so an unwanted extra frame would still be caught. Never cancels the socket, as a timed-out
    receive_from would."""
    received, deadline = [], time.monotonic() + timeout
    while not until(received) and time.monotonic() < deadline:
        if not await ws.receive_nothing(timeout=0.2):
            received.append(json.loads(await ws.receive_from(CONNECT_TIMEOUT)))
    while not await ws.receive_nothing(timeout=settle):
        received.append(json.loads(await ws.receive_from(CONNECT_TIMEOUT)))
    return received


def test_a_tenant_sees_only_its_own_reservations_telemetry_and_operators_see_all(tenant, other_tenant):
    mine, theirs = make_node(), make_node()
    my_reservation, their_reservation = held_by(tenant, mine), held_by(other_tenant, theirs)
    secrets = {mine.pk: enrol(mine), theirs.pk: enrol(theirs)}
    member, operator = cookie_for(tenant.user), cookie_for(make_user(is_staff=True))
    mine_batch, theirs_batch = batch(mine), batch(theirs)

    async def scenario():
        me = browser(f"/ws/reservations/{my_reservation.id}/", member)
        snoop = browser(f"/ws/reservations/{their_reservation.id}/", member)
        fleet = browser("/ws/fleet/", operator)
        not_staff = browser("/ws/fleet/", member)
        await accepted(me)
        await accepted(fleet)
        refused_reservation = await refusal(snoop)
        refused_fleet = await refusal(not_staff)
        agents = [await started(mine, secrets[mine.pk]), await started(theirs, secrets[theirs.pk])]
        await agents[0].send(mine_batch)
        await agents[1].send(theirs_batch)
        mine_frames = await frames(me, until=lambda got: len(got) >= 1)
        fleet_frames = await frames(
            fleet, until=lambda got: {mine.hostname, theirs.hostname} <= {f.get("node") for f in got}
        )
        for ws in (me, fleet, *[a.ws for a in agents]):
            await ws.disconnect()
        return refused_reservation, refused_fleet, mine_frames, fleet_frames

    refused_reservation, refused_fleet, mine_frames, fleet_frames = async_to_sync(scenario)()
    assert refused_reservation == 4404 and refused_fleet == 4403
    assert [f["node"] for f in mine_frames] == [mine.hostname]
    assert mine_frames[0]["gpus"][0][telemetry.POWER] == 300.5
    # Other fleets on this Redis (a benchmark, a demo) may publish to the operators' group too.
    assert {mine.hostname, theirs.hostname} <= {f["node"] for f in fleet_frames}
    summary = next(f for f in fleet_frames if f["node"] == mine.hostname)
    assert summary["util"] == 53.5 and summary["power"] == 2404.0 and summary["health"] == "ok"


@pytest.mark.parametrize("problem", ["foreign gpu", "out of range", "too large", "no gpus", "bad time", "used > total"])
def test_a_bad_batch_is_refused_and_no_stream_is_closed(tenant, problem, settings):
    settings.AGENT_MAX_FRAME_BYTES = 20_000
    node, neighbour = make_node(), make_node()
    reservation = held_by(tenant, node)
    secrets = {node.pk: enrol(node), neighbour.pk: enrol(neighbour)}
    bad = batch(node)
    if problem == "foreign gpu":
        bad["gpus"][0]["uuid"] = neighbour.gpus.first().uuid
    elif problem == "out of range":
        bad["gpus"][3][telemetry.TEMP] = 900
    elif problem == "too large":
        bad["padding"] = "x" * 30_000
    elif problem == "no gpus":
        bad["gpus"] = []
    elif problem == "bad time":
        bad["at"] = "yesterday"
    elif problem == "used > total":
        bad["gpus"][0][telemetry.FB_USED] = 90_000

    member, good, neighbours = cookie_for(tenant.user), batch(node), batch(neighbour)

    async def scenario():
        watcher = browser(f"/ws/reservations/{reservation.id}/", member)
        await accepted(watcher)
        sender = await started(node, secrets[node.pk])
        other = await started(neighbour, secrets[neighbour.pk])
        await sender.send(bad)
        error = await sender.expect("error")
        await sender.send(good)  # the same connection goes on
        await other.send(neighbours)
        received = await frames(watcher, until=lambda got: len(got) >= 1)
        for ws in (watcher.disconnect, sender.close, other.close):
            await ws()
        return error, received

    error, received = async_to_sync(scenario)()
    assert error["code"] in ("bad_telemetry", "frame_too_large") and error["message"]
    assert len(received) == 1 and received[0]["gpus"][0][telemetry.FB_USED] == 1000  # only the good batch


def test_telemetry_before_hello_is_refused_uncounted_and_the_connection_goes_on():
    node = make_node()
    secret = enrol(node)
    early, bad, good = batch(node), {"type": "telemetry", "at": time.time(), "gpus": []}, batch(node)

    async def scenario():
        telemetry.BUFFER.drain()  # what earlier tests in this process left
        agent = Agent(secret)
        assert await agent.connect()
        await agent.expect("welcome")
        await agent.send(early)
        refused = await agent.expect("error")
        await agent.close()
        agent = await started(node, secret)
        await agent.send(bad)
        await agent.expect("error")
        await agent.send(good)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while telemetry.BUFFER.accepted < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        records, accepted, rejected = telemetry.BUFFER.drain()
        await agent.close()
        return refused, records, accepted, rejected

    refused, records, accepted, rejected = async_to_sync(scenario)()
    assert refused["code"] == "bad_telemetry" and "before hello" in refused["message"]
    assert (accepted, rejected) == (1, 1)  # a batch before hello is a protocol slip, not a bad reading
    assert sum(r.samples for r in records) == node.gpu_count


def test_stored_rollups_equal_an_independent_computation_from_the_samples_sent(tenant):
    node = make_node(gpus=2)
    secret = enrol(node)
    base = (time.time() // 60) * 60 - 120  # two whole minutes ago, so both minutes are closed
    samples = []
    for second in range(0, 120, 5):
        at = base + second
        util, power, energy = (second * 7) % 101, 100 + second * 3.25, 1_000_000 + second * 450_000
        frame = batch(node, at=at)
        for gpu in frame["gpus"]:
            gpu.update(
                {
                    telemetry.UTIL: util + gpu["index"],
                    telemetry.POWER: power + gpu["index"],
                    telemetry.TEMP: 30 + second % 17,
                    telemetry.FB_USED: 500 + second,
                    telemetry.ENERGY: energy + gpu["index"] * 10,
                }
            )
        samples.append(frame)

    async def scenario():
        agent = await started(node, secret)
        for frame in samples:
            await agent.send(frame)
        await asyncio.sleep(0.5)
        await telemetry.flush()
        await agent.close()

    async_to_sync(scenario)()

    expected = {}
    last_energy = {}
    for frame in samples:
        minute = int(frame["at"] // 60) * 60
        for gpu in frame["gpus"]:
            row = expected.setdefault((gpu["uuid"], minute), {"u": [], "p": [], "t": [], "f": [], "e": 0})
            row["u"].append(gpu[telemetry.UTIL])
            row["p"].append(gpu[telemetry.POWER])
            row["t"].append(gpu[telemetry.TEMP])
            row["f"].append(gpu[telemetry.FB_USED])
            previous = last_energy.get(gpu["uuid"])
            last_energy[gpu["uuid"]] = gpu[telemetry.ENERGY]
            row["e"] += 0 if previous is None else gpu[telemetry.ENERGY] - previous
    stored = {(r.gpu.uuid, int(r.minute.timestamp())): r for r in GpuRollup.objects.select_related("gpu")}
    assert set(stored) == set(expected)
    for key, want in expected.items():
        row = stored[key]
        assert row.samples == len(want["u"])
        assert row.util_mean == pytest.approx(sum(want["u"]) / len(want["u"]))
        assert row.util_max == max(want["u"]) and row.power_max == max(want["p"])
        assert row.power_mean == pytest.approx(sum(want["p"]) / len(want["p"]))
        assert row.temp_max == max(want["t"]) and row.fb_used_max == max(want["f"])
        assert row.energy_mj == want["e"]


def test_a_minute_written_by_several_flushes_is_the_minute_folded_at_once():
    """rollups_write merges the parts of a minute (later flushes, other processes) by the rules of
    telemetry_ingest.GpuMinute; a record of a GPU that is gone is dropped."""
    node = make_node(gpus=2)
    minute = int(time.time() // 60) * 60 - 60
    samples = []
    for second in range(0, 60, 4):
        frame = batch(node, at=minute + second)
        for gpu in frame["gpus"]:
            gpu.update({telemetry.UTIL: (second * 13) % 101, telemetry.POWER: 200 + second * 1.5})
            gpu.update({telemetry.TEMP: 30 + second % 11, telemetry.ENERGY: 5_000 + second * 400})
        samples.append(frame)

    def fold(stream, frames):
        buffer = RollupBuffer()
        for frame in frames:
            buffer.fold(stream, *telemetry_ingest.validate(frame, stream))
        return buffer.drain()[0]

    whole = {r.gpu_id: r for r in fold(telemetry.node_stream(node_id=node.pk), samples)}
    stream = telemetry.node_stream(node_id=node.pk)
    gone = GpuMinute(gpu_id=max(whole) + 1_000, minute=minute, samples=1)
    telemetry.rollups_write([*fold(stream, samples[:3]), gone])
    telemetry.rollups_write(fold(stream, samples[3:4]))
    telemetry.rollups_write(fold(stream, samples[4:]))

    stored = {r.gpu_id: r for r in GpuRollup.objects.all()}
    assert set(stored) == set(whole)
    for gpu_id, want in whole.items():
        row = stored[gpu_id]
        assert int(row.minute.timestamp()) == minute
        assert {name: getattr(row, name) for name in telemetry_ingest.ROLLUP_COLUMNS[2:]} == {
            name: getattr(want, name) for name in telemetry_ingest.ROLLUP_COLUMNS[2:]
        }


def test_energy_of_a_reservation_counts_whole_minutes_of_its_active_interval_only(tenant):
    node = make_node(gpus=1)
    reservation = held_by(tenant, node)
    activated = reservation.activated_at.replace(second=30, microsecond=0)
    Reservation.objects.filter(pk=reservation.pk).update(activated_at=activated)
    reservation.refresh_from_db()
    gpu = node.gpus.get()
    first = activated.replace(second=0)
    GpuRollup.objects.create(gpu=gpu, minute=first - timedelta(minutes=1), energy_mj=999_000_000)  # before
    GpuRollup.objects.create(gpu=gpu, minute=first, energy_mj=777_000_000)  # cut by the activation: not only its
    GpuRollup.objects.create(gpu=gpu, minute=first + timedelta(minutes=1), energy_mj=1_800_000_000)
    GpuRollup.objects.create(gpu=gpu, minute=first + timedelta(minutes=2), energy_mj=1_800_000_000)
    assert str(reservation_energy_kwh(reservation=reservation)) == "1.0000"  # 3.6e9 mJ = 1 kWh


def test_metrics_needs_the_operator_token_and_speaks_prometheus(tenant, settings):
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    node = make_node()
    held_by(tenant, node)
    secret = enrol(node)
    good = batch(node)

    async def scenario():
        agent = await started(node, secret)
        await agent.send(good)
        await agent.send({"type": "telemetry", "at": time.time(), "gpus": []})  # rejected
        await agent.expect("error")
        await asyncio.sleep(0.3)
        await telemetry.flush()
        await agent.close()

    async_to_sync(scenario)()
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    response = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-token")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    uuid = node.gpus.order_by("index").first().uuid
    assert (
        f'DCGM_FI_DEV_POWER_USAGE{{UUID="{uuid}",gpu="0",modelName="NVIDIA H100 80GB HBM3",node="{node.hostname}"'
        in text
    )
    assert 'neocloud_reservations{state="active"} 1.0' in text
    assert "neocloud_agents_connected 1.0" in text
    assert 'neocloud_telemetry_batches_total{result="rejected"}' in text


def test_the_fleet_page_is_for_operators_only(tenant):
    tenant_browser = Client()
    tenant_browser.login(username=tenant.user.email, password=PASSWORD)
    assert tenant_browser.get("/fleet/").status_code == 403
    operator = make_user(is_staff=True)
    staff = Client()
    staff.login(username=operator.email, password=PASSWORD)
    make_node()
    assert staff.get("/fleet/").status_code == 200
