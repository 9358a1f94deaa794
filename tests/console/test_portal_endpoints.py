"""The portal's endpoint pages: the list, deploying from the form (refusals on it, a double click
deploys once), one endpoint (how to call it, its replicas, its cost; rescale and delete), and who may
see and change what."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from marketplace.choices import ReplicaState, Role
from marketplace.models import (
    LATENCY_BUCKETS_MS,
    Endpoint,
    EndpointState,
    EndpointTraffic,
    Membership,
    Reservation,
    TrafficOutcome,
)
from marketplace.selectors.reservations import reservation_billed
from marketplace.services.billing.metering import usage_rate
from marketplace.services.endpoints.lifecycle import endpoint_create
from marketplace.tenant_context import TenantContext
from tests.factories import PASSWORD, activate, make_served_model, make_tenant

pytestmark = pytest.mark.django_db


def browser_for(tenant) -> Client:
    client = Client()
    assert client.login(username=tenant.user.email, password=PASSWORD)
    return client


@pytest.fixture
def model():
    return make_served_model(region="eu-central")


def deploy_form(page: str, **fields) -> dict:
    key = re.search(r'name="idempotency_key" value="([0-9a-f]+)"', page).group(1)
    return {
        "name": "embed",
        "model": "all-minilm-l6-v2",
        "region": "eu-central",
        "placement": "nearest",
        "min_replicas": "2",
        "max_replicas": "3",
        "target_concurrency": "8",
        "idempotency_key": key,
        **fields,
    }


def test_deploying_from_the_form_shows_the_endpoint_with_its_replicas_once(tenant, model):
    browser = browser_for(tenant)
    page = browser.get("/endpoints/new/").content.decode()
    assert 'value="all-minilm-l6-v2"' in page and 'value="eu-central"' in page
    form = deploy_form(page)
    made = browser.post("/endpoints/new/", form)
    endpoint = Endpoint.objects.get()
    assert made.status_code == 302 and made["Location"] == f"/endpoints/{endpoint.id}/"
    # A double click sends the same form again: one endpoint, the same page.
    again = browser.post("/endpoints/new/", form)
    assert again["Location"] == made["Location"] and Endpoint.objects.count() == 1
    assert endpoint.replicas.count() == 2

    detail = browser.get(made["Location"]).content.decode()
    assert "deploying" in detail and "Deploying." in detail
    for replica in endpoint.replicas.select_related("reservation"):
        allocation = replica.reservation.allocations.get()
        assert f'data-replica="{replica.id}"' in detail
        assert allocation.node.hostname in detail and allocation.gpu_label in detail
    assert "0 / 2" in detail  # ready / live


def test_the_snippets_carry_the_base_url_and_the_endpoint_name(tenant, model):
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central")
    detail = browser_for(tenant).get(f"/endpoints/{endpoint.id}/").content.decode()
    base_url = settings.GATEWAY_URL.rstrip("/") + "/v1"
    python = re.search(r'<code id="snippet-python">(.*?)</code>', detail, re.S).group(1)
    curl = re.search(r'<code id="snippet-curl">(.*?)</code>', detail, re.S).group(1)
    assert f'OpenAI(base_url="{base_url}"' in python and 'embeddings.create(model="embed"' in python
    assert f"curl {base_url}/embeddings" in curl and '{"model": "embed"' in curl
    assert f'<code id="endpoint-base-url">{base_url}</code>' in detail


def test_the_list_shows_the_organizations_endpoints(tenant, other_tenant, model):
    mine = endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central")
    theirs = endpoint_create(tenant=other_tenant, name="theirs", model=model, region="eu-central")
    page = browser_for(tenant).get("/endpoints/").content.decode()
    assert f'data-endpoint="{mine.id}"' in page and f'data-endpoint="{theirs.id}"' not in page
    assert "Deploy an endpoint" in page and 'href="/endpoints/"' in page  # the nav link
    row = re.search(rf'<tr data-endpoint="{mine.id}">(.*?)</tr>', page, re.S).group(1)
    assert "embed" in row and "all-MiniLM-L6-v2" in row and "deploying" in row and "0 / 1" in row
    assert "eu-central" in row


def test_no_room_is_refused_on_the_form_with_the_services_reason(tenant, model):
    browser = browser_for(tenant)
    form = deploy_form(browser.get("/endpoints/new/").content.decode(), min_replicas="9", max_replicas="9")
    refused = browser.post("/endpoints/new/", form)
    page = refused.content.decode()
    assert refused.status_code == 409 and "No room for a 1-GPU replica" in page
    assert not Endpoint.objects.exists() and not Reservation.objects.exists()
    # The form keeps what was typed; a retry with the same key runs again (refusals are not kept).
    assert 'value="embed"' in page
    assert browser.post("/endpoints/new/", {**form, "min_replicas": "1"}).status_code == 302


def test_a_taken_name_is_refused_on_its_field(tenant, model):
    endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central")
    browser = browser_for(tenant)
    refused = browser.post("/endpoints/new/", deploy_form(browser.get("/endpoints/new/").content.decode()))
    assert refused.status_code == 409
    shown = re.search(r'name="name"[^>]*>.*?<span class="field-error">(.*?)</span>', refused.content.decode(), re.S)
    assert shown.group(1) == "Your organization already has an endpoint named &#x27;embed&#x27;."


def test_scaling_from_the_page_places_and_stops_replicas(tenant, model):
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central")
    browser = browser_for(tenant)
    url = f"/endpoints/{endpoint.id}/"
    scaled = browser.post(
        url, {"action": "scale", "min_replicas": "3", "max_replicas": "4", "target_concurrency": "16"}, follow=True
    )
    assert "Scaling bounds changed." in scaled.content.decode()
    endpoint.refresh_from_db()
    assert (endpoint.min_replicas, endpoint.max_replicas, endpoint.target_concurrency) == (3, 4, 16)
    assert endpoint.replicas.filter(state=ReplicaState.STARTING).count() == 3
    assert "scales 3–4" in scaled.content.decode()

    refused = browser.post(
        url, {"action": "scale", "min_replicas": "4", "max_replicas": "2", "target_concurrency": "8"}
    )
    assert refused.status_code == 400 and "min_replicas 0 (scale to zero) to max_replicas" in refused.content.decode()
    endpoint.refresh_from_db()
    assert (endpoint.min_replicas, endpoint.max_replicas) == (3, 4)


def test_delete_stops_the_replicas(tenant, model):
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central")
    browser = browser_for(tenant)
    page = browser.get(f"/endpoints/{endpoint.id}/").content.decode()
    assert 'value="delete"' in page and "data-confirm=" in page
    deleted = browser.post(f"/endpoints/{endpoint.id}/", {"action": "delete"}, follow=True)
    endpoint.refresh_from_db()
    assert endpoint.state in (EndpointState.DELETING, EndpointState.DELETED)
    assert not endpoint.replicas.filter(state=ReplicaState.STARTING).exists()
    page = deleted.content.decode()
    assert "Deleting: its replicas are being stopped." in page and 'value="delete"' not in page


def test_the_cost_so_far_sums_the_replicas_billed_usage(tenant, model):
    endpoint = endpoint_create(
        tenant=tenant, name="embed", model=model, region="eu-central", min_replicas=2, max_replicas=2
    )
    now = timezone.now()
    replicas = list(endpoint.replicas.select_related("reservation"))
    for replica, hours in zip(replicas, [1, 2], strict=True):  # active 1 h and 2 h, 1 GPU at $1.00/GPU-h
        activate(replica.reservation, since=now - timedelta(hours=hours))
    usage_rate(now=now, reservation_ids=[r.reservation_id for r in replicas])
    billed = [reservation_billed(reservation=r.reservation) for r in replicas]
    assert sorted(billed) == [Decimal("1.00"), Decimal("2.00")]
    page = browser_for(tenant).get(f"/endpoints/{endpoint.id}/").content.decode()
    assert "data-endpoint-cost>$3.00<" in page


def test_viewers_see_everything_but_the_write_buttons(model):
    viewer = make_tenant(role=Role.VIEWER)
    owner = Membership.objects.get(organization=viewer.organization, role=Role.OWNER).user
    endpoint = endpoint_create(
        tenant=TenantContext(organization=viewer.organization, user=owner, role=Role.OWNER),
        name="embed",
        model=model,
        region="eu-central",
    )
    browser = browser_for(viewer)
    page = browser.get(f"/endpoints/{endpoint.id}/").content.decode()
    replica = endpoint.replicas.get()
    assert f'data-replica="{replica.id}"' in page and 'id="snippet-python"' in page
    assert 'value="delete"' not in page and 'value="scale"' not in page and "Viewers cannot change endpoints." in page
    assert "Deploy an endpoint" not in browser.get("/endpoints/").content.decode()
    for action in (
        {"action": "delete"},
        {"action": "scale", "min_replicas": "2", "max_replicas": "2", "target_concurrency": "8"},
    ):
        refused = browser.post(f"/endpoints/{endpoint.id}/", action)
        assert refused.status_code == 403
    endpoint.refresh_from_db()
    assert endpoint.state == EndpointState.DEPLOYING and endpoint.min_replicas == 1
    page = browser.get("/endpoints/new/").content.decode()
    refused = browser.post("/endpoints/new/", deploy_form(page, name="mine"))
    assert refused.status_code == 403 and Endpoint.objects.count() == 1


def test_another_tenants_endpoint_is_404(tenant, other_tenant, model):
    theirs = endpoint_create(tenant=other_tenant, name="theirs", model=model, region="eu-central")
    browser = browser_for(tenant)
    assert browser.get(f"/endpoints/{theirs.id}/").status_code == 404
    assert browser.post(f"/endpoints/{theirs.id}/", {"action": "delete"}).status_code == 404
    theirs.refresh_from_db()
    assert theirs.state == EndpointState.DEPLOYING


def test_the_page_shows_the_requests_and_latency_so_far(tenant, model):
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central")
    minute = timezone.now().replace(second=0, microsecond=0)
    EndpointTraffic.objects.create(
        endpoint=endpoint,
        replica=endpoint.replicas.first(),
        minute=minute,
        outcome=TrafficOutcome.OK,
        requests=10,
        input_tokens=120,
        latency_ms_sum=80.0,
        latency_buckets=[0, 10] + [0] * (len(LATENCY_BUCKETS_MS) - 1),
    )
    page = browser_for(tenant).get(f"/endpoints/{endpoint.id}/").content.decode()
    assert "data-endpoint-requests>10<" in page and "120 input tokens" in page
    assert re.search(r"data-endpoint-latency>\d+\.\d ms p50<", page)


def test_the_page_has_the_last_hours_charts_fed_by_the_metrics_api(tenant, model):
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region="eu-central")
    page = browser_for(tenant).get(f"/endpoints/{endpoint.id}/").content.decode()
    assert f'data-endpoint-metrics="{endpoint.id}"' in page
    assert f'data-metrics-url="/api/v1/endpoints/{endpoint.id}/metrics/?minutes=60"' in page
    for chart in ("requests", "latency", "in_flight", "replicas", "gpus"):
        assert f'data-chart="{chart}"' in page
    assert "data-cold-starts" in page and "data-scale-events" in page
    assert "vendor/uplot/uPlot.iife.min.js" in page and "js/endpoint.js" in page
