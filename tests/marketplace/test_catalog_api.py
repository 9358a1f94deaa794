from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from marketplace.choices import OfferShape
from marketplace.services.reservations.lifecycle import reservation_create
from provisioning.choices import NodeState, Purpose, SiteKind, Vendor
from provisioning.models import Node
from provisioning.services.fleet import node_transition
from tests.factories import AcceleratorTypeFactory, OfferFactory, RackFactory, SiteFactory, make_node

pytestmark = pytest.mark.django_db


@pytest.fixture
def catalog(db):
    """Two sites (a hall and an edge), three accelerator types, offers at several prices."""
    h100 = AcceleratorTypeFactory()
    l40s = AcceleratorTypeFactory(
        slug="l40s-48gb",
        model="L40S",
        memory_gib=48,
        tdp_watts=350,
        interconnect="PCIe 4.0 x16",
        purpose=Purpose.INFERENCE,
    )
    mi300x = AcceleratorTypeFactory(
        slug="mi300x-192gb", vendor=Vendor.AMD, model="Instinct MI300X", memory_gib=192, purpose=Purpose.TRAINING
    )
    hall = SiteFactory(slug="fra", name="Frankfurt", region="eu-central", kind=SiteKind.HALL)
    edge = SiteFactory(slug="ams-edge", name="Amsterdam Edge", region="eu-west", kind=SiteKind.EDGE)
    hall_rack_1, hall_rack_2 = RackFactory(site=hall), RackFactory(site=hall)
    for state in [NodeState.AVAILABLE, NodeState.AVAILABLE]:
        make_node(rack=hall_rack_1, accelerator=h100, state=state)
    for state in [NodeState.AVAILABLE, NodeState.DRAINING]:
        make_node(rack=hall_rack_2, accelerator=h100, state=state)
    make_node(rack=RackFactory(site=hall), accelerator=mi300x)
    edge_rack = RackFactory(site=edge)
    make_node(rack=edge_rack, accelerator=l40s)
    make_node(rack=edge_rack, accelerator=l40s, state=NodeState.OFFLINE)
    return {
        "h100_node": OfferFactory(site=hall, accelerator_type=h100, price_per_gpu_hour=Decimal("2.49")),
        "h100_rack": OfferFactory(
            site=hall, accelerator_type=h100, shape=OfferShape.RACK, price_per_gpu_hour=Decimal("2.29")
        ),
        "mi300x": OfferFactory(site=hall, accelerator_type=mi300x, price_per_gpu_hour=Decimal("2.19")),
        "l40s": OfferFactory(site=edge, accelerator_type=l40s, price_per_gpu_hour=Decimal("0.99")),
        "hidden": OfferFactory(site=edge, accelerator_type=h100, price_per_gpu_hour=Decimal("1.00"), is_active=False),
    }


def ids(response) -> set[int]:
    assert response.status_code == 200, response.content
    return {offer["id"] for offer in response.json()["results"]}


def test_availability_is_derived_from_the_fleet(tenant, client_for, catalog):
    offers = {o["id"]: o for o in client_for(tenant).get("/api/v1/offers/").json()["results"]}
    assert offers[catalog["h100_node"].id]["availability"] == {
        "total_instances": 3,  # instances count only nodes that can take work: not the draining one
        "available_instances": 3,
        "total_nodes": 4,
        "available_nodes": 3,
        "total_racks": 2,
        "available_racks": 1,
    }
    assert offers[catalog["l40s"].id]["availability"]["available_nodes"] == 1
    assert offers[catalog["h100_node"].id]["price_per_instance_hour"] == "19.9200"
    assert catalog["hidden"].id not in offers


@pytest.mark.parametrize(
    "query,expected",
    [
        ("accelerator=l40s-48gb", {"l40s"}),
        ("vendor=amd", {"mi300x"}),
        ("purpose=inference", {"l40s", "h100_node", "h100_rack"}),  # H100 is for both
        ("site=fra", {"h100_node", "h100_rack", "mi300x"}),
        ("region=eu-west", {"l40s"}),
        ("site_kind=edge", {"l40s"}),
        ("shape=rack", {"h100_rack"}),
        ("min_price=2.20", {"h100_node", "h100_rack"}),
        ("max_price=2.20", {"mi300x", "l40s"}),
        ("min_price=1&max_price=2.3", {"h100_rack", "mi300x"}),
        ("site_kind=hall&max_price=2.3&accelerator=h100-sxm-80gb", {"h100_rack"}),
        ("available=true", {"h100_node", "h100_rack", "mi300x", "l40s"}),
        ("accelerator=nothing-like-this", set()),
    ],
)
def test_offer_filters(tenant, client_for, catalog, query, expected):
    assert ids(client_for(tenant).get(f"/api/v1/offers/?{query}")) == {catalog[name].id for name in expected}


@pytest.fixture
def h100_slices(catalog):
    """1- and 2-GPU instances of the Frankfurt H100 nodes, sharing them with the whole-node and rack offers."""
    node = catalog["h100_node"]
    for size in (1, 2):
        catalog[f"h100_{size}"] = OfferFactory(
            site=node.site, accelerator_type=node.accelerator_type, gpus_per_instance=size, price_per_gpu_hour="2.49"
        )
    return catalog


def reserve(tenant, offer, quantity=1):
    return reservation_create(
        tenant=tenant, offer=offer, quantity=quantity, start=None, end=timezone.now() + timedelta(hours=1)
    )


def test_offers_say_what_an_instance_is_and_count_instances(tenant, client_for, h100_slices):
    catalog = h100_slices
    reserve(tenant, catalog["h100_1"])  # one GPU of one node, now
    offers = {o["id"]: o for o in client_for(tenant).get("/api/v1/offers/").json()["results"]}
    one, two, node, rack = (offers[catalog[k].id] for k in ("h100_1", "h100_2", "h100_node", "h100_rack"))
    assert (one["kind"], one["gpus_per_instance"], one["gpus_per_node"]) == ("slice", 1, 8)
    assert (two["kind"], two["gpus_per_instance"]) == ("slice", 2)
    assert (node["kind"], node["gpus_per_instance"]) == ("node", 8)
    assert (rack["kind"], rack["gpus_per_instance"]) == ("rack", 8)
    assert one["name"] == "1× H100 SXM instance · Frankfurt"
    assert (one["price_per_gpu_hour"], one["price_per_instance_hour"]) == ("2.4900", "2.4900")
    assert two["price_per_instance_hour"] == "4.9800"
    # Three nodes can take work: 24 GPUs; one of them is held.
    assert (one["availability"]["total_instances"], one["availability"]["available_instances"]) == (24, 23)
    assert (two["availability"]["total_instances"], two["availability"]["available_instances"]) == (12, 11)
    assert (node["availability"]["total_instances"], node["availability"]["available_instances"]) == (3, 2)
    assert node["availability"]["available_nodes"] == 2  # that node is partly rented: not whole


@pytest.mark.parametrize(
    "query,expected",
    [
        ("gpus_per_instance=1", {"h100_1"}),
        ("gpus_per_instance=2&site=fra", {"h100_2"}),
        ("gpus_per_instance=8&accelerator=h100-sxm-80gb", {"h100_node", "h100_rack"}),
        ("min_gpus=2&accelerator=h100-sxm-80gb", {"h100_2", "h100_node", "h100_rack"}),
        ("min_gpus=4", {"h100_node", "h100_rack", "mi300x", "l40s"}),
        ("kind=slice", {"h100_1", "h100_2"}),
        ("kind=node", {"h100_node", "mi300x", "l40s"}),
        ("kind=rack", {"h100_rack"}),
        ("kind=slice&max_price=2", set()),
    ],
)
def test_instance_filters(tenant, client_for, h100_slices, query, expected):
    assert ids(client_for(tenant).get(f"/api/v1/offers/?{query}")) == {h100_slices[name].id for name in expected}


@pytest.mark.parametrize(
    "query,field",
    [("gpus_per_instance=1.5", "gpus_per_instance"), ("min_gpus=0", "min_gpus"), ("kind=half", "kind")],
)
def test_bad_instance_filters_are_400_with_the_field(tenant, client_for, h100_slices, query, field):
    response = client_for(tenant).get(f"/api/v1/offers/?{query}")
    assert response.status_code == 400 and field in response.json()["error"]["fields"]


def test_available_counts_a_slice_free_on_a_partly_rented_node(tenant, client_for, h100_slices):
    catalog = h100_slices
    reserve(tenant, catalog["h100_node"], quantity=2)
    reserve(tenant, catalog["h100_1"])  # one GPU of the last free H100 node
    available = ids(client_for(tenant).get("/api/v1/offers/?available=true&accelerator=h100-sxm-80gb"))
    assert available == {catalog["h100_1"].id, catalog["h100_2"].id}  # no whole node, no whole rack is free


def test_available_filter_drops_offers_with_nothing_free(tenant, client_for, catalog):
    for node in Node.objects.filter(accelerator_type__slug="mi300x-192gb"):
        node_transition(node=node, target=NodeState.DRAINING)
    assert catalog["mi300x"].id not in ids(client_for(tenant).get("/api/v1/offers/?available=true"))


def test_ordering_and_pagination(tenant, client_for, catalog):
    client = client_for(tenant)
    prices = [o["price_per_gpu_hour"] for o in client.get("/api/v1/offers/?ordering=-price").json()["results"]]
    assert prices == sorted(prices, key=Decimal, reverse=True)
    page = client.get("/api/v1/offers/?page_size=2").json()
    assert page["count"] == 4 and len(page["results"]) == 2 and page["next"]
    assert len(client.get(page["next"]).json()["results"]) == 2


@pytest.mark.parametrize(
    "query,field",
    [
        ("min_price=cheap", "min_price"),
        ("site_kind=moon", "site_kind"),
        ("shape=cube", "shape"),
        ("vendor=acme", "vendor"),
        ("ordering=hack", "ordering"),
    ],
)
def test_bad_filters_are_400_with_the_field(tenant, client_for, catalog, query, field):
    response = client_for(tenant).get(f"/api/v1/offers/?{query}")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_offer_detail_and_unknown_offer(tenant, client_for, catalog):
    client = client_for(tenant)
    offer = catalog["l40s"]
    body = client.get(f"/api/v1/offers/{offer.id}/").json()
    assert body["site"]["kind"] == "edge" and body["accelerator_type"]["purpose"] == "inference"
    assert client.get("/api/v1/offers/999999/").status_code == 404
    assert client.get(f"/api/v1/offers/{catalog['hidden'].id}/").status_code == 404


def test_sites_and_accelerator_types(tenant, client_for, catalog):
    client = client_for(tenant)
    sites = {s["slug"]: s for s in client.get("/api/v1/sites/").json()["results"]}
    assert sites["fra"]["node_count"] == 5 and sites["fra"]["available_node_count"] == 4
    assert {s["slug"] for s in client.get("/api/v1/sites/?kind=edge").json()["results"]} == {"ams-edge"}
    types = {t["slug"] for t in client.get("/api/v1/accelerator-types/?vendor=amd").json()["results"]}
    assert types == {"mi300x-192gb"}
    assert client.get("/api/v1/sites/fra/").json()["name"] == "Frankfurt"
    assert client.get("/api/v1/sites/nowhere/").status_code == 404


def test_the_catalog_needs_a_key(catalog, api_client):
    response = api_client.get("/api/v1/offers/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
