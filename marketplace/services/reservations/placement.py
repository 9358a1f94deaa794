"""Placement: which GPUs of which nodes a reservation gets. Called inside the reservation's transaction.

Whole nodes and racks take nodes no one holds any GPU of, packed into as few racks as fit (so big free
racks stay whole for rack requests). A slice takes an aligned slot (marketplace.selectors.capacity) of
the node where it fits most tightly -- the fullest node with room, and on it the slot whose free
enclosing block is smallest (a buddy allocator's best fit) -- so partly used nodes fill first and big
free holes stay whole for big requests.

The pick is optimistic and then made safe: candidates come from one capacity query (over the pool's
allocations, marketplace.selectors.capacity), their racks' rows and then their node rows are locked in
id order (nodes_lock; a fixed order, so two placements never wait on each other in a cycle; MEASURED.md
saw deadlocks without it), and a fresh
statement asks the nodes themselves again. If a competitor took one meanwhile, the attempt's savepoint
is rolled back (releasing its locks) and placement runs again; the last attempt asks every node itself
from the start (``exact``), so an allocation the pool's index cannot see costs retries, not a refusal.
The exclusion constraint on allocations stays the last word.

Power (ARCHITECTURE invariant 8): once the picked nodes are locked, ``rack_power`` asks their racks
whether their power budgets have room for the GPUs over the window (one statement; a rack whose budget
covers all of its GPUs running needs no sum). The lock covers the racks too -- nodes_lock takes the
racks' rows, then the nodes', each in id order -- because power is a sum over a rack's nodes: two
placements on two nodes of one rack would otherwise each see room for themselves alone. The first
attempt picks by GPUs alone; if a rack it picked is short, the attempts after it weigh power in the
candidate queries (marketplace.selectors.capacity: dearer, as they ask every power-limited rack of the
site, and needed only where power binds). When power, not GPUs, is what is missing, the refusal says
so (PowerBudgetExceeded: which rack, what is committed of its budget, what more was asked)."""

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction

from console.kernel.errors import Conflict
from marketplace.choices import OfferShape
from marketplace.models import Offer
from marketplace.selectors.capacity import (
    RackPower,
    free_nodes_in_racks,
    free_nodes_per_rack,
    free_racks,
    held_masks,
    rack_power,
)
from provisioning.models import Node, Rack

ATTEMPTS = 8


class CapacityUnavailable(Conflict):
    code = "capacity_unavailable"


class PowerBudgetExceeded(CapacityUnavailable):
    """GPUs are free, but running them would take a rack past its power budget. The same 409 and code
    as any capacity refusal; ``reason`` "power_budget" and the rack's figures say why."""


def _kw(watts: int) -> str:
    """Watts as kW, to the 10 W and no trailing zeros: 9,800 → "9.8", 350 → "0.35", 44,000 → "44"."""
    return f"{watts / 1000:,.2f}".rstrip("0").rstrip(".")


def _gpus(count: int, offer: Offer) -> str:
    tdp = offer.accelerator_type.tdp_watts
    each = f"{tdp:,} W" if count == 1 else f"{tdp:,} W each"
    return f"{count} more {offer.accelerator_type.model} GPU{'s' if count != 1 else ''} ({each})"


def power_refusal(power: RackPower, *, gpus: int, offer: Offer, when: str = "for that window") -> PowerBudgetExceeded:
    """The refusal for ``gpus`` more GPUs of ``offer``'s type on a rack whose budget has no room for them."""
    return PowerBudgetExceeded(
        f"Rack {power.label} is at its power budget {when}: {_kw(power.committed_w)} of {_kw(power.budget_w)} kW "
        f"committed; {_gpus(gpus, offer)} would exceed it.",
        reason="power_budget",
        rack=power.label,
        committed_kw=power.committed_w / 1000,
        budget_kw=power.budget_w / 1000,
        requested_kw=gpus * offer.accelerator_type.tdp_watts / 1000,
    )


def power_short(*, offer: Offer, gpus_by_rack: dict[int, int], start: datetime, end: datetime) -> RackPower | None:
    """The first rack of ``gpus_by_rack`` (rack id: GPUs of ``offer``'s type to add there) whose power
    budget has no room for them over [start, end), or None: asked of the racks' nodes now, so the caller
    holds the racks' locks (nodes_lock) for the answer to stay true."""
    power = rack_power(racks=sorted(gpus_by_rack), start=start, end=end)
    for rack, gpus in sorted(gpus_by_rack.items()):
        # The type's TDP only for a rack power can limit: nothing more to read for the others.
        if rack in power and power[rack].limited and not power[rack].fits(gpus * offer.accelerator_type.tdp_watts):
            return power[rack]
    return None


class _Taken(Exception):
    """A candidate was taken between the capacity query and the lock."""


class _PowerShort(Exception):
    """A rack picked has no power left for what was asked (picked by GPUs alone, or a competitor's GPUs
    took the rest meanwhile): pick again, with power weighed in the candidate queries."""


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


# Locks the racks in id order, then the nodes in id order, in one statement: the node query's condition
# on the racks CTE (always true: it is there to be evaluated first) has no column of the node, so
# PostgreSQL evaluates it once, before it reads the first node (a one-time filter), and count(*) reads
# the CTE -- locking every rack -- to its end; the nodes are locked as the sorted rows leave, after all
# of that.
_LOCK = f"""
    WITH racks AS MATERIALIZED (
        SELECT r.id FROM {Rack._meta.db_table} r WHERE r.id = ANY(%(racks)s) ORDER BY r.id FOR UPDATE
    )
    SELECT n.id, n.rack_id FROM {Node._meta.db_table} n
    WHERE n.id = ANY(%(nodes)s) AND (SELECT count(*) FROM racks) >= 0
    ORDER BY n.id FOR UPDATE
"""


def nodes_lock(*, node_ids: list[int], rack_ids: list[int]) -> bool:
    """Lock the racks ``rack_ids``, then the nodes ``node_ids``, each in id order: every writer that holds
    nodes locks them this way, with their racks (a fixed order: no two wait on each other in a cycle;
    and a rack's power is a sum over its nodes, which the rack's lock keeps anyone else from adding to
    meanwhile). False, with the locks taken, if a node is no longer in one of those racks (it moved since
    it was read): the caller reads again."""
    with connection.cursor() as cursor:
        cursor.execute(_LOCK, {"racks": sorted(set(rack_ids)), "nodes": sorted(node_ids)})
        racks = dict(cursor.fetchall())
    return all(racks.get(node) in rack_ids for node in node_ids)


def _lock(node_ids: list[int], rack_ids: list[int]) -> None:
    if not nodes_lock(node_ids=node_ids, rack_ids=rack_ids):
        raise _Taken


def _nodes_refusal(
    offer: Offer, quantity: int, start: datetime, end: datetime, per_rack: dict[int, int], *, power: bool
) -> CapacityUnavailable:
    """Too few nodes for ``quantity``, ``per_rack`` being the free ones (``power``: those that can run
    within their racks' budgets): a PowerBudgetExceeded naming the rack that holds back the most free
    nodes when power is part of it."""
    available = sum(per_rack.values())
    free = free_nodes_per_rack(offer=offer, start=start, end=end) if power else per_rack
    held_back = {rack: count - per_rack.get(rack, 0) for rack, count in free.items() if count > per_rack.get(rack, 0)}
    if not held_back:
        return CapacityUnavailable(
            f"Only {available} of the {quantity} nodes you asked for are free for that window.",
            available_nodes=available,
        )
    rack = max(held_back, key=lambda r: (held_back[r], -r))
    why = power_refusal(rack_power(racks=[rack], start=start, end=end)[rack], gpus=offer.gpus_per_node, offer=offer)
    return PowerBudgetExceeded(
        f"Only {available} of the {quantity} nodes you asked for can run within their racks' power budgets for "
        f"that window ({_are_free(sum(free.values()))}). {why.message}",
        **why.details,
        available_nodes=available,
    )


def _are_free(count: int) -> str:
    return f"{count} {'is' if count == 1 else 'are'} free"


def _power_fits(offer: Offer, start: datetime, end: datetime, gpus_by_rack: dict[int, int]) -> None:
    """_PowerShort unless every rack of ``gpus_by_rack`` (rack id: GPUs to add) has room for them."""
    if power_short(offer=offer, gpus_by_rack=gpus_by_rack, start=start, end=end) is not None:
        raise _PowerShort


def _attempt_nodes(
    offer: Offer, quantity: int, start: datetime, end: datetime, *, exact: bool, power: bool, lock: bool
) -> Placement:
    per_rack = free_nodes_per_rack(offer=offer, start=start, end=end, exact=exact, power=power)
    plan = choose_racks(per_rack, quantity)
    if plan is None:
        raise _nodes_refusal(offer, quantity, start, end, per_rack, power=power)
    free = free_nodes_in_racks(offer=offer, start=start, end=end, racks=list(plan))
    picked: list[int] = []
    for rack, count in plan.items():
        picked += [node for node, node_rack in free if node_rack == rack][:count]
    if len(picked) < quantity:  # some went between the two queries
        raise _Taken
    if lock:
        _lock(picked, list(plan))
        still_free = {node for node, _ in free_nodes_in_racks(offer=offer, start=start, end=end, racks=list(plan))}
        if not set(picked) <= still_free:
            raise _Taken
    _power_fits(offer, start, end, {rack: count * offer.gpus_per_node for rack, count in plan.items()})
    return Placement(node_ids=picked, rack_id=None, gpus=_whole(offer, picked))


def _whole(offer: Offer, node_ids: list[int]) -> dict[int, tuple[int, int]]:
    return {node: (0, offer.gpus_per_node) for node in node_ids}


def _slice_refusal(offer: Offer, start: datetime, end: datetime, *, power: bool) -> CapacityUnavailable:
    """No slice fits (``power``: on a rack with room for it): a PowerBudgetExceeded naming the rack of
    free slots with the most room when power is what is missing, else no slot is free."""
    if power:
        free = held_masks(offer=offer, start=start, end=end, limit=CANDIDATES)
        racks = rack_power(racks=sorted({rack for _node, _mask, rack in free}), start=start, end=end)
        limited = [p for p in racks.values() if p.limited]
        if limited:
            closest = min(limited, key=lambda p: (p.committed_w - p.budget_w, p.rack_id))
            return power_refusal(closest, gpus=offer.gpus_per_instance, offer=offer)
    return CapacityUnavailable(
        f"No {offer.gpus_per_instance}-GPU slice of this offer is free for that window.", available_instances=0
    )


def _best_slot(offer: Offer, candidates: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """(node, first GPU) of the tightest fit among ``candidates`` (node, held mask, rack), fullest first;
    None if none has a free slot."""
    choices = []
    for order, (node, held, _rack) in enumerate(candidates):
        slot = slot_choose(held=held, node_gpus=offer.gpus_per_node, size=offer.gpus_per_instance)
        if slot is not None:
            block, first = slot
            choices.append((-held.bit_count(), block, order, node, first))
    if not choices:
        return None
    *_key, node, first = min(choices)
    return node, first


def _attempt_slice(offer: Offer, start: datetime, end: datetime, *, exact: bool, power: bool, lock: bool) -> Placement:
    candidates = held_masks(offer=offer, start=start, end=end, limit=CANDIDATES, exact=exact, power=power)
    best = _best_slot(offer, candidates)
    if best is None:
        raise _slice_refusal(offer, start, end, power=power)
    node, first = best
    rack = next(rack for each, _held, rack in candidates if each == node)
    if lock:
        _lock([node], [rack])
        now = held_masks(offer=offer, start=start, end=end, limit=1, nodes=[node])
        if not now or now[0][1] & slot_mask(first, offer.gpus_per_instance):  # taken, or the node left
            raise _Taken
    _power_fits(offer, start, end, {rack: offer.gpus_per_instance})
    return Placement(node_ids=[node], rack_id=None, gpus={node: (first, first + offer.gpus_per_instance)})


def _rack_refusal(offer: Offer, start: datetime, end: datetime, *, power: bool) -> CapacityUnavailable:
    """No whole rack (``power``: whose budget covers all of its GPUs running, as a rack rented whole
    runs them): a PowerBudgetExceeded when a rack is free but power is what it lacks."""
    unpowered = free_racks(offer=offer, start=start, end=end, limit=1) if power else []
    power_ = rack_power(racks=unpowered, start=start, end=end)[unpowered[0]] if unpowered else None
    if power_ is not None and power_.limited:
        tdp, model = offer.accelerator_type.tdp_watts, offer.accelerator_type.model
        return PowerBudgetExceeded(
            f"Rack {power_.label} is free, but its power budget ({_kw(power_.budget_w)} kW) covers only "
            f"{power_.budget_w // tdp} of its {power_.most_w // tdp} {model} GPUs running ({tdp:,} W each): it "
            "cannot be rented whole.",
            reason="power_budget",
            rack=power_.label,
            committed_kw=power_.committed_w / 1000,
            budget_kw=power_.budget_w / 1000,
            requested_kw=power_.most_w / 1000,
            available_racks=0,
        )
    return CapacityUnavailable("No whole rack of this offer is free for that window.", available_racks=0)


def _attempt_rack(offer: Offer, start: datetime, end: datetime, *, exact: bool, power: bool, lock: bool) -> Placement:
    racks = free_racks(offer=offer, start=start, end=end, limit=1, exact=exact, power=power)
    if not racks:
        raise _rack_refusal(offer, start, end, power=power)
    rack = racks[0]
    node_ids = list(Node.objects.filter(rack_id=rack).order_by("id").values_list("id", flat=True))
    if lock:
        _lock(node_ids, [rack])
        if not free_racks(offer=offer, start=start, end=end, racks=[rack]):
            raise _Taken
    _power_fits(offer, start, end, {rack: len(node_ids) * offer.gpus_per_node})
    return Placement(node_ids=node_ids, rack_id=rack, gpus=_whole(offer, node_ids))


def _place(offer: Offer, quantity: int, start: datetime, end: datetime, *, lock: bool) -> Placement:
    """The placement loop of placement_pick (``lock``) and placement_check. The first attempt picks by
    GPUs alone and asks the picked racks' power after (one statement); only when that finds a rack
    short do the attempts after it weigh power in the candidate queries (for every power-limited rack
    of the site: dearer, and needed only where power binds)."""
    power = False
    for attempt in range(ATTEMPTS):
        exact = attempt == ATTEMPTS - 1
        how = {"exact": exact, "power": power, "lock": lock}
        try:
            with transaction.atomic() if lock else nullcontext():  # a savepoint: its locks go with it
                if offer.shape == OfferShape.RACK:
                    return _attempt_rack(offer, start, end, **how)
                if offer.is_slice:
                    return _attempt_slice(offer, start, end, **how)
                return _attempt_nodes(offer, quantity, start, end, **how)
        except _PowerShort:
            power = True
        except _Taken:
            continue
    raise CapacityUnavailable("The capacity you asked for is being taken by others right now; try again.")


def placement_check(*, offer: Offer, quantity: int, start: datetime, end: datetime) -> int:
    """How many nodes placement_pick would give now (a whole rack's, for a rack offer; one, for a slice), or the
    CapacityUnavailable it would raise, from the same capacity queries without locking or writing:
    the price step's answer. The pick at confirm time decides; this only says it early."""
    return len(_place(offer, quantity, start, end, lock=False).node_ids)


def placement_pick(*, offer: Offer, quantity: int, start: datetime, end: datetime) -> Placement:
    """GPUs for ``quantity`` whole nodes, one whole rack or one slice of ``offer`` over [start, end), their
    nodes locked (and their racks) until the caller's transaction ends. Raises CapacityUnavailable
    (PowerBudgetExceeded when the GPUs are free but a rack's power budget has no room for them)."""
    return _place(offer, quantity, start, end, lock=True)
