"""GPU slices (issue 12): an allocation holds a range of a node's GPUs, never one GPU twice.

The database's exclusion constraint is shown with straight SQL, the alignment and best-fit rules with
the pure slot chooser, and placement as a whole against a brute-force model of a small fleet: random
bookings of slices, whole nodes and racks, each success checked (aligned, on the fullest node with
room) and each refusal checked (no placement fits, and the earliest window it names is the first that
does)."""

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.kernel.errors import DomainError
from marketplace.choices import OfferShape
from marketplace.models import Allocation, Reservation, UsageRecord
from marketplace.money import cents, cost, seconds_between
from marketplace.selectors.capacity import availability_by_hour
from marketplace.services.billing.metering import usage_rate
from marketplace.services.catalog.offers import offer_create
from marketplace.services.reservations.lifecycle import (
    QuotaExceeded,
    reservation_cancel,
    reservation_create,
    reservation_extend,
    reservation_release,
)
from marketplace.services.reservations.placement import CapacityUnavailable, slot_choose
from tests.factories import (
    AcceleratorTypeFactory,
    RackFactory,
    SiteFactory,
    activate,
    make_node,
    make_quota,
    make_tenant,
)

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)


def held(*ranges: tuple[int, int]) -> int:
    mask = 0
    for first, end in ranges:
        mask |= ((1 << (end - first)) - 1) << first
    return mask


# --- The constraint, bypassing the services ---------------------------------------------------------


def _insert(reservation: Reservation, node, gpus: tuple[int, int], hours: tuple[int, int], base: datetime) -> None:
    """An allocation row written with plain SQL: nothing above the database checks it."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Allocation._meta.db_table} (reservation_id, node_id, gpus, period, live) "  # noqa: S608
            "VALUES (%s, %s, int4range(%s, %s), tstzrange(%s, %s, '[)'), true)",
            [reservation.pk, node.pk, *gpus, base + hours[0] * HOUR, base + hours[1] * HOUR],
        )


@pytest.fixture
def bare_reservations(db):
    """Three reservation rows (no allocations) of one offer, and a node to allocate."""
    site = SiteFactory()
    accelerator = AcceleratorTypeFactory()
    offer = offer_create(site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal(1), gpus_per_instance=1)
    node = make_node(rack=RackFactory(site=site), accelerator=accelerator)
    tenant = make_tenant()
    base = timezone.now() + HOUR
    rows = [
        Reservation.objects.create(
            organization=tenant.organization,
            offer=offer,
            shape=OfferShape.NODE,
            quantity=1,
            node_count=1,
            gpu_count=1,
            period=DateTimeTZRange(base, base + 10 * HOUR, "[)"),
            price_per_gpu_hour=1,
        )
        for _ in range(3)
    ]
    return rows, node, base


def test_the_constraint_refuses_overlapping_gpus_of_one_node_in_overlapping_periods(bare_reservations):
    (a, b, _c), node, base = bare_reservations
    _insert(a, node, (2, 4), (0, 4), base)
    for gpus, hours in [((3, 4), (1, 2)), ((0, 8), (3, 5)), ((2, 4), (0, 4)), ((1, 3), (2, 9))]:
        with pytest.raises(IntegrityError, match="allocation_no_overlap"), transaction.atomic():
            _insert(b, node, gpus, hours, base)


def test_the_constraint_allows_disjoint_gpus_at_once_and_the_same_gpus_at_other_times(bare_reservations):
    (a, b, c), node, base = bare_reservations
    _insert(a, node, (2, 4), (0, 4), base)
    _insert(b, node, (0, 2), (0, 4), base)  # the pair next to it, same hours
    _insert(c, node, (4, 8), (0, 10), base)  # the other half
    with transaction.atomic():  # the same GPUs once a's hours are over ([) periods touch, not overlap)
        _insert(b.__class__.objects.create(**_copy(a)), node, (2, 4), (4, 6), base)
    Allocation.objects.filter(reservation=a).update(live=False)  # a no longer holds them
    _insert(Reservation.objects.create(**_copy(a)), node, (2, 3), (1, 2), base)
    assert Allocation.objects.filter(node=node, live=True).count() == 4  # b, c and the two made later


def _copy(reservation: Reservation) -> dict:
    fields = ["organization", "offer", "shape", "quantity", "node_count", "gpu_count", "period", "price_per_gpu_hour"]
    return {name: getattr(reservation, name) for name in fields}


def test_the_constraint_refuses_an_empty_or_negative_range(bare_reservations):
    (a, _b, _c), node, base = bare_reservations
    for gpus in [(3, 3), (-1, 1)]:
        with pytest.raises(IntegrityError, match="allocation_gpus_valid"), transaction.atomic():
            _insert(a, node, gpus, (0, 1), base)


# --- Alignment and best fit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "starts"),
    [(1, [0, 1, 2, 3, 4, 5, 6, 7]), (2, [0, 2, 4, 6]), (4, [0, 4]), (8, [0])],
)
def test_a_slice_starts_only_at_a_multiple_of_its_size(size, starts):
    """On an empty node every aligned start is free; from one GPU past each, the slice must move to the
    next aligned start, never straddle two islands."""
    reachable = set()
    for busy in range(8):
        mask = held((0, busy))  # GPUs [0, busy) held
        slot = slot_choose(held=mask, node_gpus=8, size=size)
        if slot is not None:
            reachable.add(slot[1])
            assert slot[1] % size == 0
            assert slot[1] >= busy
    assert reachable <= set(starts)
    assert slot_choose(held=held((0, 8)), node_gpus=8, size=size) is None


def test_a_2_gpu_slice_never_takes_two_free_gpus_of_different_pairs():
    # GPUs 1 and 2 are free but straddle pairs [0, 2) and [2, 4): no 2-GPU slice fits there.
    assert slot_choose(held=held((0, 1), (3, 8)), node_gpus=8, size=2) is None
    # a 4-GPU slice needs [0, 4) or [4, 8) whole: [2, 6) free is not enough.
    assert slot_choose(held=held((0, 2), (6, 8)), node_gpus=8, size=4) is None


def test_best_fit_completes_a_broken_block_before_breaking_a_whole_one():
    # GPU 0 held: a 1-GPU slice takes GPU 1 (completing the pair), not GPU 2 or 4.
    assert slot_choose(held=held((0, 1)), node_gpus=8, size=1) == (1, 1)
    # [0, 2) and [4, 5) held: GPU 5 completes a pair; [2, 4) stays whole for a 2-GPU slice.
    assert slot_choose(held=held((0, 2), (4, 5)), node_gpus=8, size=1) == (1, 5)
    # A 2-GPU slice takes the pair inside the half already broken ([2, 4)), keeping [4, 8) whole.
    assert slot_choose(held=held((0, 2)), node_gpus=8, size=2) == (2, 2)
    # On a free node, the first slot; its block is the whole node.
    assert slot_choose(held=0, node_gpus=8, size=2) == (8, 0)


def test_alignment_holds_on_nodes_that_are_not_a_power_of_two():
    # A 6-GPU node has pairs [0, 2), [2, 4), [4, 6) and one 4-GPU island [0, 4).
    assert slot_choose(held=held((0, 4)), node_gpus=6, size=2) == (2, 4)
    assert slot_choose(held=held((4, 6)), node_gpus=6, size=4) == (4, 0)
    assert slot_choose(held=held((0, 1)), node_gpus=6, size=4) is None


# --- Offers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gpus_per_instance": 3}, "A slice of a node holds 1, 2, 4, 8 GPUs."),
        ({"gpus_per_instance": 16}, "more GPUs than its node has"),
        ({"gpus_per_instance": 0}, "greater than or equal to 1"),
        ({"shape": OfferShape.RACK, "gpus_per_instance": 2}, "A rack rents whole nodes"),
        ({"gpus_per_node": 64, "gpus_per_instance": 8}, "Nodes of more than 32 GPUs are rented whole."),
    ],
)
def test_an_offer_refuses_an_instance_that_does_not_fit_its_node(db, fields, message):
    with pytest.raises(DomainError, match=message):
        offer_create(
            site=SiteFactory(), accelerator_type=AcceleratorTypeFactory(), price_per_gpu_hour=Decimal(1), **fields
        )


def test_a_64_gpu_node_can_still_be_offered_whole(db):
    offer = offer_create(
        site=SiteFactory(), accelerator_type=AcceleratorTypeFactory(), price_per_gpu_hour=Decimal(1), gpus_per_node=64
    )
    assert offer.is_whole_node and not offer.is_slice


# --- Placement through the service ----------------------------------------------------------------


@pytest.fixture
def pool(db):
    """One site with two racks of two 8-GPU nodes, and offers of 1-, 2- and 4-GPU slices, whole nodes and
    whole racks sharing them; a tenant whose quota and balance are no obstacle."""
    site = SiteFactory()
    accelerator = AcceleratorTypeFactory()
    racks = [RackFactory(site=site) for _ in range(2)]
    nodes = [make_node(rack=rack, accelerator=accelerator) for rack in racks for _ in range(2)]

    def offer(size, shape=OfferShape.NODE):
        return offer_create(
            site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal(1), shape=shape, gpus_per_instance=size
        )

    offers = {1: offer(1), 2: offer(2), 4: offer(4), 8: offer(8), "rack": offer(8, OfferShape.RACK)}
    tenant = make_tenant(credit="10000000")
    make_quota(organization=tenant.organization, accelerator_type=accelerator, max_gpus=10_000)
    base = (timezone.now() + 2 * HOUR).replace(minute=0, second=0, microsecond=0)  # whole hours: the calendar's
    return {"offers": offers, "nodes": nodes, "racks": racks, "tenant": tenant, "base": base}


def _reserve(pool, kind, start_h=0, hours=1, quantity=1):
    base = pool["base"]
    return reservation_create(
        tenant=pool["tenant"],
        offer=pool["offers"][kind],
        quantity=quantity,
        start=base + start_h * HOUR,
        end=base + (start_h + hours) * HOUR,
    )


def _gpus(reservation):
    return [(a.node_id, a.gpus.lower, a.gpus.upper) for a in reservation.allocations.order_by("node_id")]


def test_slices_fill_a_partly_used_node_before_touching_a_free_one(pool):
    first = _reserve(pool, 1)
    node = first.allocations.get().node_id
    assert _gpus(first) == [(node, 0, 1)]
    assert _gpus(_reserve(pool, 1)) == [(node, 1, 2)]  # the pair completed
    assert _gpus(_reserve(pool, 2)) == [(node, 2, 4)]  # the broken half filled
    assert _gpus(_reserve(pool, 4)) == [(node, 4, 8)]  # the node is full now
    assert _gpus(_reserve(pool, 1))[0][0] != node


def test_a_whole_node_or_a_rack_sees_only_wholly_free_nodes(pool):
    slices = [_reserve(pool, 1) for _ in range(2)]
    assert len({s.allocations.get().node_id for s in slices}) == 1  # both on one node
    whole = _reserve(pool, 8, quantity=3)
    assert {a.gpus.lower for a in whole.allocations.all()} == {0}
    assert {a.gpus.upper for a in whole.allocations.all()} == {8}
    with pytest.raises(CapacityUnavailable):
        _reserve(pool, 8)  # three of four taken whole, the fourth has a slice on it
    with pytest.raises(CapacityUnavailable):
        _reserve(pool, "rack")


def test_a_slice_reservation_is_one_instance(pool):
    with pytest.raises(DomainError, match="use quantity 1"):
        _reserve(pool, 2, quantity=2)


def test_a_slice_refused_names_the_earliest_window_it_fits(pool):
    for _ in range(4):
        _reserve(pool, 8, start_h=0, hours=3)
    with pytest.raises(CapacityUnavailable) as refused:
        _reserve(pool, 2, start_h=1, hours=2)
    assert refused.value.details["earliest_start"] == (pool["base"] + 3 * HOUR).isoformat()


def test_the_earliest_window_opens_only_after_the_latest_holding_so_far(pool):
    """Holdings of one node may overlap in time (slices of different GPUs): a gap opens after the
    latest end so far, not after the previous holding's. Node 4 holds GPU 0 for [0, 5), GPU 1 for
    [1, 3) and GPU 0 again for [6, 8): a whole node fits for an hour first at 5, not at 3."""
    _reserve(pool, 8, start_h=0, hours=8, quantity=3)
    _reserve(pool, 1, start_h=0, hours=5)
    _reserve(pool, 1, start_h=1, hours=2)
    _reserve(pool, 1, start_h=6, hours=2)
    with pytest.raises(CapacityUnavailable) as refused:
        _reserve(pool, 8, start_h=0, hours=1)
    assert refused.value.details["earliest_start"] == (pool["base"] + 5 * HOUR).isoformat()


def test_slices_on_one_node_extend_independently(pool):
    _reserve(pool, 8, start_h=0, hours=8, quantity=3)  # the last node is the only one with room
    a = _reserve(pool, 4, start_h=0, hours=2)
    b = _reserve(pool, 4, start_h=0, hours=2)
    assert _gpus(a)[0][1:] == (0, 4) and _gpus(b)[0][1:] == (4, 8)
    _reserve(pool, 4, start_h=2, hours=2)  # [0, 4) again, after a
    with pytest.raises(CapacityUnavailable, match="GPUs 0–3 of node .* are reserved by someone else"):
        reservation_extend(tenant=pool["tenant"], reservation=a, end=pool["base"] + 4 * HOUR)
    extended = reservation_extend(tenant=pool["tenant"], reservation=b, end=pool["base"] + 4 * HOUR)
    assert extended.end == pool["base"] + 4 * HOUR


def test_the_gpus_of_a_cancelled_slice_are_free_again(pool):
    full = [_reserve(pool, 8, quantity=3), _reserve(pool, 4), _reserve(pool, 4)]
    with pytest.raises(CapacityUnavailable):
        _reserve(pool, 1)
    reservation_cancel(tenant=pool["tenant"], reservation=full[1])
    assert _gpus(_reserve(pool, 2))[0][1:] in [(0, 2), (4, 6)]


# --- Random bookings against a brute-force model ----------------------------------------------------

SIZES = {1: 1, 2: 2, 4: 4, 8: 8, "rack": 8}
BOOKING = st.tuples(
    st.sampled_from([1, 1, 2, 2, 4, 8, "rack"]),
    st.integers(0, 5),  # start hour
    st.integers(1, 4),  # hours
    st.integers(1, 3),  # quantity, for whole nodes
    st.integers(0, 9),  # < 2: cancel an earlier booking instead
)


def _live(pool) -> list[tuple[int, int, int, datetime, datetime]]:
    return [
        (a.node_id, a.gpus.lower, a.gpus.upper, a.period.lower, a.period.upper)
        for a in Allocation.objects.filter(node__in=pool["nodes"], live=True)
    ]


def _held_mask(live, node_id, start, end) -> int:
    return held(*[(lo, hi) for n, lo, hi, s, e in live if n == node_id and s < end and start < e])


def _fits(pool, kind, quantity, start, end, live) -> bool:
    """Brute force: is there any placement of the booking over [start, end)?"""
    node_ids = [node.pk for node in pool["nodes"]]
    if kind == "rack":
        return any(
            all(_held_mask(live, n.pk, start, end) == 0 for n in pool["nodes"] if n.rack_id == rack.pk)
            for rack in pool["racks"]
        )
    size = SIZES[kind]
    if size == 8:
        return sum(_held_mask(live, n, start, end) == 0 for n in node_ids) >= quantity
    return any(
        _held_mask(live, n, start, end) & held((first, first + size)) == 0
        for n in node_ids
        for first in range(0, 8, size)
    )


@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bookings=st.lists(BOOKING, min_size=1, max_size=14))
def test_random_bookings_never_hold_a_gpu_twice_and_every_refusal_is_right(pool, bookings):
    with transaction.atomic():
        made: list[Reservation] = []
        for kind, start_h, hours, quantity, cancel in bookings:
            if cancel < 2 and made:
                reservation_cancel(tenant=pool["tenant"], reservation=made.pop(cancel % len(made)))
                continue
            quantity = quantity if SIZES[kind] == 8 and kind != "rack" else 1
            start, end = pool["base"] + start_h * HOUR, pool["base"] + (start_h + hours) * HOUR
            before = _live(pool)
            try:
                reservation = _reserve(pool, kind, start_h, hours, quantity)
            except CapacityUnavailable as refusal:
                assert not _fits(pool, kind, quantity, start, end, before), (kind, start_h, hours, quantity)
                _check_earliest(pool, kind, quantity, start, end - start, before, refusal)
                continue
            made.append(reservation)
            _check_placed(pool, kind, reservation, start, end, before)
            after = _live(pool)
            for i, (n, lo, hi, s, e) in enumerate(after):  # no GPU held twice at any moment
                for n2, lo2, hi2, s2, e2 in after[i + 1 :]:
                    assert not (n == n2 and lo < hi2 and lo2 < hi and s < e2 and s2 < e)
        _check_calendar(pool)
        transaction.set_rollback(True)


def _check_calendar(pool) -> None:
    """The hour-by-hour calendar of every offer counts what a brute force counts: free aligned slots of
    its size (a whole node is one), or wholly free racks."""
    first = pool["base"].replace(minute=0, second=0, microsecond=0)
    live = _live(pool)
    for kind, offer in pool["offers"].items():
        calendar = availability_by_hour(offer=offer, start=pool["base"], end=first + 10 * HOUR)
        for hour in calendar:
            start, end = hour.hour, hour.hour + HOUR
            if kind == "rack":
                free = sum(
                    all(_held_mask(live, n.pk, start, end) == 0 for n in pool["nodes"] if n.rack_id == rack.pk)
                    for rack in pool["racks"]
                )
                total = len(pool["racks"])
            else:
                size = SIZES[kind]
                masks = [_held_mask(live, n.pk, start, end) for n in pool["nodes"]]
                free = sum(mask & held((f, f + size)) == 0 for mask in masks for f in range(0, 8, size))
                total = len(masks) * (8 // size)
            assert (hour.free, hour.total) == (free, total), (kind, hour)


def _check_placed(pool, kind, reservation, start, end, before) -> None:
    size = SIZES[kind]
    allocations = list(reservation.allocations.all())
    for allocation in allocations:
        assert allocation.gpus.upper - allocation.gpus.lower == size
        assert allocation.gpus.lower % size == 0 and allocation.gpus.upper <= 8
    if kind in (1, 2, 4):  # on the fullest node with room
        [chosen] = allocations
        room = [
            _held_mask(before, n.pk, start, end).bit_count()
            for n in pool["nodes"]
            if any(_held_mask(before, n.pk, start, end) & held((f, f + size)) == 0 for f in range(0, 8, size))
        ]
        assert _held_mask(before, chosen.node_id, start, end).bit_count() == max(room)


def _check_earliest(pool, kind, quantity, start, duration, before, refusal) -> None:
    """The window the refusal names is the first one that fits: a window can only open at the asked
    start or when a holding ends."""
    candidates = sorted({start} | {e for *_rest, e in before if e > start})
    expected = next((t for t in candidates if _fits(pool, kind, quantity, t, t + duration, before)), None)
    named = refusal.details.get("earliest_start")
    assert named == (expected.isoformat() if expected else None), (kind, quantity, named, expected)


# --- Quotas and billing count the slice's GPUs --------------------------------------------------------


def test_quotas_count_the_gpus_of_slices(pool):
    tenant = make_tenant(credit="10000")
    make_quota(organization=tenant.organization, accelerator_type=pool["offers"][1].accelerator_type, max_gpus=3)
    window = {"quantity": 1, "start": pool["base"], "end": pool["base"] + HOUR}
    made = reservation_create(tenant=tenant, offer=pool["offers"][2], **window)
    assert made.gpu_count == 2
    with pytest.raises(QuotaExceeded, match="it holds 2 in that window and this needs 2 more"):
        reservation_create(tenant=tenant, offer=pool["offers"][2], **window)
    assert reservation_create(tenant=tenant, offer=pool["offers"][1], **window).gpu_count == 1


def test_a_slice_is_billed_for_its_gpus_only(pool):
    tenant = make_tenant(credit="1000")
    offer = pool["offers"][2]
    start = timezone.now()
    reservation = activate(
        reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=start + 2 * HOUR),
        since=timezone.now() - timedelta(minutes=30),
    )
    assert reservation_release(reservation_id=reservation.pk)
    reservation.refresh_from_db()
    usage_rate(now=reservation.deactivated_at + HOUR)
    record = UsageRecord.objects.get(reservation=reservation)
    seconds = seconds_between(reservation.activated_at, reservation.deactivated_at)
    assert record.amount == cost(price_per_gpu_hour=offer.price_per_gpu_hour, gpus=2, seconds=seconds)
    assert reservation.estimated_cost == cents(cost(price_per_gpu_hour=offer.price_per_gpu_hour, gpus=2, seconds=7200))
