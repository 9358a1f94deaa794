"""No double booking (ARCHITECTURE invariant 1), shown with real concurrent connections."""

import random
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.choices import OfferShape, Role
from marketplace.models import Allocation, Reservation
from marketplace.selectors.billing import balance_of
from marketplace.services.billing.credits import credits_grant
from marketplace.services.billing.ledger import InsufficientBalance
from marketplace.services.reservations.lifecycle import reservation_create
from marketplace.services.reservations.placement import CapacityUnavailable
from tests.factories import OfferFactory, RackFactory, SiteFactory, make_node, make_tenant

pytestmark = pytest.mark.django_db(transaction=True)
THREADS = 32


def race(jobs):
    """Run each job in its own thread (its own PostgreSQL connection), all released at once."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def run(index, job):
        try:
            barrier.wait()
            results[index] = job()
        except CapacityUnavailable as refusal:
            results[index] = refusal
        except BaseException as error:  # noqa: BLE001 - anything else (deadlock, integrity) fails the test
            results[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, CapacityUnavailable)]
    assert not unexpected, unexpected
    return results


def overlapping_live_allocations() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM marketplace_allocation a JOIN marketplace_allocation b "
            "ON a.node_id = b.node_id AND a.id < b.id AND a.live AND b.live AND a.period && b.period "
            "AND a.gpus && b.gpus"
        )
        return cursor.fetchone()[0]


def overlapping_windows(count: int):
    """Windows that all share [t0 + 30 min, t0 + 60 min), with different starts and ends."""
    t0 = timezone.now() + timedelta(hours=1)
    rng = random.Random(7)
    return [
        (t0 + timedelta(minutes=rng.randint(0, 30)), t0 + timedelta(minutes=rng.randint(60, 120))) for _ in range(count)
    ]


def test_racers_for_the_last_free_nodes_get_them_exactly_once():
    site = SiteFactory()
    offer = OfferFactory(site=site)
    for rack in (RackFactory(site=site), RackFactory(site=site)):
        for _ in range(3):
            make_node(rack=rack, accelerator=offer.accelerator_type)
    tenants = [make_tenant(role=Role.MEMBER) for _ in range(THREADS)]
    windows = overlapping_windows(THREADS)
    # 6 nodes; each racer wants 2 over windows that all overlap: exactly 3 can win.
    results = race(
        [
            lambda t=tenant, w=window: reservation_create(tenant=t, offer=offer, quantity=2, start=w[0], end=w[1])
            for tenant, window in zip(tenants, windows, strict=True)
        ]
    )
    winners = [r for r in results if isinstance(r, Reservation)]
    assert len(winners) == 3
    assert sorted(Allocation.objects.filter(live=True).values_list("node_id", flat=True)) == sorted(
        set(Allocation.objects.values_list("node_id", flat=True))
    )
    assert all(w.allocations.count() == 2 for w in winners)
    assert overlapping_live_allocations() == 0


def test_racers_for_one_rack_and_its_nodes_have_one_winner_per_slot():
    site = SiteFactory()
    node_offer = OfferFactory(site=site)
    rack_offer = OfferFactory(site=site, accelerator_type=node_offer.accelerator_type, shape=OfferShape.RACK)
    rack = RackFactory(site=site)
    for _ in range(4):
        make_node(rack=rack, accelerator=node_offer.accelerator_type)
    tenants = [make_tenant(role=Role.MEMBER) for _ in range(THREADS)]
    windows = overlapping_windows(THREADS)
    jobs = []
    for i, (tenant, window) in enumerate(zip(tenants, windows, strict=True)):
        offer, quantity = (rack_offer, 1) if i % 2 else (node_offer, 4)  # both want all four nodes
        jobs.append(
            lambda t=tenant, o=offer, q=quantity, w=window: reservation_create(
                tenant=t, offer=o, quantity=q, start=w[0], end=w[1]
            )
        )
    results = race(jobs)
    winners = [r for r in results if isinstance(r, Reservation)]
    assert len(winners) == 1, winners
    assert winners[0].allocations.count() == 4
    refusals = [r for r in results if isinstance(r, CapacityUnavailable)]
    assert len(refusals) == THREADS - 1 and all(r.status_code == 409 for r in refusals)
    assert overlapping_live_allocations() == 0


def test_a_rack_is_allocated_whole_or_not_at_all_under_contention():
    site = SiteFactory()
    rack_offer = OfferFactory(site=site, shape=OfferShape.RACK)
    racks = [RackFactory(site=site) for _ in range(2)]
    for rack in racks:
        for _ in range(3):
            make_node(rack=rack, accelerator=rack_offer.accelerator_type)
    tenants = [make_tenant(role=Role.MEMBER) for _ in range(THREADS)]
    results = race(
        [
            lambda t=tenant, w=window: reservation_create(tenant=t, offer=rack_offer, quantity=1, start=w[0], end=w[1])
            for tenant, window in zip(tenants, overlapping_windows(THREADS), strict=True)
        ]
    )
    winners = [r for r in results if isinstance(r, Reservation)]
    assert len(winners) == 2 and {w.rack_id for w in winners} == {r.pk for r in racks}
    for winner in winners:
        assert set(winner.allocations.values_list("node__rack_id", flat=True)) == {winner.rack_id}
        assert winner.allocations.count() == 3
    assert overlapping_live_allocations() == 0


def test_the_database_refuses_an_overlap_even_if_placement_were_wrong():
    from django.db import IntegrityError
    from django.db.backends.postgresql.psycopg_any import DateTimeTZRange, NumericRange

    tenant = make_tenant(role=Role.MEMBER)
    node = make_node()
    offer = OfferFactory(site=node.rack.site, accelerator_type=node.accelerator_type)
    start = timezone.now() + timedelta(hours=1)
    reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=2))
    # Bypass the services: write a second reservation's allocation of the same node by hand.
    intruder = Reservation.objects.create(
        organization=tenant.organization,
        offer=offer,
        shape="node",
        quantity=1,
        node_count=1,
        gpu_count=8,
        period=DateTimeTZRange(start, start + timedelta(hours=3), "[)"),
        price_per_gpu_hour=1,
    )
    with pytest.raises(IntegrityError, match="allocation_no_overlap"):
        Allocation.objects.create(
            reservation=intruder,
            node=node,
            gpus=NumericRange(0, 8),
            period=DateTimeTZRange(start + timedelta(hours=1), start + timedelta(hours=3), "[)"),
        )


def test_concurrent_spenders_cannot_hold_more_than_the_balance():
    """Eight reservations at once from one tenant whose credit covers three of them: exactly three are
    made, the rest refused with 402, and the holds never exceed the credit (the organization lock)."""

    tenant = make_tenant(role=Role.MEMBER, credit=None)
    rack = RackFactory()
    offer = OfferFactory(site=rack.site, price_per_gpu_hour=Decimal("1.00"))
    for _ in range(8):
        make_node(rack=rack, accelerator=offer.accelerator_type)
    credits_grant(organization=tenant.organization, amount=Decimal("24.00"), memo="test")  # 3 x 8 GPU-hours
    start = timezone.now() + timedelta(hours=1)

    def reserve():
        try:
            return reservation_create(
                tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=1)
            )
        except InsufficientBalance as refusal:
            return refusal.code  # refused, as expected: not an error of the race

    results = race([reserve] * 8)
    made = [r for r in results if isinstance(r, Reservation)]
    assert len(made) == 3 and results.count(InsufficientBalance.code) == 5
    money = balance_of(organization_id=tenant.organization.pk)
    assert money["held"] == Decimal("24.00") and money["available"] == 0
