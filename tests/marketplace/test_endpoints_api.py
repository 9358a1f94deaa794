"""/api/v1/endpoints/ and /api/v1/models/ (issue 13): an organization's inference endpoints made, read,
rescaled and deleted over the API, each refusal in the one error shape."""

from decimal import Decimal

import pytest
import redis
from django.conf import settings

from marketplace.choices import ReplicaState, Role
from marketplace.models import Endpoint, EndpointState, Reservation
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.endpoints.traffic import TRAFFIC_KEY, TrafficCounter, traffic_collect
from provisioning.choices import SiteKind
from tests.conftest import key_client
from tests.factories import AcceleratorTypeFactory, RackFactory, SiteFactory, make_minilm, make_node, make_tenant

pytestmark = pytest.mark.django_db

URL = "/api/v1/endpoints/"


@pytest.fixture
def world():
    """An edge site and a hall in eu-central and an edge site in us-east, one 8-GPU node and a 1-GPU
    slice offer each; a served embedding model on their accelerator type; a member with a key."""
    accelerator = AcceleratorTypeFactory()
    sites = {
        "edge": SiteFactory(region="eu-central", kind=SiteKind.EDGE),
        "hall": SiteFactory(region="eu-central", kind=SiteKind.HALL),
        "far": SiteFactory(region="us-east", kind=SiteKind.EDGE),
    }
    for site in sites.values():
        make_node(rack=RackFactory(site=site), accelerator=accelerator)
        offer_create(site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=1)
    model = make_minilm(accelerator_types=[accelerator])
    tenant = make_tenant(role=Role.MEMBER)
    return {"sites": sites, "model": model, "accelerator": accelerator, "tenant": tenant, "api": key_client(tenant)}


def deploy(api, **fields):
    body = {"name": "embed", "model": "all-minilm-l6-v2", "region": "eu-central", **fields}
    return api.post(URL, body, format="json")


def test_the_served_models_are_listed_with_what_a_replica_holds(world, api_client):
    served_model_create(
        slug="retired", name="Retired", server_program=["x"], weights="x", is_active=False, accelerator_types=[]
    )
    response = world["api"].get("/api/v1/models/")
    assert response.status_code == 200
    assert response.json()["results"] == [
        {
            "slug": "all-minilm-l6-v2",
            "name": "all-MiniLM-L6-v2",
            "task": "embeddings",
            "description": "",
            "dimensions": 384,
            "gpus_per_replica": 1,
            "accelerator_types": [world["accelerator"].slug],
        }
    ]


def test_an_endpoint_is_created_deploying_with_its_replicas_on_slices(world):
    response = deploy(world["api"], min_replicas=2, max_replicas=3)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["state"] == EndpointState.DEPLOYING and body["name"] == "embed"
    assert body["model"] == {"slug": "all-minilm-l6-v2", "name": "all-MiniLM-L6-v2"}
    assert body["base_url"].endswith("/v1") and body["openai"] == {"base_url": body["base_url"], "model": "embed"}
    assert (body["min_replicas"], body["max_replicas"], body["replica_count"]) == (2, 3, 2)
    replicas = body["replicas"]
    assert len(replicas) == 2 and {r["state"] for r in replicas} == {ReplicaState.STARTING}
    edge_node = world["sites"]["edge"].racks.get().nodes.get().hostname
    assert {r["node"] for r in replicas} == {edge_node}  # nearest first: the users' region, edge before hall
    assert sorted(r["gpus"][0] for r in replicas) == [0, 1] and all(len(r["gpus"]) == 1 for r in replicas)
    assert all(r["site"] == world["sites"]["edge"].slug and r["gpu_label"].startswith("GPU ") for r in replicas)
    assert "address" not in replicas[0]  # the gateway's to know, not the tenant's
    reservation = Reservation.objects.get(pk=replicas[0]["reservation"])
    assert reservation.organization == world["tenant"].organization


def test_endpoints_are_listed_and_read_by_their_organization_only(world):
    created = deploy(world["api"]).json()
    listed = world["api"].get(URL)
    assert listed.status_code == 200 and [e["id"] for e in listed.json()["results"]] == [created["id"]]
    detail = world["api"].get(f"{URL}{created['id']}/")
    assert detail.status_code == 200 and detail.json()["replicas"][0]["id"] == created["replicas"][0]["id"]
    stranger = key_client(make_tenant())
    assert stranger.get(URL).json()["results"] == []
    for call in (stranger.get, stranger.delete):
        missing = call(f"{URL}{created['id']}/")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert stranger.patch(f"{URL}{created['id']}/", {"max_replicas": 2}, format="json").status_code == 404
    assert world["api"].get(f"{URL}not-a-uuid/").status_code == 404


def test_a_viewer_reads_endpoints_but_cannot_deploy_one(world):
    viewer = make_tenant(role=Role.VIEWER)
    api = key_client(viewer)
    refused = deploy(api)
    assert refused.status_code == 403 and refused.json()["error"]["message"]
    assert not Endpoint.objects.exists() and not Reservation.objects.exists()
    assert api.get(URL).status_code == 200


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"region": "mars-1"}, "region"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"min_replicas": -1}, "min_replicas"),
        ({"min_replicas": 0, "max_replicas": 0}, "max_replicas"),
        ({"accelerator_types": ["no-such-type"]}, "accelerator_types"),
        ({"placement": "pinned"}, "pinned_sites"),
        ({"placement": "pinned", "pinned_sites": ["atlantis"]}, "pinned_sites"),
        ({"name": "Not A Slug!"}, "name"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_makes_nothing(world, fields, field):
    response = deploy(world["api"], **fields)
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["message"] and field in error["fields"], error
    assert not Endpoint.objects.exists() and not Reservation.objects.exists()


def test_pinned_sites_and_accelerator_types_are_named_by_slug(world):
    far = world["sites"]["far"]
    body = deploy(
        world["api"], placement="pinned", pinned_sites=[far.slug], accelerator_types=[world["accelerator"].slug]
    ).json()
    assert body["pinned_sites"] == [far.slug] and body["accelerator_types"] == [world["accelerator"].slug]
    assert body["replicas"][0]["site"] == far.slug


def test_scaling_bounds_change_over_patch(world):
    created = deploy(world["api"], max_replicas=4).json()
    url = f"{URL}{created['id']}/"
    raised = world["api"].patch(url, {"min_replicas": 3}, format="json")
    assert raised.status_code == 200, raised.json()
    assert raised.json()["min_replicas"] == 3 and raised.json()["replica_count"] == 3  # placed now
    lowered = world["api"].patch(url, {"min_replicas": 1, "max_replicas": 1, "target_concurrency": 4}, format="json")
    assert lowered.status_code == 200
    body = lowered.json()
    assert (body["max_replicas"], body["target_concurrency"], body["replica_count"]) == (1, 4, 1)
    states = sorted(r["state"] for r in body["replicas"])
    assert states == [ReplicaState.STARTING, ReplicaState.STOPPING, ReplicaState.STOPPING]  # the extras stop
    refused = world["api"].patch(url, {"min_replicas": 2}, format="json")  # above max_replicas 1
    assert refused.status_code == 400 and "min_replicas" in refused.json()["error"]["fields"]


def test_deleting_answers_202_deleting_and_hides_it_once_deleted(world):
    created = deploy(world["api"]).json()
    response = world["api"].delete(f"{URL}{created['id']}/")
    assert response.status_code == 202 and response.json()["state"] == EndpointState.DELETING
    assert response.json()["replica_count"] == 0
    assert world["api"].patch(f"{URL}{created['id']}/", {"max_replicas": 2}, format="json").status_code == 409
    Endpoint.objects.filter(pk=created["id"]).update(state=EndpointState.DELETED)
    assert world["api"].get(URL).json()["results"] == []
    shown = world["api"].get(URL, {"state": "deleted"}).json()["results"]
    assert [e["id"] for e in shown] == [created["id"]]
    assert world["api"].get(URL, {"state": "sideways"}).status_code == 400


def test_no_room_where_it_may_run_is_a_409_and_makes_nothing(world):
    far = world["sites"]["far"]
    response = deploy(world["api"], placement="pinned", pinned_sites=[far.slug], min_replicas=9, max_replicas=9)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "capacity_unavailable" and far.name in error["message"]
    assert not Endpoint.objects.exists() and not Reservation.objects.exists()


def test_a_create_repeated_with_its_idempotency_key_makes_one_endpoint(world):
    headers = {"HTTP_IDEMPOTENCY_KEY": "deploy-embed-1"}
    body = {"name": "embed", "model": "all-minilm-l6-v2", "region": "eu-central"}
    first = world["api"].post(URL, body, format="json", **headers)
    again = world["api"].post(URL, body, format="json", **headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert Endpoint.objects.count() == 1 and Reservation.objects.count() == 1
    other = world["api"].post(URL, {**body, "name": "other"}, format="json", **headers)
    assert other.status_code == 422


def test_a_bad_item_of_a_list_is_named_in_the_one_error_shape(world):
    response = deploy(world["api"], placement="pinned", pinned_sites=["ok", "not a slug!"])
    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {
        "pinned_sites": ['[1] Enter a valid "slug" consisting of letters, numbers, underscores or hyphens.']
    }


def test_the_detail_carries_what_the_gateways_counted_and_the_cost(world):
    """Counts go the way the gateway hands them over (a TrafficCounter batch through Redis, merged by the
    collector); a batch handed over twice counts once."""
    created = deploy(world["api"]).json()
    replica = created["replicas"][0]["id"]
    counter = TrafficCounter()
    for latency in (4.0, 8.0, 20.0, 40.0):
        counter.record(endpoint_id=created["id"], replica_id=replica, status=200, latency_ms=latency, input_tokens=7)
    counter.record(endpoint_id=created["id"], replica_id=replica, status=400, latency_ms=2.0)
    counter.record(endpoint_id=created["id"], replica_id=None, status=503, latency_ms=1.0)
    batch = counter.batch()
    redis_client = redis.Redis.from_url(settings.REDIS_URL)
    redis_client.delete(TRAFFIC_KEY)
    redis_client.rpush(TRAFFIC_KEY, batch, batch)  # the second: as if the list was not trimmed last time
    assert traffic_collect() == 6
    assert redis_client.llen(TRAFFIC_KEY) == 0
    traffic = world["api"].get(f"{URL}{created['id']}/").json()["traffic"]
    assert traffic | {"mean_ms": None, "p50_ms": None, "p99_ms": None} == {
        "requests": 6,
        "ok": 4,
        "client_errors": 1,
        "server_errors": 1,
        "input_tokens": 28,
        "mean_ms": None,
        "p50_ms": None,
        "p99_ms": None,
    }
    assert traffic["mean_ms"] == pytest.approx(75 / 6)
    assert 5 <= traffic["p50_ms"] <= 10 and 25 <= traffic["p99_ms"] <= 50
    assert world["api"].get(f"{URL}{created['id']}/").json()["cost"] == "0.00"
    assert "traffic" not in world["api"].get(URL).json()["results"][0]  # a list row stays cheap
