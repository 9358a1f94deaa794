"""Power is a budget (ARCHITECTURE invariant 8, issue 14): a rack never has more GPUs committed at once
than its power budget covers at their rated power (the TDP of their type), for reservations and
endpoints' replicas alike, and a refusal for power says so."""

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.utils import timezone

from marketplace.choices import OfferShape
from marketplace.selectors.capacity import rack_power
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.lifecycle import endpoint_create
from marketplace.services.endpoints.replicas import NoCapacityForReplica
from marketplace.services.reservations.lifecycle import (
    reservation_cancel,
    reservation_check,
    reservation_create,
    reservation_extend,
)
from marketplace.services.reservations.placement import CapacityUnavailable, PowerBudgetExceeded
from provisioning.choices import SiteKind
from tests.conftest import key_client
from tests.factories import AcceleratorTypeFactory, RackFactory, SiteFactory, make_minilm, make_node, make_tenant

pytestmark = pytest.mark.django_db

H100_W = 700  # the factory's H100 SXM TDP


@pytest.fixture
def small_rack():
    """An edge site's rack of two 8-GPU H100 nodes (16 GPUs: 11.2 kW running at TDP) on a 10 kW budget,
    and offers of its 1-, 2- and 4-GPU slices, whole nodes and the whole rack."""
    accelerator = AcceleratorTypeFactory()
    site = SiteFactory(kind=SiteKind.EDGE, slug="edge-1")
    rack = RackFactory(site=site, name="e01", power_budget_kw=Decimal("10"))
    nodes = [make_node(rack=rack, accelerator=accelerator) for _ in range(2)]
    offers = {
        size: offer_create(
            site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=size
        )
        for size in (1, 2, 4)
    }
    offers["node"] = offer_create(site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("1.00"))
    offers["rack"] = offer_create(
        site=site, accelerator_type=accelerator, shape=OfferShape.RACK, price_per_gpu_hour=Decimal("1.00")
    )
    return {"rack": rack, "nodes": nodes, "offers": offers, "tenant": make_tenant()}


def reserve(world, offer, *, hours: float = 2, start=None, quantity: int = 1):
    return reservation_create(
        tenant=world["tenant"],
        offer=world["offers"][offer],
        quantity=quantity,
        start=start,
        end=None,
        duration_hours=Decimal(str(hours)),
    )


def committed_w(rack, start, end) -> int:
    return rack_power(racks=[rack.pk], start=start, end=end)[rack.pk].committed_w


def gpus_held(world) -> int:
    return sum(len(a.gpu_indices) for node in world["nodes"] for a in node.allocations.filter(live=True))


def test_a_rack_at_its_power_budget_refuses_a_slice_though_gpus_are_free_and_says_why(small_rack):
    for offer in ("node", 4, 2):  # 8 + 4 + 2 = 14 GPUs: 9.8 kW of the 10
        reserve(small_rack, offer)
    assert gpus_held(small_rack) == 14  # two of the 16 GPUs are free
    with pytest.raises(PowerBudgetExceeded) as refused:
        reserve(small_rack, 1)
    expected = (
        "Rack edge-1/e01 is at its power budget for that window: 9.8 of 10 kW committed; 1 more H100 SXM GPU "
        "(700 W) would exceed it."
    )
    assert refused.value.message == expected
    assert refused.value.status_code == 409 and refused.value.code == "capacity_unavailable"
    assert refused.value.details["reason"] == "power_budget" and refused.value.details["rack"] == "edge-1/e01"
    assert gpus_held(small_rack) == 14  # nothing was written
    # The price step says the same before anything is reserved.
    with pytest.raises(PowerBudgetExceeded, match="9.8 of 10 kW committed"):
        reservation_check(
            tenant=small_rack["tenant"],
            offer=small_rack["offers"][1],
            quantity=1,
            start=None,
            end=None,
            duration_hours=1,
        )


def test_the_api_answers_a_power_refusal_with_409_and_its_reason(small_rack):
    for offer in ("node", 4, 2):
        reserve(small_rack, offer)
    response = key_client(small_rack["tenant"]).post(
        "/api/v1/reservations/",
        {"offer": small_rack["offers"][1].pk, "quantity": 1, "duration_hours": 1},
        format="json",
    )
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "capacity_unavailable" and error["reason"] == "power_budget"
    assert error["message"].startswith("Rack edge-1/e01 is at its power budget for that window: 9.8 of 10 kW")
    assert (error["rack"], error["committed_kw"], error["budget_kw"]) == ("edge-1/e01", 9.8, 10.0)


def test_a_rack_at_its_power_budget_refuses_a_whole_node(small_rack):
    reserve(small_rack, "node")  # 5.6 kW; the other node is free, but 5.6 more would make 11.2
    with pytest.raises(PowerBudgetExceeded) as refused:
        reserve(small_rack, "node")
    assert refused.value.message == (
        "Only 0 of the 1 nodes you asked for can run within their racks' power budgets for that window (1 is "
        "free). Rack edge-1/e01 is at its power budget for that window: 5.6 of 10 kW committed; 8 more H100 SXM "
        "GPUs (700 W each) would exceed it."
    )
    assert refused.value.details["available_nodes"] == 0
    reserve(small_rack, 4)  # half a node still fits: 8.4 kW
    assert gpus_held(small_rack) == 12


def test_a_rack_whose_budget_does_not_cover_all_its_gpus_is_not_rented_whole(small_rack):
    with pytest.raises(PowerBudgetExceeded) as refused:
        reserve(small_rack, "rack")
    assert refused.value.message == (
        "Rack edge-1/e01 is free, but its power budget (10 kW) covers only 14 of its 16 H100 SXM GPUs running "
        "(700 W each): it cannot be rented whole."
    )
    assert gpus_held(small_rack) == 0


def test_a_rack_reservation_is_made_where_the_budget_covers_the_rack(small_rack):
    rack = small_rack["rack"]
    type(rack).objects.filter(pk=rack.pk).update(power_budget_kw=Decimal("11.2"))  # exactly 16 × 700 W
    reservation = reserve(small_rack, "rack")
    assert reservation.gpu_count == 16
    with pytest.raises(CapacityUnavailable):
        reserve(small_rack, 1)


def test_power_is_freed_when_a_reservation_ends(small_rack):
    whole = reserve(small_rack, "node")
    reserve(small_rack, 4)
    reserve(small_rack, 2)
    with pytest.raises(PowerBudgetExceeded):
        reserve(small_rack, 1)
    reservation_cancel(tenant=small_rack["tenant"], reservation=whole)  # pending: cancelled, its GPUs freed
    assert reserve(small_rack, "node").gpu_count == 8  # 5.6 + 2.8 + 1.4 = 9.8 kW again


def test_what_counts_is_the_most_committed_at_once_not_every_booking_in_the_window(small_rack):
    """Two whole-node bookings one after the other (5.6 kW each, never together) and a 4-GPU slice over
    both: at most 8.4 kW at once, within 10 -- a sum of the window's bookings (14 kW) would refuse it."""
    t0 = timezone.now() + timedelta(hours=1)
    reserve(small_rack, "node", start=t0, hours=2)
    reserve(small_rack, "node", start=t0 + timedelta(hours=2), hours=2)
    slice_ = reserve(small_rack, 4, start=t0, hours=4)
    rack = small_rack["rack"]
    assert committed_w(rack, t0, t0 + timedelta(hours=4)) == 8 * H100_W + 4 * H100_W
    assert slice_.allocations.get().node_id in {n.pk for n in small_rack["nodes"]}
    # Another 4-GPU slice over the first booking would make 11.2 kW then: refused. After both, room.
    with pytest.raises(PowerBudgetExceeded, match="8.4 of 10 kW"):
        reserve(small_rack, 4, start=t0, hours=1)
    reserve(small_rack, 4, start=t0 + timedelta(hours=4), hours=1)


def test_an_extension_into_a_rack_at_its_power_budget_is_refused(small_rack):
    """A whole node until t0 + 2 h; slices on the other node: 4.2 kW over both hours and, from t0 + 2 h,
    0.7 kW more. Extending the node by an hour would add its 5.6 kW to those 4.9: refused for power."""
    t0 = timezone.now() + timedelta(hours=1)
    whole = reserve(small_rack, "node", start=t0, hours=2)
    for size in (4, 2):
        reserve(small_rack, size, start=t0, hours=4)  # the other node: the first is held whole until t0 + 2 h
    later = reserve(small_rack, 1, start=t0 + timedelta(hours=2), hours=2)  # the fullest node with room: the other
    with pytest.raises(PowerBudgetExceeded) as refused:
        reservation_extend(tenant=small_rack["tenant"], reservation=whole, duration_hours=1)
    assert refused.value.message == (
        f"Rack edge-1/e01 is at its power budget between {(t0 + timedelta(hours=2)).isoformat()} and "
        f"{(t0 + timedelta(hours=3)).isoformat()}: 4.9 of 10 kW committed; 8 more H100 SXM GPUs (700 W each) "
        "would exceed it."
    )
    whole.refresh_from_db()
    assert whole.end == t0 + timedelta(hours=2)  # unchanged
    reservation_cancel(tenant=small_rack["tenant"], reservation=later)  # 4.2 + 5.6 = 9.8 kW: room again
    reservation_extend(tenant=small_rack["tenant"], reservation=whole, duration_hours=1)
    whole.refresh_from_db()
    assert whole.end == t0 + timedelta(hours=3)


def test_an_endpoint_replica_spills_from_an_edge_rack_at_its_budget_and_says_why_when_nothing_is_left(small_rack):
    hall = SiteFactory(region=small_rack["rack"].site.region, kind=SiteKind.HALL, name="Hall Two")
    hall_node = make_node(
        rack=RackFactory(site=hall, power_budget_kw=Decimal("1.4")), accelerator=small_rack["nodes"][0].accelerator_type
    )
    offer_create(
        site=hall, accelerator_type=hall_node.accelerator_type, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=1
    )
    for offer in ("node", 4, 2):  # the edge rack: 9.8 of 10 kW
        reserve(small_rack, offer)
    model = make_minilm(accelerator_types=[hall_node.accelerator_type])
    endpoint = endpoint_create(
        tenant=small_rack["tenant"], name="embed", model=model, region=hall.region, min_replicas=2, max_replicas=3
    )
    # The edge site comes first (same region, edge) but its rack has no power left: both replicas are in the hall.
    assert {r.reservation.allocations.get().node_id for r in endpoint.replicas.all()} == {hall_node.pk}
    with pytest.raises(NoCapacityForReplica) as refused:  # the hall's rack: 1.4 kW, two GPUs, both held
        endpoint_create(tenant=small_rack["tenant"], name="embed-2", model=model, region=hall.region)
    message = refused.value.message
    assert f"({small_rack['rack'].site.name}, Hall Two)" in message
    assert f"{small_rack['rack'].site.name}: Rack edge-1/e01 is at its power budget for that window: 9.8 of 10 kW" in (
        message
    )
    assert refused.value.details["power_budget_sites"] == [small_rack["rack"].site.name, "Hall Two"]


@pytest.mark.django_db(transaction=True)
def test_racers_on_two_nodes_of_one_rack_never_take_it_past_its_budget():
    """Sixteen racers on an H100 node and an L40S node of one rack, each for a 1-GPU slice, with 3.5 kW
    of budget: they place on different nodes, so only the rack's lock keeps each from seeing room for
    itself alone. However they interleave, what is committed stays within the budget and the rack ends
    full (no slice of either fits), and every loser was refused for power."""
    site = SiteFactory(kind=SiteKind.EDGE, slug="race-edge")
    rack = RackFactory(site=site, name="e01", power_budget_kw=Decimal("3.5"))
    h100 = AcceleratorTypeFactory()
    l40s = AcceleratorTypeFactory(slug="l40s-48gb", model="L40S", memory_gib=48, tdp_watts=350)
    for accelerator in (h100, l40s):
        make_node(rack=rack, accelerator=accelerator)
    offers = [
        offer_create(site=site, accelerator_type=a, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=1)
        for a in (h100, l40s)
    ]
    tenants = [make_tenant() for _ in range(16)]
    start = timezone.now() + timedelta(hours=1)
    barrier = threading.Barrier(len(tenants))
    results: list = [None] * len(tenants)

    def racer(index):
        try:
            barrier.wait()
            results[index] = reservation_create(
                tenant=tenants[index], offer=offers[index % 2], quantity=1, start=start, end=start + timedelta(hours=1)
            )
        except BaseException as error:  # noqa: BLE001 - a refusal is a result; anything else fails below
            results[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(len(tenants))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, CapacityUnavailable) for e in errors), errors
    assert all(e.details.get("reason") == "power_budget" for e in errors), [e.message for e in errors]
    made = [r for r in results if not isinstance(r, BaseException)]
    watts = sum(H100_W if r.offer_id == offers[0].pk else 350 for r in made)
    assert watts == committed_w(rack, start, start + timedelta(hours=1))
    assert 3500 - 350 < watts <= 3500  # within the budget, and not even one more L40S fits


def _waiting_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


@pytest.mark.django_db(transaction=True)
def test_a_placement_on_another_node_of_the_rack_waits_for_one_not_yet_committed():
    """Two racers at the budget's edge, on two nodes of one rack: 1 kW of budget, room for the H100
    slice (700 W) or the L40S one (350 W), not both. The first places and holds its transaction open;
    the second must wait for the rack, and once the first commits it is refused for power. (Without the
    rack's lock it would see room for itself, and both would commit: 1,050 W.)"""
    site = SiteFactory(kind=SiteKind.EDGE, slug="edge-race")
    rack = RackFactory(site=site, name="e01", power_budget_kw=Decimal("1"))
    h100 = AcceleratorTypeFactory()
    l40s = AcceleratorTypeFactory(slug="l40s-48gb", model="L40S", memory_gib=48, tdp_watts=350)
    for accelerator in (h100, l40s):
        make_node(rack=rack, accelerator=accelerator)
    first_offer, second_offer = (
        offer_create(site=site, accelerator_type=a, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=1)
        for a in (h100, l40s)
    )
    first_tenant, second_tenant = make_tenant(), make_tenant()
    start = timezone.now() + timedelta(hours=1)
    window = {"quantity": 1, "start": start, "end": start + timedelta(hours=1)}
    placed, release = threading.Event(), threading.Event()
    results: dict = {}

    def first():
        try:
            with transaction.atomic():
                results["first"] = reservation_create(tenant=first_tenant, offer=first_offer, **window)
                placed.set()
                release.wait(60)
        finally:
            placed.set()
            connection.close()

    def second():
        try:
            results["second"] = reservation_create(tenant=second_tenant, offer=second_offer, **window)
        except CapacityUnavailable as refusal:
            results["second"] = refusal
        finally:
            connection.close()

    one, two = threading.Thread(target=first), threading.Thread(target=second)
    one.start()
    assert placed.wait(60) and "first" in results
    two.start()
    try:
        for _ in range(600):  # until the second waits on a lock, or (wrongly) has finished
            if not two.is_alive() or _waiting_on_a_lock():
                break
            two.join(0.05)
        assert two.is_alive(), f"the second placement did not wait for the first: {results.get('second')}"
    finally:
        release.set()
        one.join(60)
        two.join(60)
    refusal = results["second"]
    assert isinstance(refusal, PowerBudgetExceeded), refusal
    assert refusal.message == (
        "Rack edge-race/e01 is at its power budget for that window: 0.7 of 1 kW committed; 1 more L40S GPU "
        "(350 W) would exceed it."
    )
    assert committed_w(rack, start, start + timedelta(hours=1)) == 700
