"""Placement: which GPUs of which nodes a reservation gets. Called inside the reservation's transaction.

Whole nodes and racks take nodes no one holds any GPU of, packed into as few racks as fit (so big free
racks stay whole for rack requests). A slice takes an aligned slot (marketplace.selectors.capacity) of
the node where it fits most tightly -- the fullest node with room, and on it the slot whose free
enclosing block is smallest (a buddy allocator's best fit) -- so partly used nodes fill first and big
free holes stay whole for big requests.

The pick is optimistic and then made safe: candidates come from one capacity query (over the pool's
allocations, marketplace.selectors.capacity), their node rows are locked in id order (a fixed order, so
two placements never wait on each other in a cycle; MEASURED.md saw deadlocks without it), and a fresh
statement asks the nodes themselves again. If a competitor took one meanwhile, the attempt's savepoint
is rolled back (releasing its locks) and placement runs again; the last attempt asks every node itself
from the start (``exact``), so an allocation the pool's index cannot see costs retries, not a refusal.
The exclusion constraint on allocations stays the last word."""

from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction

from console.kernel.errors import Conflict
from marketplace.choices import OfferShape
from marketplace.models import Offer
from marketplace.selectors.capacity import free_nodes_in_racks, free_nodes_per_rack, free_racks, held_masks
from provisioning.models import Node

ATTEMPTS = 8


class CapacityUnavailable(Conflict):
    code = "capacity_unavailable"


class _Taken(Exception):
    """A candidate was taken between the capacity query and the lock."""


# How many of the fullest fitting nodes a slice placement weighs against each other (by their best slot).
CANDIDATES = 16


@dataclass(frozen=True)
class Placement:
    node_ids: list[int]
    rack_id: int | None  # the rack, for a rack reservation
    gpus: dict[int, tuple[int, int]]  # node id → its GPUs held, [first, last + 1)


def slot_mask(first: int, size: int) -> int:
    return ((1 << size) - 1) << first


def slot_choose(*, held: int, node_gpus: int, size: int) -> tuple[int, int] | None:
    """The best free aligned slot of ``size`` GPUs on a node of ``node_gpus`` GPUs whose held GPUs are
    the bitmask ``held``, as (the size of its free enclosing block, its first GPU); None if none is
    free. Best: the smallest free aligned block around it (so a 1-GPU slice completes a half-used pair
    before it breaks a free one), then the lowest index."""
    best = None
    for first in range(0, node_gpus - size + 1, size):
        if held & slot_mask(first, size):
            continue
        block = size
        while True:
            wider = block * 2
            base = first - first % wider
            if base + wider > node_gpus or held & slot_mask(base, wider):
                break
            block = wider
        if best is None or (block, first) < best:
            best = (block, first)
    return best


def choose_racks(free_per_rack: dict[int, int], quantity: int) -> dict[int, int] | None:
    """How many nodes to take from which rack: one rack if any fits (the fullest-fitting one, so big
    free racks stay whole for big requests), else the fewest racks, largest first. None if the
    site cannot hold ``quantity``."""
    fitting = [(free, rack) for rack, free in free_per_rack.items() if free >= quantity]
    if fitting:
        _free, rack = min(fitting)
        return {rack: quantity}
    if sum(free_per_rack.values()) < quantity:
        return None
    chosen, needed = {}, quantity
    for rack, free in sorted(free_per_rack.items(), key=lambda item: (-item[1], item[0])):
        take = min(free, needed)
        chosen[rack] = take
        needed -= take
        if needed == 0:
            break
    return chosen


def nodes_lock(node_ids: list[int]) -> None:
    """Lock node rows in id order: every writer that holds nodes locks them this way."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM {Node._meta.db_table} WHERE id = ANY(%s) ORDER BY id FOR UPDATE", [sorted(node_ids)]
        )


def _attempt_nodes(offer: Offer, quantity: int, start: datetime, end: datetime, exact: bool) -> Placement:
    per_rack = free_nodes_per_rack(offer=offer, start=start, end=end, exact=exact)
    plan = choose_racks(per_rack, quantity)
    if plan is None:
        raise CapacityUnavailable(
            f"Only {sum(per_rack.values())} of the {quantity} nodes you asked for are free for that window.",
            available_nodes=sum(per_rack.values()),
        )
    free = free_nodes_in_racks(offer=offer, start=start, end=end, racks=list(plan))
    picked: list[int] = []
    for rack, count in plan.items():
        picked += [node for node, node_rack in free if node_rack == rack][:count]
    if len(picked) < quantity:  # some went between the two queries
        raise _Taken
    nodes_lock(picked)
    still_free = {node for node, _rack in free_nodes_in_racks(offer=offer, start=start, end=end, racks=list(plan))}
    if not set(picked) <= still_free:
        raise _Taken
    return Placement(node_ids=picked, rack_id=None, gpus=_whole(offer, picked))


def _whole(offer: Offer, node_ids: list[int]) -> dict[int, tuple[int, int]]:
    return {node: (0, offer.gpus_per_node) for node in node_ids}


def _slice_refusal(offer: Offer) -> CapacityUnavailable:
    return CapacityUnavailable(
        f"No {offer.gpus_per_instance}-GPU slice of this offer is free for that window.", available_instances=0
    )


def _best_slot(offer: Offer, candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """(node, first GPU) of the tightest fit among ``candidates`` (node, held mask), fullest first."""
    choices = []
    for order, (node, held) in enumerate(candidates):
        slot = slot_choose(held=held, node_gpus=offer.gpus_per_node, size=offer.gpus_per_instance)
        if slot is not None:
            block, first = slot
            choices.append((-held.bit_count(), block, order, node, first))
    if not choices:
        raise _slice_refusal(offer)
    *_key, node, first = min(choices)
    return node, first


def _attempt_slice(offer: Offer, start: datetime, end: datetime, exact: bool) -> Placement:
    node, first = _best_slot(offer, held_masks(offer=offer, start=start, end=end, limit=CANDIDATES, exact=exact))
    nodes_lock([node])
    held = dict(held_masks(offer=offer, start=start, end=end, limit=1, nodes=[node])).get(node)
    if held is None or held & slot_mask(first, offer.gpus_per_instance):  # taken, or the node left
        raise _Taken
    return Placement(node_ids=[node], rack_id=None, gpus={node: (first, first + offer.gpus_per_instance)})


def _attempt_rack(offer: Offer, start: datetime, end: datetime, exact: bool) -> Placement:
    racks = free_racks(offer=offer, start=start, end=end, limit=1, exact=exact)
    if not racks:
        raise CapacityUnavailable("No whole rack of this offer is free for that window.", available_racks=0)
    rack = racks[0]
    node_ids = list(Node.objects.filter(rack_id=rack).order_by("id").values_list("id", flat=True))
    nodes_lock(node_ids)
    if not free_racks(offer=offer, start=start, end=end, racks=[rack]):
        raise _Taken
    return Placement(node_ids=node_ids, rack_id=rack, gpus=_whole(offer, node_ids))


def placement_check(*, offer: Offer, quantity: int, start: datetime, end: datetime) -> int:
    """How many nodes placement_pick would give now (a whole rack's, for a rack offer; one, for a slice), or the
    CapacityUnavailable it would raise, from the same capacity queries without locking or writing:
    the price step's answer. The pick at confirm time decides; this only says it early."""
    if offer.shape == OfferShape.RACK:
        racks = free_racks(offer=offer, start=start, end=end, limit=1)
        if not racks:
            raise CapacityUnavailable("No whole rack of this offer is free for that window.", available_racks=0)
        return Node.objects.filter(rack_id=racks[0]).count()
    if offer.is_slice:
        if not held_masks(offer=offer, start=start, end=end, limit=1):
            raise _slice_refusal(offer)
        return 1
    per_rack = free_nodes_per_rack(offer=offer, start=start, end=end)
    if choose_racks(per_rack, quantity) is None:
        raise CapacityUnavailable(
            f"Only {sum(per_rack.values())} of the {quantity} nodes you asked for are free for that window.",
            available_nodes=sum(per_rack.values()),
        )
    return quantity


def placement_pick(*, offer: Offer, quantity: int, start: datetime, end: datetime) -> Placement:
    """GPUs for ``quantity`` whole nodes, one whole rack or one slice of ``offer`` over [start, end), their
    nodes locked until the caller's transaction ends. Raises CapacityUnavailable."""
    for attempt in range(ATTEMPTS):
        exact = attempt == ATTEMPTS - 1
        try:
            with transaction.atomic():
                if offer.shape == OfferShape.RACK:
                    return _attempt_rack(offer, start, end, exact)
                if offer.is_slice:
                    return _attempt_slice(offer, start, end, exact)
                return _attempt_nodes(offer, quantity, start, end, exact)
        except _Taken:
            continue
    raise CapacityUnavailable("The capacity you asked for is being taken by others right now; try again.")
