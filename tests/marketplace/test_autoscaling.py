"""The autoscaler (issue 14): the decision from concurrency (pure), the gateways' concurrency through
Redis, scale events, and replicas following the ask with draining."""

from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from marketplace.choices import LIVE_REPLICA_STATES, ReplicaState
from marketplace.models import Endpoint, EndpointScaleEvent, Replica
from marketplace.services.endpoints.autoscaling import Policy, decide, endpoint_autoscale, endpoints_autoscale
from marketplace.services.endpoints.concurrency import (
    ConcurrencyMeter,
    Series,
    concurrency_add,
    concurrency_key,
    concurrency_series,
)
from marketplace.services.endpoints.lifecycle import endpoint_create, endpoint_reconcile
from tests.factories import make_served_model, make_tenant

NOW = timezone.now()


def policy(**fields) -> Policy:
    return Policy(**{"target": 10, "min_replicas": 1, "max_replicas": 16, "utilization": 1.0, **fields})


def flat(value: float, seconds: int = 60) -> list[float]:
    return [value] * seconds


class TestDecide:
    def test_desired_is_concurrency_over_target_times_utilization_rounded_up(self):
        assert decide(concurrency=flat(25), ready=3, current=3, policy=policy(), now=NOW, panic_until=None).desired == 3
        assert (
            decide(
                concurrency=flat(25), ready=3, current=3, policy=policy(utilization=0.5), now=NOW, panic_until=None
            ).desired
            == 5
        )
        assert decide(concurrency=flat(30), ready=3, current=3, policy=policy(), now=NOW, panic_until=None).desired == 3

    def test_a_step_to_twice_the_capacity_panics_and_scales_on_the_panic_window(self):
        step = flat(5, 54) + flat(40, 6)  # one replica at 10: the last 6 s ask for 4
        decision = decide(concurrency=step, ready=1, current=1, policy=policy(), now=NOW, panic_until=None)
        assert decision.desired == 4 and decision.panic_until == NOW + timedelta(seconds=60)
        assert decision.reason.startswith("panic")
        calm = decide(concurrency=step, ready=1, current=1, policy=policy(), now=NOW, panic_until=None)
        assert calm.inputs["stable_wants"] == 1  # the stable window alone would have waited

    def test_no_scaling_down_while_panicking_and_the_panic_ends_a_stable_window_later(self):
        quiet = flat(0)
        panicking = decide(
            concurrency=quiet, ready=4, current=4, policy=policy(), now=NOW, panic_until=NOW + timedelta(seconds=30)
        )
        assert panicking.desired == 4 and panicking.panic_until == NOW + timedelta(seconds=30)
        over = decide(concurrency=quiet, ready=4, current=4, policy=policy(), now=NOW, panic_until=NOW)
        assert over.panic_until is None and over.desired == 2  # by half at most

    def test_scaling_down_is_at_most_by_half_a_decision(self):
        decision = decide(concurrency=flat(1), ready=8, current=8, policy=policy(), now=NOW, panic_until=None)
        assert decision.desired == 4

    def test_bounds_hold_and_say_so(self):
        low = decide(concurrency=flat(0), ready=2, current=2, policy=policy(min_replicas=2), now=NOW, panic_until=None)
        assert low.desired == 2 and "minimum of 2" in low.reason
        high = decide(
            concurrency=flat(500), ready=3, current=3, policy=policy(max_replicas=5), now=NOW, panic_until=None
        )
        assert high.desired == 5 and "maximum of 5" in high.reason

    def test_an_idle_endpoint_may_go_to_zero_when_its_minimum_is_zero(self):
        decision = decide(
            concurrency=flat(0), ready=1, current=1, policy=policy(min_replicas=0), now=NOW, panic_until=None
        )
        assert decision.desired == 0 and "no request in flight" in decision.reason
        woken = decide(
            concurrency=flat(0, 59) + [1.0],
            ready=0,
            current=0,
            policy=policy(min_replicas=0),
            now=NOW,
            panic_until=None,
        )
        assert woken.desired == 1  # one request waiting wakes it (over the panic threshold from nothing)

    @pytest.mark.parametrize("concurrency", [flat(7.0), flat(0.01), [3.0, 9.0] * 30, flat(10.0)])
    def test_steady_load_at_the_capacity_keeps_its_replicas(self, concurrency):
        ready = max(1, -(-int(sum(concurrency) / len(concurrency) * 100) // 1000))
        decision = decide(
            concurrency=concurrency, ready=ready, current=ready, policy=policy(), now=NOW, panic_until=None
        )
        assert decision.desired == ready and decision.reason == "steady"


def test_the_meter_averages_requests_in_flight_over_the_read():
    clock = [0.0]
    meter = ConcurrencyMeter(clock=lambda: clock[0])
    meter.begin("e")  # one for the whole second
    clock[0] = 0.5
    meter.begin("e")  # a second one for half of it
    clock[0] = 1.0
    assert meter.read() == {"e": (1.5, 2)}
    meter.end("e")
    meter.end("e")
    assert meter.in_flight("e") == 0
    clock[0] = 2.0
    assert meter.read() == {}  # nothing in flight, nothing arrived: nothing to report


def test_gateways_add_up_in_redis_and_the_series_reads_back_per_second():
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(concurrency_key("ep"))
    second = 1_800_000_000
    for gateway_reading in ({"ep": (2.0, 10)}, {"ep": (3.5, 4)}):  # two gateway processes, the same second
        pipe = client.pipeline()
        concurrency_add(pipe, gateway_reading, now=second + 0.4)
        pipe.execute()
    series = concurrency_series(["ep"], seconds=3, now=second + 1.2, client=client)["ep"]
    assert series.concurrency == [0.0, 0.0, 5.5] and series.arrivals == [0, 0, 14]


@pytest.fixture
def endpoint(db):
    model = make_served_model(nodes=1)
    return endpoint_create(tenant=make_tenant(), name="embed", model=model, region="eu-central", max_replicas=4)


def ready_all(endpoint):
    Replica.objects.filter(endpoint=endpoint, state=ReplicaState.STARTING).update(
        state=ReplicaState.READY, address="127.0.0.1:1", ready_at=timezone.now()
    )


def test_a_changed_ask_is_a_scale_event_and_reconcile_starts_the_replicas(endpoint, django_capture_on_commit_callbacks):
    ready_all(endpoint)
    with django_capture_on_commit_callbacks():
        decision = endpoint_autoscale(endpoint_id=endpoint.pk, series=Series(flat(0, 54) + flat(40, 6), flat(0)))
    assert decision.desired == 4
    event = EndpointScaleEvent.objects.get(endpoint=endpoint)
    assert (event.from_replicas, event.to_replicas, event.panic) == (1, 4, True)
    assert event.inputs["panic_concurrency"] == 40.0 and event.reason.startswith("panic")
    endpoint_reconcile(endpoint_id=endpoint.pk)
    assert Replica.objects.filter(endpoint=endpoint, state__in=LIVE_REPLICA_STATES).count() == 4
    # The same load again: nothing changes, no new event.
    endpoint_autoscale(endpoint_id=endpoint.pk, series=Series(flat(0, 54) + flat(40, 6), flat(0)))
    assert EndpointScaleEvent.objects.filter(endpoint=endpoint).count() == 1


def test_scaling_down_drains_then_stops_and_a_drained_replica_is_taken_back_when_needed(endpoint, settings):
    endpoint.desired_replicas = 3
    endpoint.save(update_fields=["desired_replicas"])
    endpoint_reconcile(endpoint_id=endpoint.pk)
    ready_all(endpoint)
    endpoint.refresh_from_db()
    endpoint.desired_replicas = 1
    endpoint.save(update_fields=["desired_replicas"])
    counts = endpoint_reconcile(endpoint_id=endpoint.pk)
    assert counts["drained"] == 2
    states = sorted(Replica.objects.filter(endpoint=endpoint).values_list("state", flat=True))
    assert states == [ReplicaState.DRAINING, ReplicaState.DRAINING, ReplicaState.READY]
    # Asked for two again while they drain: one comes back, no new replica.
    endpoint.desired_replicas = 2
    endpoint.save(update_fields=["desired_replicas"])
    endpoint_reconcile(endpoint_id=endpoint.pk)
    assert Replica.objects.filter(endpoint=endpoint).count() == 3
    assert Replica.objects.filter(endpoint=endpoint, state=ReplicaState.READY).count() == 2
    # The drain window passes: the last draining one is stopped.
    Replica.objects.filter(endpoint=endpoint, state=ReplicaState.DRAINING).update(
        draining_since=timezone.now() - timedelta(seconds=settings.ENDPOINT_DRAIN_SECONDS + 1)
    )
    endpoint_reconcile(endpoint_id=endpoint.pk)
    assert Replica.objects.filter(endpoint=endpoint, state=ReplicaState.STOPPING).count() == 1


def test_beat_decides_for_every_live_endpoint_from_redis(endpoint):
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(concurrency_key(str(endpoint.pk)))
    ready_all(endpoint)
    now = timezone.now()
    pipe = client.pipeline()
    for back in range(1, 7):
        concurrency_add(pipe, {str(endpoint.pk): (30.0, 30)}, now=now.timestamp() - back)
    pipe.execute()
    assert endpoints_autoscale(now=now) == 1
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 4  # 30 in flight at 8 x 0.7 per replica: panic, bounded by max 4


def test_an_ask_that_quota_or_capacity_refuses_is_held_and_says_why_once(endpoint):
    """One 8-GPU node: an ask of nine 1-GPU replicas gets eight; a scale event says what held it, once."""
    Endpoint.objects.filter(pk=endpoint.pk).update(max_replicas=9, desired_replicas=9)
    endpoint_reconcile(endpoint_id=endpoint.pk)
    endpoint_reconcile(endpoint_id=endpoint.pk)
    assert Replica.objects.filter(endpoint=endpoint, state__in=LIVE_REPLICA_STATES).count() == 8
    held_events = list(EndpointScaleEvent.objects.filter(endpoint=endpoint).values_list("reason", flat=True))
    assert len(held_events) == 1, held_events
    (held,) = EndpointScaleEvent.objects.filter(endpoint=endpoint)
    assert held.reason.startswith("held at 8 of 9:") and (held.from_replicas, held.to_replicas) == (8, 8)
