"""Placement: which nodes a reservation gets. Called inside the reservation's transaction.

The pick is optimistic and then made safe: candidates come from one capacity query, their node rows are
locked in id order (a fixed order, so two placements never wait on each other in a cycle; MEASURED.md
saw deadlocks without it), and a fresh statement re-checks them. If a competitor took one meanwhile,
the attempt's savepoint is rolled back (releasing its locks) and placement runs again. The exclusion
constraint on allocations stays the last word."""

from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction

from console.kernel.errors import Conflict
from marketplace.choices import OfferShape
from marketplace.models import Offer
from marketplace.selectors.capacity import free_nodes_in_racks, free_nodes_per_rack, free_racks
from provisioning.models import Node

ATTEMPTS = 8


class CapacityUnavailable(Conflict):
    code = "capacity_unavailable"


class _Taken(Exception):
    """A candidate was taken between the capacity query and the lock."""


@dataclass(frozen=True)
class Placement:
    node_ids: list[int]
    rack_id: int | None  # the rack, for a rack reservation


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


def _attempt_nodes(offer: Offer, quantity: int, start: datetime, end: datetime) -> Placement:
    per_rack = free_nodes_per_rack(offer=offer, start=start, end=end)
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
    return Placement(node_ids=picked, rack_id=None)


def _attempt_rack(offer: Offer, start: datetime, end: datetime) -> Placement:
    racks = free_racks(offer=offer, start=start, end=end, limit=1)
    if not racks:
        raise CapacityUnavailable("No whole rack of this offer is free for that window.", available_racks=0)
    rack = racks[0]
    node_ids = list(Node.objects.filter(rack_id=rack).order_by("id").values_list("id", flat=True))
    nodes_lock(node_ids)
    if rack not in free_racks(offer=offer, start=start, end=end):
        raise _Taken
    return Placement(node_ids=node_ids, rack_id=rack)


def placement_check(*, offer: Offer, quantity: int, start: datetime, end: datetime) -> int:
    """How many nodes placement_pick would give now (a whole rack's, for a rack offer), or the
    CapacityUnavailable it would raise, from the same capacity queries without locking or writing:
    the price step's answer. The pick at confirm time decides; this only says it early."""
    if offer.shape == OfferShape.RACK:
        racks = free_racks(offer=offer, start=start, end=end, limit=1)
        if not racks:
            raise CapacityUnavailable("No whole rack of this offer is free for that window.", available_racks=0)
        return Node.objects.filter(rack_id=racks[0]).count()
    per_rack = free_nodes_per_rack(offer=offer, start=start, end=end)
    if choose_racks(per_rack, quantity) is None:
        raise CapacityUnavailable(
            f"Only {sum(per_rack.values())} of the {quantity} nodes you asked for are free for that window.",
            available_nodes=sum(per_rack.values()),
        )
    return quantity


def placement_pick(*, offer: Offer, quantity: int, start: datetime, end: datetime) -> Placement:
    """Nodes for ``quantity`` nodes (or one whole rack) of ``offer`` over [start, end), locked until the
    caller's transaction ends. Raises CapacityUnavailable."""
    for _attempt in range(ATTEMPTS):
        try:
            with transaction.atomic():
                if offer.shape == OfferShape.RACK:
                    return _attempt_rack(offer, start, end)
                return _attempt_nodes(offer, quantity, start, end)
        except _Taken:
            continue
    raise CapacityUnavailable("The capacity you asked for is being taken by others right now; try again.")
