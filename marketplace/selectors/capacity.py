"""What capacity an offer has free over time, computed in PostgreSQL.

A node can take an offer's work when it is at the offer's site, of its accelerator type, with exactly
``gpus_per_node`` GPUs, and ``available`` (not draining, in maintenance or offline). An instance of
``gpus_per_instance`` GPUs fits in an aligned *slot* of such a node -- GPUs [s, s + size) with s a
multiple of the size, so a 2-GPU slice starts at an even index and a 4-GPU one at 0 or 4, inside one
NVLink/PCIe switch island -- that no live allocation overlapping the period holds a GPU of. A whole
node is the one slot [0, gpus); a rack can take a rack offer when every node in it is wholly free.

Each function is one SQL statement; none loops over the fleet in Python (bench/placement measures
them on 10,000 nodes, docs/benchmarks.md).

Placement's questions (which nodes of the offer's kind are free, or how full, over a window) read the
live allocations of the offer's *pool* -- every offer of its site, accelerator type and node size:
slices, whole nodes and racks share those nodes -- through ``allocation_pool_period_idx`` (offer,
period), each allocation carrying its reservation's offer. That is a few hundred index entries at
10,000 nodes, where asking every node in turn is one index probe per node of the site, and joining the
window's allocations reads the allocations of the whole fleet. An allocation is found through its
offer, so one left on a node after the node changed site, type or GPU count would be missed: the
``exact`` form of each question asks every node itself instead, and placement re-checks the nodes it
picked that way (and falls back to it), so a miss costs a retry, never a GPU given twice.

Power (ARCHITECTURE invariant 8): a rack never has more GPUs committed at once than its budget covers
at their rated power -- the most that the live allocations on its nodes hold at any one moment of a
window, each GPU at its type's TDP, plus what is asked, stays within ``power_budget_kw``. Only racks
whose GPUs, all running, would draw more than the budget can be limited by it (power-limited).
``rack_power`` answers for the racks placement picked, once it holds their locks; with ``power``, the
candidate queries also leave out the site's power-limited racks without room for what is asked (asking
their nodes themselves, always) -- dearer, so placement asks for it only after a pick fell short."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db import connection
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.db.models import IntegerField
from django.db.models.expressions import RawSQL
from django.utils import timezone

from console.kernel.errors import DomainError
from marketplace.models import Allocation, Offer
from provisioning.choices import NodeState
from provisioning.hooks import GpuHolding
from provisioning.models import AcceleratorType, Node, Rack, Site
from provisioning.selectors.fleet import fleet_overview

NODE = Node._meta.db_table
RACK = Rack._meta.db_table
ALLOCATION = Allocation._meta.db_table
OFFER = Offer._meta.db_table
TYPE = AcceleratorType._meta.db_table
SITE = Site._meta.db_table

# Nodes of the offer's kind at its site that can take work. Parameters: site, type, gpus. (The site's
# racks as an array: PostgreSQL then reads their nodes through the rack index, not every node of the
# type in the fleet.)
MATCHING_NODES = f"""
    SELECT n.id, n.rack_id FROM {NODE} n
    WHERE n.rack_id = ANY(ARRAY(SELECT r.id FROM {RACK} r WHERE r.site_id = %(site)s))
      AND n.accelerator_type_id = %(type)s AND n.gpu_count = %(gpus)s AND n.state = '{NodeState.AVAILABLE}'
"""
# Racks at the offer's site made only of such nodes (at least one).
WHOLE_RACKS = f"""
    SELECT r.id FROM {RACK} r
    WHERE r.site_id = %(site)s
      AND EXISTS (SELECT 1 FROM {NODE} n WHERE n.rack_id = r.id)
      AND NOT EXISTS (
          SELECT 1 FROM {NODE} n WHERE n.rack_id = r.id
            AND (n.accelerator_type_id IS DISTINCT FROM %(type)s OR n.gpu_count <> %(gpus)s
                 OR n.state <> '{NodeState.AVAILABLE}'))
"""


# SQL: a live allocation's GPUs as a bitmask (bit i: GPU i held). Sliced nodes have at most
# MAX_SLICED_NODE_GPUS GPUs, so the mask fits a bigint.
MASK = "((1::bigint << upper(a.gpus)) - (1::bigint << lower(a.gpus)))"


def _busy(node: str, lower: str, upper: str) -> str:
    """SQL: the node holds a live allocation of any of its GPUs overlapping [lower, upper)."""
    return (
        f"EXISTS (SELECT 1 FROM {ALLOCATION} a WHERE a.node_id = {node} AND a.live "
        f"AND a.period && tstzrange({lower}, {upper}, '[)'))"
    )


def _slot_range(first: str) -> str:
    return f"int4range({first}, {first} + %(size)s)"


def _params(offer: Offer, **extra) -> dict:
    return {
        "site": offer.site_id,
        "type": offer.accelerator_type_id,
        "gpus": offer.gpus_per_node,
        "size": offer.gpus_per_instance,
        **extra,
    }


def _rows(sql: str, params: dict) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


# The pool's live allocations overlapping [start, end), per node: (node_id, mask), the mask of the GPUs
# held (bit i: GPU i). Parameters: site, type, gpus, start, end.
POOL_HELD = f"""
    SELECT a.node_id, bit_or({MASK}) AS mask
    FROM {OFFER} o JOIN {ALLOCATION} a ON a.offer_id = o.id
    WHERE o.site_id = %(site)s AND o.accelerator_type_id = %(type)s AND o.gpus_per_node = %(gpus)s
      AND a.live AND a.period && tstzrange(%(start)s, %(end)s, '[)')
    GROUP BY a.node_id
"""


def _held(exact: bool) -> str:
    """SQL, after ``FROM ... m``: ``h.mask``, the GPUs of node m held by live allocations overlapping
    [start, end), null when none. From the pool's allocations (a CTE ``held`` of POOL_HELD, which the
    query must define), or, ``exact``, by asking each node's own allocations (the exclusion
    constraint's index, node =, period &&; an aggregate per node, so PostgreSQL probes it node by node
    rather than reading the window's allocations of the whole fleet)."""
    if not exact:
        return "LEFT JOIN held h ON h.node_id = m.id"
    return f"""LEFT JOIN LATERAL (
        SELECT bit_or({MASK}) AS mask FROM {ALLOCATION} a
        WHERE a.node_id = m.id AND a.live AND a.period && tstzrange(%(start)s, %(end)s, '[)')) h ON true"""


def _held_cte(exact: bool) -> str:
    return "" if exact else f"held AS MATERIALIZED ({POOL_HELD})"  # once per query, not per rack


def _with_held(exact: bool) -> str:
    return _with(_held_cte(exact))


# --- Power ---------------------------------------------------------------------------------------

# SQL: the offer's accelerator type's TDP (W): what each GPU placed for it may draw.
OFFER_TDP = f"(SELECT t.tdp_watts FROM {TYPE} t WHERE t.id = %(type)s)"
# SQL: the watts rack ``r`` would draw with every GPU of its nodes running at its type's TDP.
RACK_MOST_W = f"""(SELECT coalesce(sum(n.gpu_count * (SELECT t.tdp_watts FROM {TYPE} t
                                                      WHERE t.id = n.accelerator_type_id)), 0)
                   FROM {NODE} n WHERE n.rack_id = r.id)"""
RACK_BUDGET_W = "(r.power_budget_kw * 1000)::bigint"  # two decimals of kW: whole watts
# SQL: the most the live allocations on rack ``r``'s nodes draw at any one moment of [start, end), each
# GPU at its node's type's TDP. A sweep: each allocation adds its watts at its start (or the window's)
# and takes them away at its end; at one instant ends come before starts (periods are half-open), and
# the highest running sum is the peak. Asked of each node of the rack (its allocations through the
# exclusion constraint's index), never through the offers' pools: power counts every pool's GPUs.
RACK_COMMITTED_W = f"""(SELECT coalesce(max(s.load), 0)::bigint FROM (
        SELECT sum(e.watts) OVER (ORDER BY e.at, e.watts ROWS UNBOUNDED PRECEDING) AS load
        FROM {NODE} n JOIN {TYPE} t ON t.id = n.accelerator_type_id JOIN {ALLOCATION} a ON a.node_id = n.id
             CROSS JOIN LATERAL (VALUES
                 (greatest(lower(a.period), %(start)s::timestamptz), (upper(a.gpus) - lower(a.gpus)) * t.tdp_watts),
                 (upper(a.period), -(upper(a.gpus) - lower(a.gpus)) * t.tdp_watts)) e(at, watts)
        WHERE n.rack_id = r.id AND a.live AND a.period && tstzrange(%(start)s, %(end)s, '[)')) s)"""
# The offer's site's power-limited racks, with their budget and (a CTE named ``power``) the peak
# committed over the window. Parameters: site, start, end.
SITE_POWER = f"""
    SELECT r.id AS rack_id, {RACK_BUDGET_W} AS budget_w, {RACK_COMMITTED_W} AS committed_w
    FROM {RACK} r WHERE r.site_id = %(site)s AND {RACK_MOST_W} > {RACK_BUDGET_W}
"""
# The offer's site's power-limited racks alone (a wholly free rack has nothing committed). Parameter: site.
SITE_POWER_LIMITED = f"SELECT r.id FROM {RACK} r WHERE r.site_id = %(site)s AND {RACK_MOST_W} > {RACK_BUDGET_W}"


@dataclass(frozen=True)
class RackPower:
    """A rack's power over a window, in watts: its budget, what all of its GPUs would draw running at
    their TDP (``most_w``), and the most its live allocations draw at once in the window
    (``committed_w``; 0 for a rack whose budget covers all of its GPUs: nothing can exceed it)."""

    rack_id: int
    label: str  # site/rack, as operators name it
    budget_w: int
    most_w: int
    committed_w: int

    @property
    def limited(self) -> bool:
        return self.most_w > self.budget_w

    def fits(self, watts: int) -> bool:
        return not self.limited or self.committed_w + watts <= self.budget_w


def rack_power(*, racks: list[int], start: datetime, end: datetime) -> dict[int, RackPower]:
    """{rack id: RackPower over [start, end)} for ``racks``, asked of their nodes themselves: placement's
    re-check once it holds the racks' locks, and what a refusal says. One small statement when every
    rack's budget covers all of its GPUs (the common case: nothing to sum; such a rack has no ``label``,
    as nothing refuses for it), a second for the power-limited ones."""
    sql = f"SELECT r.id, {RACK_BUDGET_W}, {RACK_MOST_W} FROM {RACK} r WHERE r.id = ANY(%(racks)s)"
    rows = _rows(sql, {"racks": racks})
    limited = [rack for rack, budget_w, most_w in rows if most_w > budget_w]
    named: dict[int, tuple[str, int]] = {}  # rack: (label, committed W)
    if limited:
        sql = f"""SELECT r.id, s.slug || '/' || r.name, {RACK_COMMITTED_W}
                  FROM {RACK} r JOIN {SITE} s ON s.id = r.site_id WHERE r.id = ANY(%(racks)s)"""
        named = {rack: (label, w) for rack, label, w in _rows(sql, {"racks": limited, "start": start, "end": end})}
    powers = {}
    for rack, budget_w, most_w in rows:
        label, committed_w = named.get(rack, ("", 0))
        powers[rack] = RackPower(rack, label, budget_w, most_w, committed_w)
    return powers


def _with(*ctes: str) -> str:
    """``WITH`` and the named CTEs given (``name AS MATERIALIZED (...)``), or nothing."""
    ctes = [cte for cte in ctes if cte]
    return "WITH " + ", ".join(ctes) if ctes else ""


def free_nodes_per_rack(
    *, offer: Offer, start: datetime, end: datetime, exclude_nodes=(), exact: bool = False, power: bool = False
) -> dict[int, int]:
    """{rack id: nodes free for the whole of [start, end)} for a node offer; with ``power``, no more of a
    rack's than its power budget has room for running at once (racks with room for none left out)."""
    if not power:
        sql = f"""
            {_with_held(exact)}
            SELECT m.rack_id, count(*) FROM ({MATCHING_NODES}) m {_held(exact)}
            WHERE h.mask IS NULL AND m.id <> ALL(%(exclude)s)
            GROUP BY m.rack_id
        """
    else:
        sql = f"""
            {_with(_held_cte(exact), f"power AS MATERIALIZED ({SITE_POWER})")}
            SELECT f.rack_id, least(f.free, coalesce(
                       floor((p.budget_w - p.committed_w) / (%(gpus)s * {OFFER_TDP})::numeric)::int, f.free)) AS n
            FROM (SELECT m.rack_id, count(*)::int AS free FROM ({MATCHING_NODES}) m {_held(exact)}
                  WHERE h.mask IS NULL AND m.id <> ALL(%(exclude)s)
                  GROUP BY m.rack_id) f
            LEFT JOIN power p ON p.rack_id = f.rack_id
        """
    rows = _rows(sql, _params(offer, start=start, end=end, exclude=list(exclude_nodes)))
    return {rack: free for rack, free in rows if free > 0}


def free_nodes_in_racks(*, offer: Offer, start: datetime, end: datetime, racks: list[int]) -> list[tuple[int, int]]:
    """(node id, rack id) of the free nodes in ``racks``, in id order: asked of each node (exact), as
    the nodes picked are then locked and checked again with this."""
    sql = f"""
        SELECT m.id, m.rack_id FROM ({MATCHING_NODES}) m {_held(exact=True)}
        WHERE m.rack_id = ANY(%(racks)s) AND h.mask IS NULL
        ORDER BY m.id
    """
    return _rows(sql, _params(offer, start=start, end=end, racks=racks))


def free_racks(
    *,
    offer: Offer,
    start: datetime,
    end: datetime,
    limit: int | None = None,
    racks: list[int] | None = None,
    exact: bool = False,
    power: bool = False,
) -> list[int]:
    """Racks whose every node can take the rack offer for the whole of [start, end), in id order; with
    ``power``, only those whose budget covers all of their GPUs running (a rack rented whole runs them
    all). With ``racks``: only those, asked of each of their nodes (exact; the re-check of the rack
    picked, whose power placement asks with rack_power)."""
    exact = exact or racks is not None
    free = (
        f"NOT EXISTS (SELECT 1 FROM {NODE} m {_held(exact=True)} WHERE m.rack_id = w.id AND h.mask IS NOT NULL)"
        if exact
        else f"w.id NOT IN (SELECT n.rack_id FROM held JOIN {NODE} n ON n.id = held.node_id)"  # hashed, once
    )
    only = "AND r.id = ANY(%(racks)s)" if racks is not None else ""  # one more condition of WHOLE_RACKS
    powered = f"AND w.id NOT IN ({SITE_POWER_LIMITED})" if power and racks is None else ""
    sql = f"""
        {_with_held(exact)}
        SELECT w.id FROM ({WHOLE_RACKS} {only}) w WHERE {free} {powered}
        ORDER BY w.id
    """ + (" LIMIT %(limit)s" if limit else "")
    return [row[0] for row in _rows(sql, _params(offer, start=start, end=end, limit=limit, racks=racks))]


def held_masks(
    *,
    offer: Offer,
    start: datetime,
    end: datetime,
    limit: int,
    nodes: list[int] | None = None,
    exact: bool = False,
    power: bool = False,
):
    """(node id, held mask, rack id) of matching nodes with a free slot of the offer's size for the whole
    of [start, end), fullest first (then in id order): the candidates of a slice placement; with
    ``power``, only on racks whose power budget has room for the slice. The mask has bit i set when GPU i
    is held by a live allocation overlapping the period. ``nodes``: only these, whether or not a slot is
    free, asked of each node (exact; the re-check after locking them, whose power placement asks with
    rack_power)."""
    exact = exact or nodes is not None
    slot_free = """EXISTS (SELECT 1 FROM generate_series(0, %(gpus)s - %(size)s, %(size)s) s
                           WHERE coalesce(h.mask, 0) & (((1::bigint << %(size)s) - 1) << s) = 0)"""
    where = "m.id = ANY(%(nodes)s)" if nodes is not None else slot_free
    power = power and nodes is None
    if power:
        where += f""" AND m.rack_id NOT IN (
            SELECT p.rack_id FROM power p WHERE p.committed_w + %(size)s * {OFFER_TDP} > p.budget_w)"""
    sql = f"""
        {_with(_held_cte(exact), f"power AS MATERIALIZED ({SITE_POWER})" if power else "")}
        SELECT m.id, coalesce(h.mask, 0), m.rack_id FROM ({MATCHING_NODES}) m {_held(exact)}
        WHERE {where}
        ORDER BY bit_count(coalesce(h.mask, 0)::bit(64)) DESC, m.id
        LIMIT %(limit)s
    """
    return _rows(sql, _params(offer, start=start, end=end, limit=limit, nodes=nodes))


def earliest_fit(*, offer: Offer, quantity: int, start: datetime, duration: timedelta) -> datetime | None:
    """The earliest start at or after ``start`` when ``quantity`` instances (or one whole rack) are free
    for ``duration``; None when the offer does not have that much capacity at all.

    One sweep, not a probe per candidate time (bench/placement measured 12 s for that at 10,000 nodes):
    each free gap [lo, hi) of a slot (a whole node is one slot) lets a window start anywhere in
    [lo, hi - duration]; those ranges become +1/-1 events, and a running sum (per rack, for a rack offer)
    finds the first moment enough slots can start together. A slot's holdings may overlap in time (two
    slices inside one 2-GPU slot), so a gap begins after the latest end so far, not the previous one.
    Cost grows with the live allocations of the offer's nodes after ``start``."""
    if offer.shape == "rack":
        nodes = f"SELECT n.id, n.rack_id FROM {NODE} n WHERE n.rack_id IN ({WHOLE_RACKS})"
        partition = "PARTITION BY e.rack_id"
        answer = """SELECT min(r.t) FROM running r
                    JOIN (SELECT rack_id, count(*) AS size FROM nodes GROUP BY rack_id) z ON z.rack_id = r.rack_id
                    WHERE r.free >= z.size"""
    else:
        nodes, partition = MATCHING_NODES, ""
        answer = "SELECT min(t) FROM running WHERE free >= %(quantity)s"
    sql = f"""
        WITH nodes AS ({nodes}),
        slots AS (
            SELECT nodes.id AS node_id, nodes.rack_id, s AS first
            FROM nodes, generate_series(0, %(gpus)s - %(size)s, %(size)s) s
        ),
        held AS (
            SELECT sl.node_id, sl.first, lower(a.period) AS lo, upper(a.period) AS hi
            FROM {ALLOCATION} a JOIN slots sl ON sl.node_id = a.node_id
            WHERE a.live AND upper(a.period) > %(start)s AND a.gpus && {_slot_range("sl.first")}
        ),
        gaps AS (  -- free [lo, hi) per slot: before each holding, and after the last one
            SELECT node_id, first,
                   greatest(coalesce(max(hi) OVER (PARTITION BY node_id, first ORDER BY lo
                                                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                                     %(start)s), %(start)s) AS lo,
                   lo AS hi
            FROM held
            UNION ALL
            SELECT sl.node_id, sl.first, greatest(coalesce(max(held.hi), %(start)s), %(start)s),
                   'infinity'::timestamptz
            FROM slots sl LEFT JOIN held ON held.node_id = sl.node_id AND held.first = sl.first
            GROUP BY sl.node_id, sl.first
        ),
        starts AS (  -- when a window of the duration can start in each gap
            SELECT g.node_id, g.lo AS first, g.hi - %(duration)s AS last FROM gaps g WHERE g.hi - %(duration)s >= g.lo
        ),
        events AS (
            SELECT m.rack_id, s.first AS t, 1 AS delta, 0 AS ord FROM starts s JOIN nodes m ON m.id = s.node_id
            UNION ALL
            SELECT m.rack_id, s.last, -1, 1 FROM starts s JOIN nodes m ON m.id = s.node_id
            WHERE s.last < 'infinity'::timestamptz
        ),
        running AS (
            SELECT e.rack_id, e.t, sum(e.delta) OVER ({partition} ORDER BY e.t, e.ord ROWS UNBOUNDED PRECEDING) AS free
            FROM events e
        )
        {answer}
    """
    rows = _rows(sql, _params(offer, start=start, duration=duration, quantity=quantity))
    return rows[0][0] if rows and rows[0][0] is not None else None


def instance_counts() -> tuple[RawSQL, RawSQL]:
    """Correlated to an outer query of offers (the catalog): its instances on nodes that can take work,
    and those whose GPUs no live allocation holds now -- the statement's now, as the node counts' (Django's
    ``Now``): a reservation made earlier in the same transaction is held, not yet to come."""
    offer = Offer._meta.db_table
    slots = f"""
        FROM {NODE} n JOIN {RACK} r ON r.id = n.rack_id,
             generate_series(0, n.gpu_count - {offer}.gpus_per_instance, {offer}.gpus_per_instance) s
        WHERE r.site_id = {offer}.site_id AND n.accelerator_type_id = {offer}.accelerator_type_id
          AND n.gpu_count = {offer}.gpus_per_node AND n.state = '{NodeState.AVAILABLE}'
    """
    free = f"""
        AND NOT EXISTS (SELECT 1 FROM {ALLOCATION} a WHERE a.node_id = n.id AND a.live
                        AND a.period @> statement_timestamp()
                        AND a.gpus && int4range(s, s + {offer}.gpus_per_instance))
    """
    total = RawSQL(f"(SELECT count(*) {slots})", [], output_field=IntegerField())
    available = RawSQL(f"(SELECT count(*) {slots} {free})", [], output_field=IntegerField())
    return total, available


@dataclass(frozen=True)
class HourlyAvailability:
    hour: datetime
    free: int  # instances (a whole node is one) for a node offer, racks for a rack offer
    total: int
    free_gpus: int  # the GPUs of those: instances × GPUs per instance, or the free racks' GPUs
    total_gpus: int


def availability_by_hour(*, offer: Offer, start: datetime, end: datetime) -> list[HourlyAvailability]:
    """Free instances (or racks) of an offer, and their GPUs, for each hour of [start, end); ``start`` is
    floored to the hour."""
    if offer.shape == "rack":
        sql = f"""
            WITH hours AS (SELECT h FROM generate_series(date_trunc('hour', %(start)s::timestamptz),
                                                         %(end)s::timestamptz - interval '1 microsecond',
                                                         interval '1 hour') h),
            racks AS (SELECT w.id, (SELECT sum(n.gpu_count) FROM {NODE} n WHERE n.rack_id = w.id) AS gpus
                      FROM ({WHOLE_RACKS}) w),
            free AS (SELECT hours.h, w.id, w.gpus, NOT EXISTS (
                         SELECT 1 FROM {NODE} n WHERE n.rack_id = w.id
                           AND {_busy("n.id", "hours.h", "hours.h + interval '1 hour'")}) AS free
                     FROM hours LEFT JOIN racks w ON true)
            SELECT h, count(id) FILTER (WHERE free), count(id),
                   coalesce(sum(gpus) FILTER (WHERE free), 0), coalesce(sum(gpus), 0)
            FROM free GROUP BY h ORDER BY h
        """
    else:
        # Free = every slot, less the slots some live allocation touches in that hour. Only the nodes
        # holding something in the window are looked at, each allocation only in the hours it covers, so
        # the cost follows what is booked, not slots × hours (80,000 slots of a 1-GPU offer × 336 hours).
        if offer.is_whole_node:  # one slot per node: held when anything of it is
            taken = "SELECT b.h, count(*) AS n FROM busy b GROUP BY b.h"
        else:
            taken = """SELECT b.h, count(*) AS n FROM busy b, generate_series(0, %(gpus)s - %(size)s, %(size)s) s
                       WHERE b.mask & (((1::bigint << %(size)s) - 1) << s) <> 0 GROUP BY b.h"""
        mask = "0::bigint" if offer.is_whole_node else f"bit_or({MASK})"
        sql = f"""
            WITH hours AS (SELECT h FROM generate_series(date_trunc('hour', %(start)s::timestamptz),
                                                         %(end)s::timestamptz - interval '1 microsecond',
                                                         interval '1 hour') h),
            m AS ({MATCHING_NODES}),
            covered AS (  -- each live allocation of those nodes, once per hour of the window it touches
                SELECT a.node_id, a.gpus, h
                FROM {ALLOCATION} a JOIN m ON m.id = a.node_id,
                     generate_series(
                         date_trunc('hour', greatest(lower(a.period), date_trunc('hour', %(start)s::timestamptz))),
                         least(upper(a.period), %(end)s::timestamptz) - interval '1 microsecond',
                         interval '1 hour') h
                WHERE a.live AND a.period && tstzrange(date_trunc('hour', %(start)s::timestamptz), %(end)s, '[)')
            ),
            busy AS (SELECT a.h, a.node_id, {mask} AS mask FROM covered a GROUP BY a.h, a.node_id),
            taken AS ({taken}),
            total AS (SELECT count(*) * (%(gpus)s / %(size)s) AS n FROM m)
            SELECT hours.h, total.n - coalesce(taken.n, 0), total.n
            FROM hours CROSS JOIN total LEFT JOIN taken ON taken.h = hours.h ORDER BY hours.h
        """
    rows = _rows(sql, _params(offer, start=start, end=end))
    if offer.shape == "rack":
        return [HourlyAvailability(*row) for row in rows]
    size = offer.gpus_per_instance
    return [HourlyAvailability(hour, free, total, free * size, total * size) for hour, free, total in rows]


MAX_CALENDAR = timedelta(days=14)
MAX_ADVANCE = timedelta(days=366)  # how far ahead a reservation may start, so its calendar too


def availability_window(*, start: datetime | None = None, end: datetime | None = None) -> tuple[datetime, datetime]:
    """The calendar's range: defaults to this hour and the next 24; at most 14 days, starting at most
    MAX_ADVANCE ahead (checked before an end is computed from the start, so none leaves the calendar)."""
    now = timezone.now()
    start = (start or now).replace(minute=0, second=0, microsecond=0)
    if start > now + MAX_ADVANCE:
        raise DomainError(
            f"The calendar shows at most {MAX_ADVANCE.days} days ahead, as far as reservations can start.",
            fields={"start": [f"At most {MAX_ADVANCE.days} days from now."]},
        )
    end = end or start + timedelta(hours=24)
    if end <= start:
        raise DomainError("end must be after start.", fields={"end": ["Must be after start."]})
    if end - start > MAX_CALENDAR:
        raise DomainError(
            "The calendar covers at most 14 days at a time.", fields={"end": ["At most 14 days after start."]}
        )
    return start, end


def gpus_held_now(*, node_ids=None) -> dict[int, set[int]]:
    """{node id: the indices of its GPUs a live allocation holds at this moment}, for the operators'
    occupancy views (the fleet heatmap, /metrics). Nodes holding nothing are absent."""
    allocations = Allocation.objects.filter(live=True, period__contains=timezone.now())
    if node_ids is not None:
        allocations = allocations.filter(node_id__in=node_ids)
    held: dict[int, set[int]] = {}
    for node_id, gpus in allocations.values_list("node_id", "gpus"):
        held.setdefault(node_id, set()).update(range(gpus.lower, gpus.upper))
    return held


def node_gpu_holdings(*, node_id: int, start: datetime, end: datetime) -> list[GpuHolding]:
    """Who holds which GPUs of a node when, at some time in [start, end): the node's occupancy on its
    admin page (registered as provisioning.hooks.node_occupancy). A live allocation holds its GPUs for
    its period; one no longer live held them until its reservation really ended (released, cancelled,
    failed) -- nothing, if that was before its start (cancelled while pending)."""
    allocations = (
        Allocation.objects.filter(node_id=node_id, period__overlap=DateTimeTZRange(start, end, "[)"))
        .select_related("reservation__organization")
        .order_by("period", "gpus")
    )
    holdings = []
    for allocation in allocations:
        reservation = allocation.reservation
        held_from, held_to = allocation.period.lower, allocation.period.upper
        if not allocation.live and reservation.ended_at is not None:
            held_to = min(held_to, reservation.ended_at)
        if held_to <= max(held_from, start):
            continue
        holdings.append(
            GpuHolding(
                gpus=allocation.gpu_indices,
                start=held_from,
                end=held_to,
                label=f"{reservation.id.hex[:8]} · {reservation.organization.name}",
                state=reservation.state,
                holder=reservation,
            )
        )
    return holdings


def fleet_occupancy() -> dict:
    """The operators' fleet overview (provisioning.selectors.fleet) with each node's GPUs marked rented
    or free now (a node can be partly rented), the GPUs rented per site and in all, and each rack's
    committed power: the GPUs held on it now at their type's TDP, in kW (``committed_kw``) and as a share
    of its budget (``committed_percent``, at most 100) -- what placement keeps within the budget. The
    fleet is provisioning's, who rents it is marketplace's, so they meet here."""
    overview, held = fleet_overview(), gpus_held_now()
    overview["totals"]["rented"] = 0
    for site in overview["sites"]:
        site["counts"]["rented"] = 0
        for rack in site["racks"]:
            committed_w = 0
            for entry in rack["nodes"]:
                node = entry["node"]
                taken = held.get(node.pk, set())
                entry["gpus"] = [{"index": i, "rented": i in taken} for i in range(node.gpu_count)]
                entry["rented"] = sum(1 for i in taken if i < node.gpu_count)
                site["counts"]["rented"] += entry["rented"]
                if node.accelerator_type is not None:
                    committed_w += len(taken) * node.accelerator_type.tdp_watts
            budget_w = rack["rack"].power_budget_kw * 1000
            rack["committed_kw"] = Decimal(committed_w) / 1000  # exact: 2100 W is 2.1, 350 W 0.35
            rack["committed_percent"] = min(100.0, round(float(100 * committed_w / budget_w), 1)) if budget_w else 100.0
            rack["committed_over"] = committed_w > budget_w
        overview["totals"]["rented"] += site["counts"]["rented"]
    return overview
