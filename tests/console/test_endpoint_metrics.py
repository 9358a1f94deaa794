"""/metrics for inference endpoints (issue 14): requests by outcome and a latency histogram from what the
gateways counted, replicas by state, cold starts with how long they took, and requests in flight from
the gateways' Redis counts -- each labelled with its endpoint and tenant."""

import time
from datetime import timedelta

import pytest
import redis
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from marketplace.choices import ReplicaState
from marketplace.models import LATENCY_BUCKETS_MS, EndpointTraffic, Replica, TrafficOutcome
from marketplace.services.endpoints.concurrency import concurrency_add, concurrency_key
from marketplace.services.endpoints.lifecycle import endpoint_create, endpoint_delete, endpoint_reconcile
from tests.factories import make_served_model, make_tenant

pytestmark = pytest.mark.django_db
TOKEN = "s3cret-metrics-token"
BUCKETS = len(LATENCY_BUCKETS_MS) + 1


def scrape(settings) -> dict:
    """{(metric sample name, frozenset of labels): value} of the endpoints' families."""
    settings.METRICS_TOKEN = TOKEN
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        if family.name.startswith("neocloud_endpoint"):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def row(endpoint, minute, outcome, requests, latency_ms_sum, counts: dict[int, int]):
    buckets = [0] * BUCKETS
    for index, count in counts.items():
        buckets[index] = count
    EndpointTraffic.objects.create(
        endpoint=endpoint,
        minute=minute,
        outcome=outcome,
        requests=requests,
        latency_ms_sum=latency_ms_sum,
        latency_buckets=buckets,
    )


@pytest.fixture
def two():
    model = make_served_model(nodes=1)
    a, b = make_tenant(), make_tenant()
    return {
        "a": endpoint_create(tenant=a, name="embed", model=model, region="eu-central", min_replicas=2, max_replicas=3),
        "b": endpoint_create(tenant=b, name="embed", model=model, region="eu-central"),
        "tenant_b": b,
    }


def labels(endpoint, **more) -> frozenset:
    return frozenset(
        {
            "endpoint": str(endpoint.pk),
            "endpoint_name": endpoint.name,
            "tenant": endpoint.organization.slug,
            **more,
        }.items()
    )


def test_requests_and_the_latency_histogram_add_up_every_minute_per_endpoint(two, settings):
    a, b = two["a"], two["b"]
    minute = timezone.now().replace(second=0, microsecond=0)
    row(a, minute - timedelta(days=3), TrafficOutcome.OK, 10, 40.0, {0: 10})  # since it was made: a counter
    row(a, minute, TrafficOutcome.OK, 5, 100.0, {1: 3, 3: 2})
    row(a, minute, TrafficOutcome.SERVER_ERROR, 2, 30000.0, {BUCKETS - 1: 2})
    row(b, minute, TrafficOutcome.CLIENT_ERROR, 4, 8.0, {0: 4})

    s = scrape(settings)

    assert s[("neocloud_endpoint_requests_total", labels(a, outcome="ok"))] == 15
    assert s[("neocloud_endpoint_requests_total", labels(a, outcome="server_error"))] == 2
    assert s[("neocloud_endpoint_requests_total", labels(a, outcome="client_error"))] == 0
    assert s[("neocloud_endpoint_requests_total", labels(b, outcome="client_error"))] == 4
    cumulative = {
        le: s[("neocloud_endpoint_request_latency_ms_bucket", labels(a, le=le))]
        for le in [*(str(float(bound)) for bound in LATENCY_BUCKETS_MS), "+Inf"]
    }
    assert cumulative["5.0"] == 10 and cumulative["10.0"] == 13 and cumulative["25.0"] == 13
    assert cumulative["50.0"] == 15 and cumulative["10000.0"] == 15 and cumulative["+Inf"] == 17
    assert s[("neocloud_endpoint_request_latency_ms_count", labels(a))] == 17
    assert s[("neocloud_endpoint_request_latency_ms_sum", labels(a))] == 30140.0
    assert s[("neocloud_endpoint_request_latency_ms_count", labels(b))] == 4


def test_replicas_by_state_and_cold_starts_with_how_long_they_took(two, settings):
    a = two["a"]
    now = timezone.now()
    quick, slow = a.replicas.order_by("pk")
    Replica.objects.filter(pk=quick.pk).update(
        state=ReplicaState.READY, created_at=now - timedelta(seconds=100), ready_at=now - timedelta(seconds=75)
    )
    Replica.objects.filter(pk=slow.pk).update(
        state=ReplicaState.READY, created_at=now - timedelta(seconds=400), ready_at=now - timedelta(seconds=200)
    )
    a.desired_replicas = 3
    a.save(update_fields=["desired_replicas"])
    endpoint_reconcile(endpoint_id=a.pk)  # a third one, starting

    s = scrape(settings)

    assert s[("neocloud_endpoint_replicas", labels(a, state="ready"))] == 2
    assert s[("neocloud_endpoint_replicas", labels(a, state="starting"))] == 1
    assert s[("neocloud_endpoint_replicas", labels(a, state="draining"))] == 0
    assert ("neocloud_endpoint_replicas", labels(a, state="stopped")) not in s
    assert s[("neocloud_endpoint_cold_starts_total", labels(a))] == 2
    bucket = lambda le: s[("neocloud_endpoint_cold_start_seconds_bucket", labels(a, le=le))]  # noqa: E731
    assert (bucket("10.0"), bucket("30.0"), bucket("120.0"), bucket("300.0"), bucket("+Inf")) == (0, 1, 1, 2, 2)
    assert s[("neocloud_endpoint_cold_start_seconds_sum", labels(a))] == pytest.approx(225.0)
    assert s[("neocloud_endpoint_cold_starts_total", labels(two["b"]))] == 0


def test_requests_in_flight_come_from_the_gateways_counts_and_deleted_endpoints_leave(two, settings):
    a, b = two["a"], two["b"]
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(concurrency_key(str(a.pk)), concurrency_key(str(b.pk)))
    wall = time.time()
    pipe = client.pipeline()
    for second in range(int(wall) - 8, int(wall) + 4):  # whatever the scrape's last 5 complete seconds
        concurrency_add(pipe, {str(a.pk): (6.5, 3)}, now=second + 0.5)
    pipe.execute()

    s = scrape(settings)

    assert s[("neocloud_endpoint_in_flight", labels(a))] == 6.5
    assert s[("neocloud_endpoint_in_flight", labels(b))] == 0.0
    client.delete(concurrency_key(str(a.pk)))
    endpoint_delete(tenant=two["tenant_b"], endpoint=b)
    endpoint_reconcile(endpoint_id=b.pk)
    b.refresh_from_db()
    assert b.state == "deleted"
    after = scrape(settings)
    assert not [key for key in after if ("endpoint", str(b.pk)) in key[1]]
    assert after[("neocloud_endpoint_in_flight", labels(a))] == 0.0
