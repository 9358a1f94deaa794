"""Placement near users (issue 14): an endpoint's replicas go to the site nearest its users' region by
the round trips the operator records (provisioning.RegionSiteLatency), edge sites first among the
near-equal, spilling to the next site when one is full. The round trips are real measurements
(console/demo_data/city-rtt-ms.csv), taken through the demo's rule for a pair of cities."""

from decimal import Decimal

import pytest

from console.demo import city_rtt_ms, measured_rtts
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.lifecycle import endpoint_create, endpoint_scale
from marketplace.services.endpoints.replicas import NEAR_MS, NoCapacityForReplica, candidate_offers
from provisioning.choices import SiteKind
from provisioning.services.fleet import region_latency_delete, region_latency_set
from tests.factories import AcceleratorTypeFactory, RackFactory, SiteFactory, make_minilm, make_node, make_tenant

pytestmark = pytest.mark.django_db

MEASURED = measured_rtts()


def rtt(users: str, site: str) -> Decimal:
    return city_rtt_ms(users, site, MEASURED)[0]


@pytest.fixture
def world():
    """Users in New York (us-east) and Paris (eu-west); sites in Dallas (a hall), Fremont (edge), Paris
    (edge, a little cheaper) and a us-east hall whose round trips no one measured; one 8-GPU node and a
    1-GPU slice offer at each. The round trips from each region's city to each measured site's."""
    accelerator = AcceleratorTypeFactory()
    plan = {  # key: (region, kind, city, price)
        "dallas": ("us-central", SiteKind.HALL, "Dallas", "1.00"),
        "fremont": ("us-west", SiteKind.EDGE, "Fremont", "1.10"),
        "paris": ("eu-west", SiteKind.EDGE, "Paris", "1.05"),
        "unmeasured": ("us-east", SiteKind.HALL, None, "0.50"),
    }
    sites, nodes = {}, {}
    for key, (region, kind, _city, price) in plan.items():
        sites[key] = SiteFactory(region=region, kind=kind, name=key.capitalize())
        nodes[key] = make_node(rack=RackFactory(site=sites[key]), accelerator=accelerator)
        offer_create(
            site=sites[key], accelerator_type=accelerator, price_per_gpu_hour=Decimal(price), gpus_per_instance=1
        )
    for region, users in (("us-east", "New York"), ("eu-west", "Paris")):
        for key, (_region, _kind, city, _price) in plan.items():
            if city is not None:
                region_latency_set(region=region, site=sites[key], rtt_ms=rtt(users, city))
    model = make_minilm(accelerator_types=[accelerator])
    return {"sites": sites, "nodes": nodes, "model": model, "tenant": make_tenant()}


def deploy(world, region: str, **fields):
    return endpoint_create(
        tenant=world["tenant"], name=fields.pop("name", "embed"), model=world["model"], region=region, **fields
    )


def order(endpoint) -> list[str]:
    return [offer.site.name.lower() for offer in candidate_offers(endpoint)]


def test_the_measured_pairs_are_what_the_demo_uses():
    assert rtt("New York", "Dallas") == Decimal("39.46")
    assert (rtt("New York", "Fremont"), rtt("New York", "Paris")) == (Decimal("77.49"), Decimal("78.33"))
    assert rtt("Paris", "Zurich") == Decimal("108.06")
    assert rtt("Zurich", "Dallas") == Decimal("127.74")  # Zurich was measured only as a destination: Dallas → Zurich
    assert rtt("Paris", "Paris") == Decimal("11.17")  # one city: the smallest measured (Milan → Zurich)


def test_users_region_goes_to_the_nearest_site_by_round_trip_not_by_region_name_or_kind(world):
    endpoint = deploy(world, "us-east")
    # Dallas (39 ms) though it is a hall in another region; Fremont (77 ms) and Paris (78 ms) are as near
    # as each other (one 5-ms bucket): both edge, the cheaper first; the us-east hall, unmeasured, last.
    assert order(endpoint) == ["dallas", "paris", "fremont", "unmeasured"]
    assert endpoint.replicas.get().reservation.offer.site == world["sites"]["dallas"]
    assert int(rtt("New York", "Fremont") // NEAR_MS) == int(rtt("New York", "Paris") // NEAR_MS)


def test_edge_first_takes_edge_sites_by_round_trip_then_halls_by_round_trip(world):
    endpoint = deploy(world, "us-east", placement="edge_first")
    assert order(endpoint) == ["paris", "fremont", "dallas", "unmeasured"]
    paris = deploy(world, "eu-west", name="paris-users", placement="edge_first")
    assert order(paris) == ["paris", "fremont", "dallas", "unmeasured"]  # 11 ms, then 176 ms; Dallas 132 ms


def test_a_site_without_a_round_trip_comes_after_measured_ones_and_in_region_before_the_rest(world):
    region_latency_delete(latency=world["sites"]["dallas"].latencies.get(region="us-east"))
    endpoint = deploy(world, "us-east")
    assert order(endpoint) == ["paris", "fremont", "unmeasured", "dallas"]


def test_a_full_edge_site_spills_to_the_next_nearest(world):
    endpoint = deploy(world, "eu-west", min_replicas=8, max_replicas=12)
    sites = [r.reservation.offer.site.name.lower() for r in endpoint.replicas.order_by("created_at")]
    assert sites == ["paris"] * 8  # the Paris edge's eight GPUs
    endpoint_scale(tenant=world["tenant"], endpoint=endpoint, min_replicas=10)
    spilled = [r.reservation.offer.site.name.lower() for r in endpoint.replicas.order_by("created_at")][8:]
    # Paris users: Dallas 131.79 ms before Fremont 175.19 ms (both further than the full Paris edge)
    assert spilled == ["dallas", "dallas"]
    assert order(endpoint)[:3] == ["paris", "dallas", "fremont"]


def test_a_pinned_endpoint_orders_its_sites_by_round_trip_and_refuses_when_they_are_full(world):
    pinned = [world["sites"]["fremont"], world["sites"]["paris"]]
    endpoint = deploy(world, "eu-west", placement="pinned", pinned_sites=pinned, min_replicas=8, max_replicas=16)
    assert order(endpoint) == ["paris", "fremont"]
    endpoint_scale(tenant=world["tenant"], endpoint=endpoint, min_replicas=16)
    assert [r.reservation.offer.site.name for r in endpoint.replicas.order_by("created_at")] == (
        ["Paris"] * 8 + ["Fremont"] * 8
    )
    with pytest.raises(NoCapacityForReplica, match=r"\(Paris, Fremont\)"):
        deploy(world, "eu-west", name="second", placement="pinned", pinned_sites=pinned)
