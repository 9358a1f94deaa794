"""The live endpoint page in Chromium (issue 14): the last hour drawn on load -- requests, latency, in
flight, replicas with the autoscaler's decisions marked, GPUs -- the cold starts and scale events
listed, and the figures following new traffic without a reload."""

import os
import time
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from marketplace.choices import ReplicaState
from marketplace.models import LATENCY_BUCKETS_MS, EndpointTraffic, Replica, TrafficOutcome
from marketplace.services.endpoints.autoscaling import endpoint_autoscale
from marketplace.services.endpoints.concurrency import Series, concurrency_add, concurrency_key
from marketplace.services.endpoints.lifecycle import endpoint_create
from tests.browser.test_portal import sign_in
from tests.factories import make_served_model

pytestmark = pytest.mark.django_db(transaction=True)
BUCKETS = len(LATENCY_BUCKETS_MS) + 1


def traffic(endpoint, minute, outcome, requests, bucket: int) -> None:
    counts = [0] * BUCKETS
    counts[bucket] = requests
    EndpointTraffic.objects.create(
        endpoint=endpoint,
        minute=minute,
        outcome=outcome,
        requests=requests,
        latency_ms_sum=requests * LATENCY_BUCKETS_MS[bucket] * 0.8,
        latency_buckets=counts,
    )


def test_the_page_draws_the_last_hour_and_follows_new_traffic(page, tenant, tmp_path):
    model = make_served_model(region="eu-central")
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central", max_replicas=4)
    now = timezone.now()
    Replica.objects.filter(endpoint=endpoint).update(
        state=ReplicaState.READY,
        created_at=now - timedelta(minutes=40),
        ready_at=now - timedelta(minutes=39, seconds=20),
    )
    endpoint_autoscale(
        endpoint_id=endpoint.pk, series=Series([0.0] * 54 + [15.0] * 6, [0] * 60), now=now - timedelta(minutes=20)
    )
    minute = now.replace(second=0, microsecond=0)
    for back in range(30, 0, -1):
        traffic(endpoint, minute - timedelta(minutes=back), TrafficOutcome.OK, 60 + back, bucket=3)
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = concurrency_key(str(endpoint.pk))
    client.delete(key)
    pipe = client.pipeline()
    for second in range(int(time.time()) - 120, int(time.time()) + 60):
        concurrency_add(pipe, {str(endpoint.pk): (4.0, 3)}, now=second + 0.5)
    pipe.execute()

    sign_in(page, tenant.user.email)
    page.goto(f"/endpoints/{endpoint.id}/")
    root = page.locator("[data-endpoint-metrics]")
    page.wait_for_function("document.querySelector('[data-endpoint-metrics]').dataset.metricsLoaded !== '0'")
    for chart in ("requests", "latency", "in_flight", "replicas"):
        assert root.locator(f'[data-chart="{chart}"] canvas').count() == 1, chart
    assert root.locator("[data-gpus-empty]").is_visible()  # no GPU readings in this test
    mark = root.locator('[data-chart="replicas"] .scale-mark')
    assert mark.count() == 1 and mark.inner_text() == "1→3"
    assert "1 → 3 replicas (panic)" in mark.get_attribute("title")
    assert root.locator("[data-scale-events] tbody tr[data-scale-row]").count() == 1
    cold = root.locator("[data-cold-starts] tbody tr[data-cold-start]")
    assert cold.count() == 1 and "40 s" in cold.inner_text()
    assert root.locator('[data-now="in_flight"]').inner_text() == "4.00"
    assert root.locator('[data-now="requests_per_s"]').inner_text() == "3.00"
    assert root.locator('[data-now="errors"]').inner_text() == "0 (0.0 %)"
    shots = os.environ.get("SCREENSHOT_DIR", str(tmp_path))
    page.screenshot(path=f"{shots}/endpoint-live.png", full_page=True)

    # New failures are collected: the page shows them within a poll, without a reload.
    traffic(endpoint, minute, TrafficOutcome.SERVER_ERROR, 9, bucket=0)
    page.wait_for_function(
        "document.querySelector('[data-now=\"errors\"]').textContent.startsWith('9 ')", timeout=12_000
    )
    assert page.locator("[data-endpoint-metrics]").get_attribute("data-metrics-loaded") != "1"
    client.delete(key)
