"""An endpoint's last hour (issue 14, the live endpoint page): selectors.endpoints.endpoint_timeline and
GET /api/v1/endpoints/{id}/metrics/ -- requests, latency and in flight per minute from the gateways'
rows, replicas at every change with the autoscaler's scale events, cold starts, the replicas' GPU
utilization sealed in time and per GPU, the cost so far, the live numbers from the gateways' Redis
counts -- and another tenant's endpoint answering 404."""

import time
from datetime import timedelta
from decimal import Decimal

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from marketplace.choices import ReplicaState
from marketplace.models import LATENCY_BUCKETS_MS, EndpointScaleEvent, EndpointTraffic, Replica, TrafficOutcome
from marketplace.selectors.endpoints import endpoint_cost_now, endpoint_timeline
from marketplace.services.endpoints.autoscaling import endpoint_autoscale
from marketplace.services.endpoints.concurrency import Series, concurrency_add, concurrency_key
from marketplace.services.endpoints.lifecycle import endpoint_create, endpoint_reconcile
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_begin,
    reservation_complete,
    reservation_create,
    reservation_fail,
    reservation_release,
)
from provisioning.models import GpuRollup
from provisioning.services import telemetry, telemetry_ingest
from tests.conftest import key_client
from tests.factories import make_served_model, make_tenant

pytestmark = pytest.mark.django_db

BUCKETS = len(LATENCY_BUCKETS_MS) + 1


def buckets(**counts) -> list[int]:
    """Latency bucket counts by upper bound: ``buckets(le10=4, le50=1)``; ``inf`` the open last one."""
    out = [0] * BUCKETS
    for name, count in counts.items():
        out[len(LATENCY_BUCKETS_MS) if name == "inf" else LATENCY_BUCKETS_MS.index(int(name[2:]))] = count
    return out


def traffic(endpoint, minute, outcome, requests, *, replica=None, tokens=0, latency_ms_sum=0.0, **bucket_counts):
    return EndpointTraffic.objects.create(
        endpoint=endpoint,
        replica=replica,
        minute=minute,
        outcome=outcome,
        requests=requests,
        input_tokens=tokens,
        latency_ms_sum=latency_ms_sum,
        latency_buckets=buckets(**bucket_counts) if bucket_counts else [0] * BUCKETS,
    )


@pytest.fixture
def model():
    return make_served_model(region="eu-central", nodes=1)


@pytest.fixture
def deployed(tenant, model):
    return endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central", max_replicas=4)


def flat(value: float, seconds: int = 60) -> list[float]:
    return [value] * seconds


def test_each_minute_counts_the_gateways_rows_of_its_endpoint_only(deployed, other_tenant, model):
    now = timezone.now().replace(second=30, microsecond=0)  # half of the current minute gone
    current = now.replace(second=0)
    replica = deployed.replicas.get()
    ten_ago = current - timedelta(minutes=10)
    traffic(
        deployed, ten_ago, TrafficOutcome.OK, 100, replica=replica, tokens=1000, latency_ms_sum=3000.0, le25=50, le50=50
    )
    traffic(deployed, ten_ago, TrafficOutcome.SERVER_ERROR, 20, latency_ms_sum=20.0, le5=20)  # no replica took them
    traffic(deployed, current - timedelta(minutes=2), TrafficOutcome.CLIENT_ERROR, 6, replica=replica, le5=6)
    traffic(deployed, current, TrafficOutcome.OK, 15, replica=replica, latency_ms_sum=1500.0, le100=15)
    traffic(deployed, current - timedelta(minutes=61), TrafficOutcome.OK, 999, le5=999)  # before the hour
    theirs = endpoint_create(tenant=other_tenant, name="embed", model=model, region="eu-central")
    traffic(theirs, ten_ago, TrafficOutcome.OK, 7777, le5=7777)

    doc = endpoint_timeline(endpoint=deployed, minutes=60, now=now)

    minutes = doc["minutes"]
    assert len(minutes) == 60 and minutes[0]["minute"] == doc["since"] == current - timedelta(minutes=59)
    assert minutes[-1]["minute"] == current
    by_minute = {m["minute"]: m for m in minutes}
    busy = by_minute[ten_ago]
    assert (busy["requests"], busy["ok"], busy["server_errors"], busy["input_tokens"]) == (120, 100, 20, 1000)
    assert busy["requests_per_s"] == 2.0 and busy["errors_per_s"] == pytest.approx(20 / 60, abs=1e-4)
    assert busy["in_flight"] == pytest.approx(3.02 / 60, abs=1e-4)  # the minute's latencies, 3.02 s, over 60 s
    assert busy["mean_ms"] == pytest.approx(3020 / 120)
    assert busy["p50_ms"] == pytest.approx(10 + 15 * 40 / 50)  # rank 60: 40 into the 10-25 ms bucket
    assert busy["p99_ms"] == pytest.approx(25 + 25 * 48.8 / 50)
    # The current minute counts over its 30 seconds so far, not 60.
    assert by_minute[current]["seconds"] == 30.0 and by_minute[current]["requests_per_s"] == 0.5
    assert by_minute[current]["in_flight"] == pytest.approx(0.05)
    quiet = by_minute[current - timedelta(minutes=30)]
    assert quiet["requests"] == 0 and quiet["p50_ms"] is None and quiet["requests_per_s"] == 0.0
    assert doc["totals"]["requests"] == 141 and doc["totals"]["client_errors"] == 6  # not the 999, not theirs
    assert doc["recent"]["requests"] == 21 and doc["recent"]["server_errors"] == 0  # the last 5 minutes
    assert doc["live"] is None  # no concurrency given


def test_replicas_at_every_change_with_the_autoscalers_events_and_the_cold_starts(deployed):
    now = timezone.now()
    at = lambda minutes: now - timedelta(minutes=minutes)  # noqa: E731
    first = deployed.replicas.get()
    Replica.objects.filter(pk=first.pk).update(state=ReplicaState.READY, created_at=at(50), ready_at=at(49))
    # A burst 30 minutes ago: the autoscaler asks for 3, reconcile places two more.
    up = endpoint_autoscale(endpoint_id=deployed.pk, series=Series(flat(0, 54) + flat(15, 6), flat(0)), now=at(30))
    assert up.desired == 3
    endpoint_reconcile(endpoint_id=deployed.pk)
    second, doomed = deployed.replicas.exclude(pk=first.pk).order_by("pk")
    Replica.objects.filter(pk__in=[second.pk, doomed.pk]).update(created_at=at(30))
    Replica.objects.filter(pk=second.pk).update(state=ReplicaState.READY, ready_at=at(29.5))
    # One never answers: its slice fails, reconcile stops it and places a replacement.
    assert reservation_begin(reservation_id=doomed.reservation_id)
    assert reservation_fail(reservation_id=doomed.reservation_id, reason="node exploded")
    endpoint_reconcile(endpoint_id=deployed.pk)
    Replica.objects.filter(pk=doomed.pk).update(stopped_at=at(25))
    replacement = deployed.replicas.exclude(pk__in=[first.pk, second.pk, doomed.pk]).get()
    Replica.objects.filter(pk=replacement.pk).update(state=ReplicaState.READY, created_at=at(25), ready_at=at(24))
    # Quiet since: 3 -> 1 ten minutes ago; the two newest drain from a minute later.
    down = endpoint_autoscale(endpoint_id=deployed.pk, series=Series(flat(0), flat(0)), now=at(10))
    assert down.desired == 1
    endpoint_reconcile(endpoint_id=deployed.pk)
    assert set(Replica.objects.filter(state=ReplicaState.DRAINING).values_list("pk", flat=True)) == {
        second.pk,
        replacement.pk,
    }
    Replica.objects.filter(state=ReplicaState.DRAINING).update(draining_since=at(9))
    deployed.refresh_from_db()

    doc = endpoint_timeline(endpoint=deployed, minutes=60, now=now)

    steps = [(s["at"], s["ready"], s["running"], s["asked"]) for s in doc["replicas"]["steps"]]
    assert steps == [
        (doc["since"], 0, 0, 1),
        (at(50), 0, 1, 1),
        (at(49), 1, 1, 1),
        (at(30), 1, 3, 3),  # the event and the two placements at once
        (at(29.5), 2, 3, 3),
        (at(25), 2, 3, 3),  # the failed one stopped, its replacement placed
        (at(24), 3, 3, 3),
        (at(10), 3, 3, 1),
        (at(9), 1, 3, 1),  # drained: no longer ready, still holding their slices
        (now, 1, 3, 1),
    ]
    assert (doc["replicas"]["ready"], doc["replicas"]["running"], doc["replicas"]["target"]) == (1, 3, 1)
    events = EndpointScaleEvent.objects.filter(endpoint=deployed).order_by("at")
    assert [(e["from_replicas"], e["to_replicas"], e["reason"], e["panic"]) for e in doc["scale_events"]] == [
        (e.from_replicas, e.to_replicas, e.reason, e.panic) for e in events
    ]
    assert [(e["from_replicas"], e["to_replicas"]) for e in doc["scale_events"]] == [(1, 3), (3, 1)]
    assert doc["scale_events"][0]["panic"] and doc["scale_events"][1]["reason"].startswith("no request in flight")
    starts = {s["replica"]: s for s in doc["cold_starts"]}
    assert {pk: (s["outcome"], s["seconds"]) for pk, s in starts.items()} == {
        first.pk: ("ready", 60.0),
        second.pk: ("ready", 30.0),
        doomed.pk: ("failed", None),
        replacement.pk: ("ready", 60.0),
    }
    assert "node exploded" in starts[doomed.pk]["reason"]
    assert doc["cold_starts"][0]["replica"] == replacement.pk  # newest first

    # Most of an hour later: no start and no decision in the window; it begins with what held then.
    later = endpoint_timeline(endpoint=deployed, minutes=60, now=now + timedelta(minutes=55))
    assert later["cold_starts"] == [] and later["scale_events"] == []
    first_step = later["replicas"]["steps"][0]
    assert (first_step["ready"], first_step["running"], first_step["asked"]) == (1, 3, 1)


def test_a_replica_still_starting_shows_how_long_so_far(deployed):
    now = timezone.now()
    Replica.objects.filter(endpoint=deployed).update(created_at=now - timedelta(seconds=42))
    (start,) = endpoint_timeline(endpoint=deployed, now=now)["cold_starts"]
    assert (start["outcome"], start["seconds"], start["ready_at"]) == ("starting", 42.0, None)


def test_the_cost_so_far_counts_every_replica_by_the_second_and_the_hour_now(tenant, model):
    endpoint = endpoint_create(
        tenant=tenant, name="embed", model=model, region="eu-central", min_replicas=2, max_replicas=2
    )
    now = timezone.now()
    running, finished = (r.reservation for r in endpoint.replicas.select_related("reservation").order_by("pk"))
    assert reservation_begin(reservation_id=running.pk) and reservation_begin(reservation_id=finished.pk)
    assert reservation_activate(reservation_id=running.pk, at=now - timedelta(hours=2))  # $1.00 a GPU-hour, 1 GPU
    assert reservation_activate(reservation_id=finished.pk, at=now - timedelta(hours=3))
    assert reservation_release(reservation_id=finished.pk, at=now - timedelta(hours=2, minutes=30))
    assert reservation_complete(reservation_id=finished.pk)
    cost = endpoint_cost_now(endpoint=endpoint, now=now)
    assert cost["so_far"] == Decimal("2.5") and cost["per_hour"] == Decimal("1.00")
    # Another tenant's rental on the same offer is not the endpoint's.
    slice_offer = running.offer
    theirs = reservation_create(
        tenant=make_tenant(), offer=slice_offer, quantity=1, start=None, end=None, duration_hours=4
    )
    assert reservation_begin(reservation_id=theirs.pk)
    assert reservation_activate(reservation_id=theirs.pk, at=now - timedelta(hours=4))
    assert endpoint_cost_now(endpoint=endpoint, now=now)["so_far"] == Decimal("2.5")
    assert endpoint_timeline(endpoint=endpoint, now=now)["cost"]["so_far"] == Decimal("2.5")


def latest_batch(node, utils: dict[int, float]) -> None:
    """The node's latest batch in Redis, as the ingest path stores it (every GPU of the node)."""
    stream = telemetry.node_stream(node_id=node.pk)
    frame = {
        "type": "telemetry",
        "seq": 1,
        "at": time.time(),
        "gpus": [{"uuid": g.uuid, "index": g.index, telemetry.UTIL: utils.get(g.index, 0.0)} for g in node.gpus.all()],
    }
    at, readings = telemetry_ingest.validate(frame, stream)
    redis.Redis.from_url(settings.REDIS_URL).hset(
        telemetry.LATEST_KEY, str(node.pk), telemetry_ingest.encode(stream, at, readings).node
    )


def util_rollup(gpu, minute, util: float) -> None:
    GpuRollup.objects.create(gpu=gpu, minute=minute, samples=60, util_n=60, util_sum=util * 60, util_max=util)


def test_the_replicas_gpu_utilization_is_sealed_in_time_and_per_gpu(tenant, model, django_assert_max_num_queries):
    """A replica reads its own GPU's minutes while its slice was active: not the minutes before (another
    holder's), not the GPU beside it another tenant holds on the same node at the same time."""
    endpoint = endpoint_create(
        tenant=tenant, name="embed", model=model, region="eu-central", min_replicas=2, max_replicas=2
    )
    now = timezone.now()
    minute = now.replace(second=0, microsecond=0)
    serving, unplaced = endpoint.replicas.select_related("reservation").order_by("pk")
    assert reservation_begin(reservation_id=serving.reservation_id)
    assert reservation_activate(reservation_id=serving.reservation_id, at=minute - timedelta(minutes=30))
    neighbour = reservation_create(
        tenant=make_tenant(), offer=serving.reservation.offer, quantity=1, start=None, end=None, duration_hours=4
    )
    assert reservation_begin(reservation_id=neighbour.pk)
    assert reservation_activate(reservation_id=neighbour.pk, at=minute - timedelta(minutes=50))
    node = serving.reservation.allocations.get().node
    mine = node.gpus.get(index=serving.reservation.allocations.get().gpus.lower)
    beside = node.gpus.get(index=neighbour.allocations.get().gpus.lower)
    assert beside.node_id == mine.node_id and beside.pk != mine.pk
    for back in (20, 19, 18):
        util_rollup(mine, minute - timedelta(minutes=back), 40.0)
        util_rollup(beside, minute - timedelta(minutes=back), 77.0)
    util_rollup(mine, minute - timedelta(minutes=45), 99.0)  # before its slice went active: someone else's
    latest_batch(node, {mine.index: 35.0, beside.index: 88.0})

    with django_assert_max_num_queries(8):  # a handful, whatever the number of replicas and rows
        gpus = endpoint_timeline(endpoint=endpoint, now=now)["gpus"]

    assert [g["replica"] for g in gpus] == [serving.pk]  # the other never went active: nothing to read
    (series,) = gpus
    assert [(p["minute"], p["util"]) for p in series["minutes"]] == [
        (minute - timedelta(minutes=back), 40.0) for back in (20, 19, 18)
    ]
    assert series["latest"]["util"] == 35.0
    assert series["node"] == node.hostname and series["gpu_label"] == f"GPU {mine.index}"


# --- The API --------------------------------------------------------------------------------------


def url(endpoint) -> str:
    return f"/api/v1/endpoints/{endpoint.pk}/metrics/"


def test_the_api_answers_the_last_hour_with_the_gateways_live_numbers(tenant, deployed):
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = concurrency_key(str(deployed.pk))
    client.delete(key)
    wall = time.time()
    pipe = client.pipeline()
    for second in range(int(wall) - 12, int(wall) + 4):  # the seconds the request may read as its last ones
        concurrency_add(pipe, {str(deployed.pk): (3.0, 2)}, now=second + 0.5)
    pipe.execute()
    minute = timezone.now().replace(second=0, microsecond=0)
    traffic(deployed, minute - timedelta(minutes=3), TrafficOutcome.OK, 60, latency_ms_sum=600.0, le10=60)

    response = key_client(tenant).get(url(deployed))

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["id"] == str(deployed.pk) and len(body["minutes"]) == 60
    assert body["totals"]["requests"] == 60 and body["totals"]["ok"] == 60
    (row,) = [m for m in body["minutes"] if m["requests"]]
    assert row["requests_per_s"] == 1.0 and row["p50_ms"] == pytest.approx(7.5)
    live = body["live"]
    assert live["in_flight"] == 3.0 and live["requests_per_s"] == 2.0
    assert len(live["seconds"]["in_flight"]) == 300 and live["seconds"]["in_flight"][-1] == 3.0
    assert live["seconds"]["arrivals"][:250] == [0] * 250
    assert body["replicas"]["running"] == 1 and body["replicas"]["reservations"] == [
        str(deployed.replicas.get().reservation_id)
    ]
    assert body["cost"]["so_far"] == "0.0000000000" and body["cost"]["per_hour"] == "0.0000"  # not active yet
    client.delete(key)


def test_another_tenants_endpoint_is_404_and_bad_windows_are_400(tenant, deployed, other_tenant):
    stranger = key_client(other_tenant)
    missing = stranger.get(url(deployed))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert stranger.get("/api/v1/endpoints/not-a-uuid/metrics/").status_code == 404
    mine = key_client(tenant)
    for minutes in ("0", "1441", "soon"):
        refused = mine.get(url(deployed), {"minutes": minutes})
        assert refused.status_code == 400 and "minutes" in refused.json()["error"]["fields"], refused.json()
    assert len(mine.get(url(deployed), {"minutes": "5"}).json()["minutes"]) == 5
