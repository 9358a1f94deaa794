"""Placement reads a pool's allocations through their offers (marketplace.selectors.capacity): each
allocation carries its reservation's offer, copied by the database, and a node whose allocations that
index cannot see (it moved to another site while holding them) is still never given out twice."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.models import Allocation
from marketplace.selectors.capacity import free_nodes_per_rack, free_racks, held_masks
from marketplace.services.catalog.offers import offer_create
from marketplace.services.reservations.lifecycle import reservation_create
from marketplace.services.reservations.placement import CapacityUnavailable
from provisioning.services.fleet import node_update
from tests.factories import AcceleratorTypeFactory, RackFactory, SiteFactory, make_node, make_tenant

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)


def _offer(site, accelerator, size=8, shape="node"):
    return offer_create(
        site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal(1), gpus_per_instance=size, shape=shape
    )


def test_an_allocation_carries_its_reservations_offer_whatever_its_writer_sends():
    site, accelerator = SiteFactory(), AcceleratorTypeFactory()
    rack = RackFactory(site=site)
    node, another = make_node(rack=rack, accelerator=accelerator), make_node(rack=rack, accelerator=accelerator)
    offer, other = _offer(site, accelerator), _offer(site, accelerator, size=2)
    start = timezone.now() + HOUR
    reservation = reservation_create(tenant=make_tenant(), offer=offer, quantity=1, start=start, end=start + HOUR)
    allocation = reservation.allocations.get()
    assert allocation.node_id == node.pk and Allocation.objects.filter(pk=allocation.pk, offer=offer).exists()
    with connection.cursor() as cursor:  # by hand, naming another offer: the reservation's is kept
        cursor.execute(
            "UPDATE marketplace_allocation SET offer_id = %s WHERE id = %s RETURNING offer_id",
            [other.pk, allocation.pk],
        )
        assert cursor.fetchone()[0] == offer.pk
        cursor.execute(
            "INSERT INTO marketplace_allocation (reservation_id, node_id, offer_id, gpus, period, live) "
            "VALUES (%s, %s, %s, int4range(0, 8), tstzrange(%s, %s), false) RETURNING offer_id",
            [reservation.pk, another.pk, other.pk, start, start + HOUR],
        )
        assert cursor.fetchone()[0] == offer.pk


def test_the_pool_is_every_offer_sharing_the_nodes():
    """A slice, a whole node and a rack, each booked through its own offer, all count against the others:
    the pool scan and asking every node agree."""
    site, accelerator = SiteFactory(), AcceleratorTypeFactory()
    racks = [RackFactory(site=site), RackFactory(site=site)]
    nodes = [make_node(rack=rack, accelerator=accelerator) for rack in racks for _ in range(2)]
    offers = {size: _offer(site, accelerator, size) for size in (1, 8)} | {"rack": _offer(site, accelerator, 8, "rack")}
    tenant = make_tenant(credit="100000")
    start = timezone.now() + HOUR
    window = {"start": start, "end": start + 2 * HOUR}
    reservation_create(tenant=tenant, offer=offers[1], quantity=1, **window)
    reservation_create(tenant=tenant, offer=offers["rack"], quantity=1, **window)
    for exact in (False, True):
        assert free_racks(offer=offers["rack"], exact=exact, **window) == []
        assert sum(free_nodes_per_rack(offer=offers[8], exact=exact, **window).values()) == 1
        masks = {node: mask for node, mask, _rack in held_masks(offer=offers[1], limit=16, exact=exact, **window)}
        assert sorted(masks.values()) == [0, 0b1]  # the sliced node (GPU 0 held) and the free one
    assert {node.pk for node in nodes} >= set(masks)


def test_a_node_moved_while_it_holds_gpus_is_not_given_twice_and_the_pools_free_node_still_is():
    """Node A holds a whole-node reservation of site 1's offer, then moves to site 2 (it should have been
    drained first). Site 2's pool scan cannot see that allocation, so A looks free and, lower in id
    order, comes first; the re-check asks A itself, and the last attempt asks every node: the slice goes
    to site 2's free node B, and a request for both nodes is refused."""
    accelerator = AcceleratorTypeFactory()
    first, second = SiteFactory(), SiteFactory()
    moved = make_node(rack=RackFactory(site=first), accelerator=accelerator)
    rack = RackFactory(site=second)
    free = make_node(rack=rack, accelerator=accelerator)
    assert moved.pk < free.pk
    tenant = make_tenant(credit="100000")
    start = timezone.now() + HOUR
    window = {"start": start, "end": start + 2 * HOUR}
    reservation_create(tenant=tenant, offer=_offer(first, accelerator), quantity=1, **window)
    node_update(node=moved, rack=rack, hostname=moved.hostname)

    slice_offer, node_offer = _offer(second, accelerator, 1), _offer(second, accelerator)
    placed = reservation_create(tenant=tenant, offer=slice_offer, quantity=1, **window)
    assert placed.allocations.get().node_id == free.pk
    with pytest.raises(CapacityUnavailable):
        reservation_create(tenant=tenant, offer=node_offer, quantity=2, **window)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM marketplace_allocation a JOIN marketplace_allocation b ON a.node_id = b.node_id "
            "AND a.id < b.id AND a.live AND b.live AND a.period && b.period AND a.gpus && b.gpus"
        )
        assert cursor.fetchone()[0] == 0
