"""No double booking (ARCHITECTURE invariant 1), shown with real concurrent connections."""

import random
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from marketplace.choices import OfferShape, Role
from marketplace.models import Allocation, Reservation
from marketplace.selectors.billing import balance_of
from marketplace.services.billing.credits import credits_grant
from marketplace.services.billing.ledger import InsufficientBalance
from marketplace.services.catalog.offers import offer_create
from marketplace.services.reservations.lifecycle import reservation_create
from marketplace.services.reservations.placement import CapacityUnavailable
from tests.conftest import key_client
from tests.factories import (
    AcceleratorTypeFactory,
    OfferFactory,
    RackFactory,
    SiteFactory,
    make_node,
    make_quota,
    make_tenant,
)

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


# --- Through the API: slices and whole nodes of one pool -------------------------------------------


def free_aligned_slots(*, node_ids: list[int], size: int, start, end) -> int:
    """Aligned slots of ``size`` GPUs on the 8-GPU ``node_ids`` that no live allocation overlapping
    [start, end) holds a GPU of: counted here in plain SQL, not by the selectors under test."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM unnest(%(nodes)s::bigint[]) n(id), generate_series(0, 8 - %(size)s, %(size)s) s "
            "WHERE NOT EXISTS (SELECT 1 FROM marketplace_allocation a WHERE a.node_id = n.id AND a.live "
            "AND a.period && tstzrange(%(start)s, %(end)s, '[)') AND a.gpus && int4range(s, s + %(size)s))",
            {"nodes": node_ids, "size": size, "start": start, "end": end},
        )
        return cursor.fetchone()[0]


def live_gpus_held(node_ids: list[int]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(upper(gpus) - lower(gpus)), 0) FROM marketplace_allocation "
            "WHERE live AND node_id = ANY(%s)",
            [node_ids],
        )
        return cursor.fetchone()[0]


# Each racer: the instance it asks for (GPUs per instance, instances), and a quota of GPUs (None: the
# default, no obstacle). 3 nodes x 8 GPUs = 24 GPUs, asked for several times over.
RACERS = [(1, 1, None)] * 6 + [(2, 1, None)] * 4 + [(4, 1, None)] * 4 + [(8, 1, None)] * 2 + [(8, 2, None)]
RACERS += [(1, 1, 1)] * 2  # two tenants whose quota is one GPU: a second slice is refused on quota
MOST_REQUESTS = 30  # per racer: a bound on the loop, far above what the pool can give one tenant


def test_tenants_racing_through_the_api_for_slices_and_nodes_fill_the_pool_and_book_no_gpu_twice():
    """Many tenants, each with its own API key and PostgreSQL connection, released at once by a barrier,
    ask for 1-, 2- and 4-GPU slices and whole nodes of three shared 8-GPU nodes for one window: a slice
    tenant again and again until it is refused, a whole-node tenant once (else the first round of whole
    nodes would take the pool, and slices would never race each other on shared nodes). A refusal that
    names the asked start as the earliest window ("being taken right now; try again") is retried, as a
    client would. When they are done: no GPU is held twice, no more GPUs are held than there are, no
    aligned slot of any size is left free, and every refusal was a 409 in the API's one error shape, for
    capacity or for the tenant's quota."""
    site, accelerator = SiteFactory(), AcceleratorTypeFactory()
    racks = [RackFactory(site=site), RackFactory(site=site)]
    nodes = [make_node(rack=racks[i % 2], accelerator=accelerator) for i in range(3)]
    node_ids = [node.pk for node in nodes]
    offers = {
        size: offer_create(
            site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=size
        )
        for size in (1, 2, 4, 8)
    }
    start = timezone.now() + timedelta(hours=1)
    end = start + timedelta(hours=2)
    clients, limited = [], set()
    for i, (_size, _quantity, quota) in enumerate(RACERS):
        tenant = make_tenant(role=Role.MEMBER)
        if quota is not None:
            make_quota(organization=tenant.organization, accelerator_type=accelerator, max_gpus=quota)
            limited.add(i)
        client = key_client(tenant)
        client.raise_request_exception = False  # a server error is a 500 to count, not an exception
        clients.append(client)

    def racer(client, size, quantity):
        body = {"offer": offers[size].pk, "quantity": quantity, "start": start.isoformat(), "end": end.isoformat()}
        answers = []
        for _ in range(MOST_REQUESTS):
            response = client.post("/api/v1/reservations/", body, format="json")
            answers.append((response.status_code, response.json()))
            if response.status_code == 201 and size < 8:
                continue  # a slice: ask for another
            if response.status_code != 409:
                break  # a whole node placed, or a status the test refuses below
            error = response.json().get("error", {})
            earliest = parse_datetime(error.get("earliest_start") or "1970-01-01T00:00:00Z")
            if error.get("code") != "capacity_unavailable" or earliest != start:
                break  # refused for good: no room in this window, or over the quota
        return answers

    results = race(
        [
            lambda c=client, s=size, q=quantity: racer(c, s, q)
            for client, (size, quantity, _quota) in zip(clients, RACERS, strict=True)
        ]
    )

    statuses = [status for answers in results for status, _body in answers]
    assert set(statuses) <= {201, 409}, sorted(set(statuses))  # no 5xx, no other status
    for i, answers in enumerate(results):
        if RACERS[i][0] < 8:
            assert answers[-1][0] == 409, f"racer {i} stopped without being refused: {answers}"
        for status, body in answers:
            if status != 409:
                continue
            assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
            expected = {"capacity_unavailable", "quota_exceeded"} if i in limited else {"capacity_unavailable"}
            assert body["error"]["code"] in expected, (i, body)
        if i in limited:
            size, quantity, quota = RACERS[i]
            assert size * quantity * [s for s, _b in answers].count(201) <= quota

    assert overlapping_live_allocations() == 0  # zero GPUs double-booked
    assert statuses.count(201) == Reservation.objects.count()
    assert live_gpus_held(node_ids) <= 3 * 8
    for size in (1, 2, 4, 8):  # the pool really got full: not even one GPU is free for the window
        assert free_aligned_slots(node_ids=node_ids, size=size, start=start, end=end) == 0, size
    assert live_gpus_held(node_ids) == 3 * 8
    for allocation in Allocation.objects.filter(live=True).select_related("reservation__offer"):
        size = allocation.reservation.offer.gpus_per_instance
        assert allocation.gpus.upper - allocation.gpus.lower == size and allocation.gpus.lower % size == 0
