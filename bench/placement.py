#!/usr/bin/env python
"""Placement benchmark (issues 3 and 12): how fast the console places reservations -- GPU slices,
whole nodes and racks -- on a 10,000-node fleet of 80,000 GPUs.

It measures, in one run and on one machine:

1. **Placement in process.** ``placement_pick`` (the capacity query, the row locks and the re-check)
   for each shape -- a 1-, 2- or 4-GPU slice, 1-8 whole nodes, one rack -- on a fleet where about half
   the nodes hold live allocations over the next weeks, some of them only some of their GPUs (slices
   and whole nodes share the nodes); random offers and windows, each pick rolled back so every sample
   sees the same fleet. Then the whole ``reservation_create`` (quota check, placement, rows written,
   hold, commit, events), committed. p50/p99 of each, and SQL statements per call. A few requests that
   cannot be placed show what a refusal costs (it also searches for the earliest window).
2. **One request, in process.** ``GET /api/v1/me/`` and ``POST /api/v1/reservations/`` through
   Django's test client, and a profile of the POST: the time of each of its steps (authentication,
   validation, tenant lock, quota, placement, insert, hold, commit, events, response), timed inside
   the same requests.
3. **Reservations through the API.** ``POST /api/v1/reservations/`` (one instance: a slice or a whole
   node) from 32 concurrent connections (wrk) for a fixed time, beside the ceiling measured in the
   same run: the bare authenticated endpoint ``GET /api/v1/me/``, same server, same keys. Each is
   repeated (3 times by default, interleaved) and the medians and the ratio reservations / ceiling are
   reported.

The fleet lives in a dedicated database (``neocloud_bench`` on the local PostgreSQL by default),
dropped and recreated at the start. The server (uvicorn with 2 workers, or daphne) runs as a
subprocess on 127.0.0.1 and is stopped at the end, also on errors. Progress goes to stderr; the
table of results to stdout and a JSON file to ``bench/results/placement-<date>.json``.

    .venv/bin/python bench/placement.py                 # everything, about 8 minutes
    .venv/bin/python bench/placement.py --skip-api      # in process only
    .venv/bin/python bench/placement.py --server both   # uvicorn and daphne

Needs the project's venv, PostgreSQL and Redis (``DATABASE_URL``/``REDIS_URL`` or the local
defaults) and, for the API part, ``wrk`` (``apt-get install wrk``). Nothing here asserts on time:
machines are noisy, so read medians and ratios, and compare only numbers from the same run (the load
average before and after is recorded: other work on the machine shows there).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from database import accelerator_types_create, bench_database_url, database_recreate  # bench/database.py

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/neocloud_bench"
HUGE_QUOTA = "100000000"  # DEFAULT_GPU_QUOTA for the benchmark: quotas are not what is measured
HUGE_CREDIT = "99999999999.99"  # each tenant's credit: holds are not what refuses here either
SITES, NODES_PER_RACK = 10, 8
# Racks' power budgets: 64 H100 or H200 GPUs at 700 W draw 44.8 kW, so most racks' budget covers them
# all running (as a hall's racks are built); one rack in seven has less, and power limits what it runs
# at once (57 GPUs), so some placements meet it.
RACK_BUDGET_KW, LIMITED_RACK_BUDGET_KW, LIMITED_RACK_EVERY = Decimal("48"), Decimal("40"), 7
RUN = f"{time.time_ns():x}"  # this run's tenants, beside those of the runs before on a reused fleet
BACKGROUND_DAYS = 35  # pre-existing allocations cover this much of the future
API_HORIZON_DAYS = 360  # API reservations start at random within this (the limit is 366)


if str(ROOT) not in sys.path:  # run as a script: the project is importable
    sys.path.insert(0, str(ROOT))
from console.kernel.progress import Progress, say  # noqa: E402 - the bar the management commands show

# --- Statistics --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(samples_ns: list[int]) -> dict:
    ms = [s / 1e6 for s in samples_ns]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
    }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- Environment and database ------------------------------------------------------------------


def configure_environment(database_url: str) -> dict[str, str]:
    """Settings for this process and the server it starts (the project reads them from the env)."""
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "DJANGO_SETTINGS_MODULE": "console.settings.development",
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DEFAULT_GPU_QUOTA": HUGE_QUOTA,
            # The server's ceiling is measured, not the per-key budgets (console.kernel.throttling).
            "API_THROTTLE_READ": "off",
            "API_THROTTLE_WRITE": "off",
            "API_THROTTLE_EXPENSIVE": "off",
        }
    )
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # no per-request log lines in the measurement
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return dict(os.environ)


def django_setup() -> None:
    import django

    django.setup()


# --- The fleet ---------------------------------------------------------------------------------


# What a placement can be asked for: a slice of 1, 2 or 4 GPUs of a node, whole nodes (1-8 of them) or
# a whole rack. Each shape is measured on its own (its own p50/p99).
SLICE_SIZES = (1, 2, 4)
SHAPES = ("1 GPU", "2 GPUs", "4 GPUs", "node", "rack")
SLICED_SHARE = 0.3  # of the busy nodes: rented as slices rather than whole


@dataclass
class Fleet:
    node_offers: list = field(default_factory=list)  # whole nodes, one per (site, type)
    slice_offers: dict = field(default_factory=dict)  # GPUs per instance → offers, one per (site, type)
    rack_offers: list = field(default_factory=list)
    nodes: int = 0
    racks: int = 0
    nodes_per_offer: dict = field(default_factory=dict)
    allocations: int = 0
    busy_nodes: int = 0
    sliced_nodes: int = 0
    slice_allocations: int = 0

    def offers_for(self, shape: str) -> list:
        if shape == "node":
            return self.node_offers
        if shape == "rack":
            return self.rack_offers
        return self.slice_offers[int(shape.split()[0])]

    @property
    def instance_offers(self) -> list:
        """Every offer a POST rents one instance of (quantity 1): slices and whole nodes."""
        return [*self.node_offers, *(offer for size in SLICE_SIZES for offer in self.slice_offers[size])]


def slice_blocks(rng: random.Random, first: int = 0, size: int = 8, top: bool = True) -> list[tuple[int, int]]:
    """A sliced node's GPUs cut into aligned blocks (first, size) as tenants rent them: the node is split
    in halves, and each half is split again or not, down to single GPUs (so blocks of 4, 2 and 1)."""
    if size > 1 and (top or rng.random() < 0.5):
        half = size // 2
        return slice_blocks(rng, first, half, False) + slice_blocks(rng, first + half, half, False)
    return [(first, size)]


def fleet_seed(*, nodes: int, rng: random.Random, now: datetime) -> Fleet:
    """10 sites × N racks × 8 nodes of 8 GPUs, racks alternating H100 and H200; offers of 1-, 2- and
    4-GPU slices and of whole nodes per (site, type), all sharing the type's nodes, and a rack offer for
    H100 at each site. Racks: a quarter fully busy, a quarter free, half with 4 busy nodes; one in seven
    power-limited (RACK_BUDGET_KW, LIMITED_RACK_BUDGET_KW: the background below ignores it). A busy node
    is rented whole (70 %: back-to-back whole-node allocations, gaps of up to 8 h) or as slices (30 %:
    its GPUs cut into aligned blocks of 4, 2 and 1, each block rented back to back for 8-96 h with gaps
    of up to 12 h, and now and then a block left idle), over the next 35 days: a window in the next
    weeks finds about half the nodes held, and some of them partly."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db.backends.postgresql.psycopg_any import DateTimeTZRange, NumericRange

    from marketplace.choices import OfferShape, ReservationState
    from marketplace.models import Allocation, Offer, Reservation
    from marketplace.services.tenancy.members import organization_create, user_create
    from provisioning.choices import NodeState, SiteKind
    from provisioning.models import Node, Rack, Site

    fleet = Fleet()
    racks_per_site = max(1, round(nodes / (SITES * NODES_PER_RACK)))
    types = accelerator_types_create()
    sites = Site.objects.bulk_create(
        Site(slug=f"bench-{s:02d}", name=f"Bench {s:02d}", region="eu-central", kind=SiteKind.HALL, location="Bench")
        for s in range(SITES)
    )
    racks = Rack.objects.bulk_create(
        Rack(
            site=site,
            name=f"r{r:03d}",
            power_budget_kw=LIMITED_RACK_BUDGET_KW
            if r % LIMITED_RACK_EVERY == LIMITED_RACK_EVERY - 1
            else RACK_BUDGET_KW,
        )
        for site in sites
        for r in range(racks_per_site)
    )
    fleet.racks = len(racks)
    rack_type = {rack.pk: types[i % racks_per_site % 2] for i, rack in enumerate(racks)}
    unavailable = [NodeState.DRAINING, NodeState.MAINTENANCE, NodeState.OFFLINE]
    node_rows = []
    for rack in racks:
        for n in range(NODES_PER_RACK):
            state = rng.choice(unavailable) if rng.random() < 0.01 else NodeState.AVAILABLE
            node_rows.append(
                Node(
                    rack=rack,
                    hostname=f"{rack.site.slug}-{rack.name}-n{n}",
                    state=state,
                    accelerator_type=rack_type[rack.pk],
                    gpu_count=8,
                )
            )
    fleet_nodes = Node.objects.bulk_create(node_rows, batch_size=2000)
    fleet.nodes = len(fleet_nodes)

    offers: dict[tuple, Offer] = {}  # (site, type, GPUs per instance) → node-shaped offer
    for site in sites:
        for kind in types:
            for size in (*SLICE_SIZES, 8):
                price = Decimal("2.49") if size == 8 else Decimal("2.69")  # a slice costs a little more per GPU
                offers[(site.pk, kind.pk, size)] = Offer(
                    site=site,
                    accelerator_type=kind,
                    shape=OfferShape.NODE,
                    gpus_per_node=8,
                    gpus_per_instance=size,
                    price_per_gpu_hour=price,
                )
    rack_offers = [
        Offer(site=site, accelerator_type=types[0], shape=OfferShape.RACK, price_per_gpu_hour=Decimal("2.29"))
        for site in sites
    ]
    Offer.objects.bulk_create([*offers.values(), *rack_offers])
    fleet.node_offers = [offer for (_s, _t, size), offer in offers.items() if size == 8]
    fleet.slice_offers = {
        size: [offer for (_s, _t, each), offer in offers.items() if each == size] for size in SLICE_SIZES
    }
    fleet.rack_offers = rack_offers
    for node in fleet_nodes:
        key = offers[(node.rack.site_id, node.accelerator_type_id, 8)].pk
        fleet.nodes_per_offer[key] = fleet.nodes_per_offer.get(key, 0) + 1

    # Who holds the busy nodes: one background tenant, one reservation per allocation.
    owner = user_create(email="bench-background@example.com")
    background = organization_create(name="Bench background", owner=owner)
    by_rack: dict[int, list] = {}
    for node in fleet_nodes:
        by_rack.setdefault(node.rack_id, []).append(node)
    busy = []
    for rack_nodes in by_rack.values():
        pattern = rng.random()
        if pattern < 0.25:
            busy += rack_nodes
        elif pattern >= 0.5:
            busy += rng.sample(rack_nodes, len(rack_nodes) // 2)
    fleet.busy_nodes = len(busy)
    horizon = now + timedelta(days=BACKGROUND_DAYS)
    reservations, allocations = [], []

    def book(node, first: int, size: int, *, hours: tuple[float, float], gaps: float) -> None:
        offer = offers[(node.rack.site_id, node.accelerator_type_id, size)]
        t = now + timedelta(hours=rng.uniform(0, 12))
        while t < horizon:
            end = t + timedelta(hours=rng.uniform(*hours))
            period = DateTimeTZRange(t, end, "[)")
            reservation = Reservation(
                organization=background,
                offer=offer,
                created_by=owner,
                shape=OfferShape.NODE,
                quantity=1,
                node_count=1,
                gpu_count=size,
                period=period,
                state=ReservationState.PENDING,
                price_per_gpu_hour=offer.price_per_gpu_hour,
            )
            reservations.append(reservation)
            allocations.append(
                Allocation(
                    reservation=reservation, node_id=node.pk, gpus=NumericRange(first, first + size), period=period
                )
            )
            t = end + timedelta(hours=rng.uniform(0, gaps))

    for node in busy:
        if rng.random() < SLICED_SHARE:
            fleet.sliced_nodes += 1
            before = len(allocations)
            for first, size in slice_blocks(rng):
                if rng.random() < 0.85:  # else this block stays idle: room on a partly used node
                    book(node, first, size, hours=(8, 96), gaps=12)
            fleet.slice_allocations += len(allocations) - before
        else:
            book(node, 0, node.gpu_count, hours=(12, 96), gaps=8)
    progress = Progress("background reservations and allocations", len(reservations) * 2)
    batch = 5000
    for i in range(0, len(reservations), batch):
        Reservation.objects.bulk_create(reservations[i : i + batch])
        progress.advance(len(reservations[i : i + batch]))
    for i in range(0, len(allocations), batch):
        Allocation.objects.bulk_create(allocations[i : i + batch])
        progress.advance(len(allocations[i : i + batch]))
    progress.close(
        f"{len(allocations)} allocations on {len(busy)} nodes ({fleet.sliced_nodes} of them sliced, "
        f"{fleet.slice_allocations} slice allocations)"
    )
    fleet.allocations = len(allocations)
    return fleet


def fleet_load() -> Fleet:
    """The fleet a previous run seeded (--reuse-fleet), read back from its database. The reservations
    that run committed (its creations and API requests) are still there: a little fuller a calendar."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db.models import Count, F, Q

    from marketplace.models import Allocation, Offer
    from provisioning.models import Node, Rack

    fleet = Fleet(nodes=Node.objects.count(), racks=Rack.objects.count())
    offers = Offer.objects.order_by("id")
    fleet.node_offers = list(offers.filter(shape="node", gpus_per_instance=F("gpus_per_node")))
    fleet.slice_offers = {size: list(offers.filter(shape="node", gpus_per_instance=size)) for size in SLICE_SIZES}
    fleet.rack_offers = list(offers.filter(shape="rack"))
    if not fleet.node_offers or not all(fleet.slice_offers.values()):
        raise RuntimeError("No fleet of this benchmark in that database: run once without --reuse-fleet.")
    for offer in fleet.node_offers:
        fleet.nodes_per_offer[offer.pk] = Node.objects.filter(
            rack__site_id=offer.site_id, accelerator_type_id=offer.accelerator_type_id
        ).count()
    background = Allocation.objects.filter(reservation__organization__name="Bench background")
    counts = background.aggregate(
        allocations=Count("id"),
        slices=Count("id", filter=Q(reservation__gpu_count__lt=8)),
        busy=Count("node", distinct=True),
        sliced=Count("node", distinct=True, filter=Q(reservation__gpu_count__lt=8)),
    )
    fleet.allocations, fleet.slice_allocations = counts["allocations"], counts["slices"]
    fleet.busy_nodes, fleet.sliced_nodes = counts["busy"], counts["sliced"]
    return fleet


def database_analyze() -> None:
    """VACUUM ANALYZE after the bulk load, as autovacuum would soon do: without statistics the
    planner guesses, and the benchmark would measure the guess."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")


def tenant_make(label: str, i: int):
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.choices import Role
    from marketplace.services.billing.credits import credits_grant
    from marketplace.services.tenancy.members import organization_create, user_create
    from marketplace.tenant_context import TenantContext

    user = user_create(email=f"bench-{label}-{i}-{RUN}@example.com")  # unique: --reuse-fleet keeps old ones
    organization = organization_create(name=f"Bench {label} {i} {RUN}", owner=user)
    # Reservations hold their expected cost (issue 6): ample credit, so money is never what refuses.
    credits_grant(organization=organization, amount=HUGE_CREDIT, memo="bench")
    return TenantContext(organization=organization, user=user, role=Role.OWNER)


# --- 1. Placement in process -------------------------------------------------------------------


@dataclass
class Request:
    shape: str  # one of SHAPES
    offer: object
    quantity: int
    start: datetime
    end: datetime


def random_request(fleet: Fleet, rng: random.Random, now: datetime, shape: str | None = None) -> Request:
    """A request of ``shape`` (else one of SHAPES at random, equally often): one slice, 1-8 whole nodes or
    one rack, of a random offer of that shape, starting within the next 4 weeks and lasting 1-48 hours:
    inside the busy part of the calendar."""
    shape = shape or rng.choice(SHAPES)
    offer = rng.choice(fleet.offers_for(shape))
    quantity = rng.randint(1, 8) if shape == "node" else 1
    start = (now + timedelta(hours=rng.uniform(1, 28 * 24))).replace(second=0, microsecond=0)
    return Request(shape, offer, quantity, start, start + timedelta(hours=rng.randint(1, 48)))


def window_occupancy(fleet: Fleet, requests: list[Request]) -> dict:
    """Medians over the requests' windows, for each request's (site, type): the share of its nodes that
    hold a live allocation overlapping the window (of any GPU), and the share held only in part (some
    GPUs free for the whole window: where a slice goes first)."""
    from django.db import connection

    shares: dict[str, list[float]] = {"busy": [], "partly": []}
    for request in requests:
        if request.shape == "rack":
            continue
        with connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT count(*), count(*) FILTER (WHERE h.mask IS NOT NULL),
                       count(*) FILTER (WHERE h.mask IS NOT NULL AND h.mask <> 255)
                FROM provisioning_node n JOIN provisioning_rack r ON r.id = n.rack_id
                LEFT JOIN LATERAL (
                    SELECT bit_or((1 << upper(a.gpus)) - (1 << lower(a.gpus))) AS mask
                    FROM marketplace_allocation a
                    WHERE a.node_id = n.id AND a.live AND a.period && tstzrange(%s, %s, '[)')
                ) h ON true
                WHERE r.site_id = %s AND n.accelerator_type_id = %s AND n.state = 'available'
                """,
                [request.start, request.end, request.offer.site_id, request.offer.accelerator_type_id],
            )
            total, busy, partly = cursor.fetchone()
        shares["busy"].append(busy / total)
        shares["partly"].append(partly / total)
    return {name: median(values) or 0.0 for name, values in shares.items()}


class CpuClock:
    """CPU time spent on a call, by this thread and by its PostgreSQL backend (``/proc/<pid>/schedstat``,
    when the server runs on this machine): what a call costs, whatever else the machine is doing. Wall
    time includes waiting for a core; on a busy 2-core machine that is most of it."""

    def __init__(self):
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            self.path = Path(f"/proc/{cursor.fetchone()[0]}/schedstat")
        self.available = self.path.exists()

    def _server(self) -> int:
        return int(self.path.read_text().split()[0]) if self.available else 0

    def start(self) -> None:
        self.server, self.client = self._server(), time.thread_time_ns()

    def stop(self) -> int | None:
        client = time.thread_time_ns() - self.client
        return client + self._server() - self.server if self.available else None


def measure_placement(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """placement_pick alone for each shape (``count`` of each), in random order, each in a transaction
    rolled back: every sample sees the same fleet."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from marketplace.services.reservations.placement import CapacityUnavailable, placement_pick

    now = timezone.now()
    requests = [random_request(fleet, rng, now, shape) for shape in SHAPES for _ in range(count)]
    rng.shuffle(requests)
    for request in requests[:40]:  # warm the connection, the plan cache and the buffers
        with transaction.atomic():
            try:
                placement_pick(offer=request.offer, quantity=request.quantity, start=request.start, end=request.end)
            except CapacityUnavailable:
                pass
            transaction.set_rollback(True)
    placed: dict[str, list[int]] = {shape: [] for shape in SHAPES}
    refused: dict[str, list[int]] = {shape: [] for shape in SHAPES}
    cpu: dict[str, list[int]] = {shape: [] for shape in SHAPES}  # of the placed
    clock = CpuClock()
    progress = Progress("placement_pick (rolled back)", len(requests))
    for request in requests:
        with transaction.atomic():
            clock.start()
            t0 = time.perf_counter_ns()
            try:
                placement_pick(offer=request.offer, quantity=request.quantity, start=request.start, end=request.end)
                outcome = placed
            except CapacityUnavailable:
                outcome = refused
            outcome[request.shape].append(time.perf_counter_ns() - t0)
            spent = clock.stop()
            if outcome is placed and spent is not None:
                cpu[request.shape].append(spent)
            transaction.set_rollback(True)
        progress.advance()
    progress.close()
    queries: dict[str, list[int]] = {shape: [] for shape in SHAPES}
    for request in requests[:100]:
        with transaction.atomic(), CaptureQueriesContext(connection) as captured:
            try:
                placement_pick(offer=request.offer, quantity=request.quantity, start=request.start, end=request.end)
                queries[request.shape].append(len(captured.captured_queries))
            except CapacityUnavailable:
                pass
            transaction.set_rollback(True)
    return {
        "all_placed": summary_ms([sample for samples in placed.values() for sample in samples]),
        "all_placed_cpu": summary_ms([sample for samples in cpu.values() for sample in samples]),
        "shapes": {
            shape: {
                **summary_ms(placed[shape]),
                "cpu": summary_ms(cpu[shape]),
                "refused": summary_ms(refused[shape]),
                "statements": median(queries[shape]),
            }
            for shape in SHAPES
        },
        "window_occupancy": window_occupancy(fleet, requests[:200]),
    }


def baseline_placement(ref: str):
    """The placement module as of git ``ref``, with the capacity selectors of that ref, loaded beside
    the working tree's (both run against this database): what a change to placement is measured
    against in the same run, on the same fleet."""
    import types

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    def load(name: str, code: str, path: str):
        module = sys.modules[name] = types.ModuleType(name)  # registered first: dataclasses look it up
        exec(compile(code, f"{ref}:{path}", "exec"), module.__dict__)  # noqa: S102 - our own code at a git ref
        return module

    capacity = "marketplace/selectors/capacity.py"
    load("bench_baseline_capacity", source(capacity), capacity)
    placement = "marketplace/services/reservations/placement.py"
    code = source(placement).replace(
        "from marketplace.selectors.capacity import", "from bench_baseline_capacity import"
    )
    return load("bench_baseline_placement", code, placement)


def measure_baseline(fleet: Fleet, rng: random.Random, count: int, ref: str) -> dict:
    """placement_pick of the working tree and of ``ref`` on the same requests (``count`` of each shape),
    alternately in random order, each rolled back: p50/p99 of both, and how often they placed alike."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db import transaction
    from django.utils import timezone

    from marketplace.services.reservations import placement as current

    baseline = baseline_placement(ref)
    now = timezone.now()
    requests = [random_request(fleet, rng, now, shape) for shape in SHAPES for _ in range(count)]
    rng.shuffle(requests)
    samples: dict[tuple[str, str], list[int]] = {(v, shape): [] for v in ("current", "baseline") for shape in SHAPES}
    cpu: dict[tuple[str, str], list[int]] = {key: [] for key in samples}
    alike = {shape: 0 for shape in SHAPES}
    clock = CpuClock()

    def pick(module, request):
        with transaction.atomic():
            clock.start()
            t0 = time.perf_counter_ns()
            try:
                placed = module.placement_pick(
                    offer=request.offer, quantity=request.quantity, start=request.start, end=request.end
                )
                outcome = (placed.node_ids, placed.gpus)
            except module.CapacityUnavailable:
                outcome = None
            elapsed = time.perf_counter_ns() - t0
            spent = clock.stop()
            transaction.set_rollback(True)
        return outcome, elapsed, spent

    for request in requests[:20]:  # warm both
        pick(current, request), pick(baseline, request)
    progress = Progress(f"placement_pick, working tree and {ref} (rolled back)", len(requests))
    for request in requests:
        order = [("current", current), ("baseline", baseline)]
        rng.shuffle(order)
        outcomes = {}
        for name, module in order:
            outcomes[name], elapsed, spent = pick(module, request)
            samples[(name, request.shape)].append(elapsed)
            if spent is not None:
                cpu[(name, request.shape)].append(spent)
        alike[request.shape] += outcomes["current"] == outcomes["baseline"]
        progress.advance()
    progress.close()
    return {
        "ref": ref,
        "shapes": {
            shape: {
                "current": summary_ms(samples[("current", shape)]),
                "baseline": summary_ms(samples[("baseline", shape)]),
                "current_cpu": summary_ms(cpu[("current", shape)]),
                "baseline_cpu": summary_ms(cpu[("baseline", shape)]),
                "placed_alike": alike[shape],
            }
            for shape in SHAPES
        },
    }


def measure_create(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """The whole reservation_create, committed (quota check, placement, rows, hold, commit, event), for
    ``count`` requests of random shapes."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from marketplace.services.reservations.lifecycle import reservation_create
    from marketplace.services.reservations.placement import CapacityUnavailable

    tenant = tenant_make("inprocess", 0)
    now = timezone.now()
    requests = [random_request(fleet, rng, now) for _ in range(count + 50)]
    created: dict[str, list[int]] = {shape: [] for shape in SHAPES}
    refused: list[int] = []
    progress = Progress("reservation_create (committed)", count)
    for request in requests[:count]:
        t0 = time.perf_counter_ns()
        try:
            reservation_create(
                tenant=tenant, offer=request.offer, quantity=request.quantity, start=request.start, end=request.end
            )
            created[request.shape].append(time.perf_counter_ns() - t0)
        except CapacityUnavailable:
            refused.append(time.perf_counter_ns() - t0)
        progress.advance()
    progress.close()
    statements = []
    for request in requests[count:]:
        with CaptureQueriesContext(connection) as captured:
            try:
                reservation_create(
                    tenant=tenant, offer=request.offer, quantity=request.quantity, start=request.start, end=request.end
                )
                statements.append(len(captured.captured_queries))
            except CapacityUnavailable:
                pass
    return {
        "all_created": summary_ms([sample for samples in created.values() for sample in samples]),
        "shapes": {shape: summary_ms(created[shape]) for shape in SHAPES},
        "refused": summary_ms(refused),
        "statements_per_create": median(statements),
    }


def measure_refusals(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """Requests that cannot be placed, through reservation_create: the refusal also computes the
    earliest window that would fit (earliest_fit). Two kinds: more nodes than are free in the window
    (but fewer than the offer has), and more nodes than the offer has at all."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.utils import timezone

    from marketplace.services.reservations.lifecycle import reservation_create
    from marketplace.services.reservations.placement import CapacityUnavailable

    tenant = tenant_make("refusals", 0)
    now = timezone.now()
    result = {}
    for kind in ("busy_window", "more_than_offer_has"):
        samples, earliest = [], []
        progress = Progress(f"refusals: {kind}", count)
        for _ in range(count):
            offer = rng.choice(fleet.node_offers)
            total = fleet.nodes_per_offer[offer.pk]
            quantity = int(total * 0.9) if kind == "busy_window" else total + 1
            start = (now + timedelta(hours=rng.uniform(1, 14 * 24))).replace(second=0, microsecond=0)
            t0 = time.perf_counter_ns()
            try:
                reservation_create(
                    tenant=tenant, offer=offer, quantity=quantity, start=start, end=start + timedelta(hours=24)
                )
                outcome = "placed"  # not expected: this window was free after all
            except CapacityUnavailable as error:
                outcome = error.details.get("earliest_start")
            samples.append(time.perf_counter_ns() - t0)
            earliest.append(outcome)
            progress.advance()
        progress.close()
        result[kind] = {
            **summary_ms(samples),
            "earliest_found": sum(1 for e in earliest if e and e != "placed"),
            "placed": earliest.count("placed"),
        }
    return result


def api_like_body(fleet: Fleet, rng: random.Random, now: datetime) -> dict:
    """What the load generator sends: one instance (a 1-, 2- or 4-GPU slice or a whole node) of a random
    offer, a random start within the next 360 days, 1-4 hours (bench/wrk_api.lua draws the same)."""
    start = now + timedelta(seconds=rng.randint(3600, API_HORIZON_DAYS * 86400))
    return {
        "offer": rng.choice(fleet.instance_offers).pk,
        "quantity": 1,
        "start": start.replace(microsecond=0).isoformat(),
        "duration_hours": rng.randint(1, 4),
    }


# Where a POST /api/v1/reservations/ spends its time: the steps timed inside real requests (each
# step's own time, less the steps it calls), in the order a request meets them. What no step covers is
# Django and DRF themselves: the handler, middleware, routing, parsing and rendering.
PROFILE_STEPS = {
    "auth": "authentication: the API key, its tenant",
    "idempotency": "idempotent_response (no key sent: a pass-through)",
    "validation": "validation: body, offer row, window and price (reservation_quote)",
    "tenant lock": "tenant lock (organization row, twice: the reservation and the hold)",
    "quota": "quota check (_check_quota)",
    "placement": "placement (placement_pick)",
    "insert": "insert: reservation and allocation rows (SQL)",
    "hold": "hold of the expected cost (hold_place: balance, ledger rows)",
    "reservation_create": "the rest of reservation_create",
    "commit": "COMMIT (deferred balance check included)",
    "events": "after commit: events (reservation.created, balance push)",
    "response": "response: reservation_get and its serializer",
}


class StepClock:
    """Each named step's own time and SQL statements within one request: a step's time less that of the
    steps it calls, so the steps and the rest add up to the request."""

    def __init__(self):
        self.stack: list[list] = []  # [name, started ns, ns spent in nested steps]
        self.time: dict[str, int] = {}
        self.statements: dict[str, int] = {}

    def reset(self) -> None:
        self.time, self.statements = {}, {}

    def enter(self, name: str) -> None:
        self.stack.append([name, time.perf_counter_ns(), 0])

    def leave(self) -> None:
        name, started, nested = self.stack.pop()
        elapsed = time.perf_counter_ns() - started
        self.time[name] = self.time.get(name, 0) + elapsed - nested
        if self.stack:
            self.stack[-1][2] += elapsed

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.leave()

        return timed

    def sql(self, execute, sql, params, many, context):
        """connection.execute_wrapper: count each statement for the step running it; time the inserts."""
        step = self.stack[-1][0] if self.stack else "rest"
        inserting = sql.startswith(('INSERT INTO "marketplace_reservation"', 'INSERT INTO "marketplace_allocation"'))
        step = "insert" if inserting else step
        self.statements[step] = self.statements.get(step, 0) + 1
        if not inserting:
            return execute(sql, params, many, context)
        self.enter("insert")
        try:
            return execute(sql, params, many, context)
        finally:
            self.leave()


def profile_patches(clock: StepClock) -> list[tuple[object, str, str]]:
    """(object, attribute, step): what StepClock wraps for the profile, where the request looks it up."""
    from django.db import DEFAULT_DB_ALIAS, connections

    connection = connections[DEFAULT_DB_ALIAS]  # this thread's wrapper itself, not django.db's proxy to it

    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    import marketplace.api.authentication as authentication
    import marketplace.api.boundary as boundary
    import marketplace.api.views.reservations as views
    import marketplace.services.billing.ledger as ledger
    import marketplace.services.reservations.lifecycle as lifecycle
    from marketplace.api.serializers.reservations import ReservationCreateSerializer

    return [
        (authentication, "api_key_authenticate", "auth"),
        (boundary, "tenant_context_for_api_key", "auth"),
        (views, "idempotent_response", "idempotency"),
        (ReservationCreateSerializer, "is_valid", "validation"),
        (views, "offer_for_reservation", "validation"),
        (lifecycle, "reservation_quote", "validation"),
        (lifecycle, "organization_lock", "tenant lock"),
        (ledger, "organization_lock", "tenant lock"),
        (lifecycle, "_check_quota", "quota"),
        (lifecycle, "placement_pick", "placement"),
        (lifecycle, "hold_place", "hold"),
        (views, "reservation_create", "reservation_create"),
        (connection, "_commit", "commit"),
        (connection, "run_and_clear_commit_hooks", "events"),
        (views, "reservation_get", "response"),
        (views.ReservationSerializer, "data", "response"),
    ]


def profile_creation(post, count: int) -> dict:
    """``count`` POSTs (``post()`` sends one) with StepClock's wrappers in place: each step's mean and
    median time per request, its share of the mean request, and its SQL statements per request."""
    from django.db import connection

    clock = StepClock()
    patched = []  # (owner, name, its own value before, or None when it had none: inherited)
    for owner, name, step in profile_patches(clock):
        found = inspect.getattr_static(owner, name)
        patched.append((owner, name, vars(owner).get(name)))
        if isinstance(found, property):
            setattr(owner, name, property(clock.wrap(step, found.fget)))
        else:
            setattr(owner, name, clock.wrap(step, getattr(owner, name)))
    per_step: dict[str, list[int]] = {step: [] for step in [*PROFILE_STEPS, "rest"]}
    statements: dict[str, list[int]] = {step: [] for step in per_step}
    totals = []
    progress = Progress("creation profile (test client, timed steps)", count)
    try:
        with connection.execute_wrapper(clock.sql):
            for _ in range(count):
                clock.reset()
                t0 = time.perf_counter_ns()
                post()
                total = time.perf_counter_ns() - t0
                totals.append(total)
                for step in PROFILE_STEPS:
                    per_step[step].append(clock.time.get(step, 0))
                    statements[step].append(clock.statements.get(step, 0))
                per_step["rest"].append(total - sum(clock.time.values()))
                statements["rest"].append(clock.statements.get("rest", 0))
                progress.advance()
    finally:
        for owner, name, original in reversed(patched):
            if original is None:
                delattr(owner, name)  # the class's (or the connection's class's) own is found again
            else:
                setattr(owner, name, original)
    progress.close()
    mean_total = statistics.mean(totals)
    return {
        "requests": count,
        "total": {**summary_ms(totals), "mean_ms": mean_total / 1e6},
        "steps": {
            step: {
                "mean_ms": statistics.mean(samples) / 1e6,
                "p50_ms": percentile(samples, 50) / 1e6,
                "share": statistics.mean(samples) / mean_total,
                "statements": statistics.mean(statements[step]),
            }
            for step, samples in per_step.items()
        },
    }


def measure_request_path(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """Where a POST /api/v1/reservations/ spends its time, without a server: the Django test client
    (the same middleware, authentication, view and serializer; WSGI instead of ASGI) for the two
    endpoints, then the same POSTs with their steps timed (profile_creation)."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from marketplace.services.tenancy.api_keys import api_key_create

    tenant = tenant_make("client", 0)
    _, key = api_key_create(tenant=tenant, name="bench")
    client = Client(SERVER_NAME="localhost", HTTP_AUTHORIZATION=f"Bearer {key}")
    now = timezone.now()

    def get_me():
        response = client.get("/api/v1/me/")
        if response.status_code != 200:
            raise RuntimeError(f"GET /api/v1/me/ answered {response.status_code}: {response.content[:300]!r}")

    def post():
        response = client.post("/api/v1/reservations/", api_like_body(fleet, rng, now), content_type="application/json")
        if response.status_code != 201:
            raise RuntimeError(
                f"POST /api/v1/reservations/ answered {response.status_code}: {response.content[:300]!r}"
            )

    result = {}
    progress = Progress("request path in process (test client)", 2 * count)
    for name, step in {"client_get_me": get_me, "client_post_reservation": post}.items():
        for _ in range(10):
            step()
        samples = []
        for _ in range(count):
            t0 = time.perf_counter_ns()
            step()
            samples.append(time.perf_counter_ns() - t0)
            progress.advance()
        with CaptureQueriesContext(connection) as captured:
            step()
        result[name] = {**summary_ms(samples), "statements": len(captured.captured_queries)}
    progress.close()
    result["profile"] = profile_creation(post, count)
    return result


# --- 2. The API under load ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The ASGI server as a subprocess in its own process group; stop() ends the group."""

    def __init__(self, kind: str, env: dict[str, str], log_path: Path):
        self.kind, self.port = kind, free_port()
        if kind == "uvicorn":
            command = [
                sys.executable, "-m", "uvicorn", "console.asgi:application", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "2", "--no-access-log", "--log-level", "warning",
            ]  # fmt: skip
        else:
            command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "-v", "0"]
            command.append("console.asgi:application")
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, key: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                url = f"{self.base}/api/v1/me/"  # our own server on the loopback interface
                request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})  # noqa: S310
                with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} did not answer within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
            except ProcessLookupError:
                pass
        self.log.close()


def wrk_version(wrk: str) -> str:
    result = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (result.stdout + result.stderr).strip().splitlines()[0] if (result.stdout + result.stderr) else "wrk"


def wrk_run(wrk: str, url: str, config: Path, mode: str, duration: int, connections: int, label: str) -> dict:
    command = [
        wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(BENCH / "wrk_api.lua"),
        url, "--", str(config), mode,
    ]  # fmt: skip
    progress = Progress(label, duration, " s")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + duration + 60
    started = time.monotonic()
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"wrk did not finish: {' '.join(command)}")
        progress.update(int(time.monotonic() - started))
        time.sleep(0.5)
    stdout, stderr = process.communicate()
    progress.update(duration)
    line = next((line for line in stdout.splitlines() if line.startswith("BENCH_JSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {stderr.strip()} {stdout[-1000:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    statuses = {int(code): n for code, n in data["statuses"].items()}
    result = {
        "requests": data["requests"],
        "seconds": seconds,
        "requests_per_s": data["requests"] / seconds,
        "p50_ms": data["latency_us"]["p50"] / 1000,
        "p90_ms": data["latency_us"]["p90"] / 1000,
        "p99_ms": data["latency_us"]["p99"] / 1000,
        "statuses": statuses,
        "socket_errors": {k: v for k, v in data["errors"].items() if k != "status" and v},
        "error_samples": data["error_samples"],
    }
    created = statuses.get(201, 0)
    note = f"{result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
    if mode == "reserve":
        note += f", {created} created, {statuses.get(409, 0)} refused (409)"
    others = {code: n for code, n in statuses.items() if code not in (200, 201, 409)}
    if others:
        note += f", other statuses {others}"
    progress.close(note)
    return result


def reservations_count(organization_ids: list) -> int:
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.models import Reservation

    return Reservation.objects.filter(organization_id__in=organization_ids).count()


def measure_api(
    *, fleet: Fleet, servers: list[str], env: dict, repeats: int, duration: int, connections: int, wrk: str
) -> dict:
    from django.db import connection

    tenants = [tenant_make("api", i) for i in range(connections)]
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.services.tenancy.api_keys import api_key_create

    keys = [api_key_create(tenant=tenant, name="bench")[1] for tenant in tenants]
    organization_ids = [tenant.organization.pk for tenant in tenants]
    workdir = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    config = workdir / "wrk.conf"
    config.write_text(
        "".join(f"key {key}\n" for key in keys)
        + "".join(f"offer {offer.pk}\n" for offer in fleet.instance_offers)
        + f"horizon {API_HORIZON_DAYS * 86400}\nmax_hours 4\n"
    )
    connection.close()  # the server has the database to itself while it is measured
    results = {}
    try:
        for kind in servers:
            server = Server(kind, env, workdir / f"{kind}.log")
            try:
                say(f"Starting {kind} on 127.0.0.1:{server.port}")
                server.wait_ready(keys[0])
                me, reserve = f"{server.base}/api/v1/me/", f"{server.base}/api/v1/reservations/"
                warm = max(2, min(5, duration // 3))
                wrk_run(wrk, me, config, "me", warm, connections, f"{kind}: warm-up GET /me/")
                wrk_run(wrk, reserve, config, "reserve", warm, connections, f"{kind}: warm-up POST /reservations/")
                runs = {"ceiling": [], "reservations": []}
                for i in range(repeats):
                    label = f"{kind} run {i + 1}/{repeats}"
                    runs["ceiling"].append(wrk_run(wrk, me, config, "me", duration, connections, f"{label}: GET /me/"))
                    before = reservations_count(organization_ids)
                    run = wrk_run(
                        wrk, reserve, config, "reserve", duration, connections, f"{label}: POST /reservations/"
                    )
                    run["rows_created"] = reservations_count(organization_ids) - before
                    run["created_per_s"] = run["statuses"].get(201, 0) / run["seconds"]
                    runs["reservations"].append(run)
                    connection.close()
                if server.process.poll() is not None:
                    raise RuntimeError(f"{kind} died during the run: {server.log_tail()}")
            finally:
                server.stop()
            ceiling = [r["requests_per_s"] for r in runs["ceiling"]]
            created = [r["created_per_s"] for r in runs["reservations"]]
            results[kind] = {
                "runs": runs,
                "ceiling_requests_per_s": median(ceiling),
                "ceiling_p50_ms": median([r["p50_ms"] for r in runs["ceiling"]]),
                "ceiling_p99_ms": median([r["p99_ms"] for r in runs["ceiling"]]),
                "reservations_requests_per_s": median([r["requests_per_s"] for r in runs["reservations"]]),
                "reservations_created_per_s": median(created),
                "reservations_p50_ms": median([r["p50_ms"] for r in runs["reservations"]]),
                "reservations_p99_ms": median([r["p99_ms"] for r in runs["reservations"]]),
                "ratio_created_to_ceiling": median([c / e for c, e in zip(created, ceiling, strict=True)]),
                "server_log_tail": server.log_tail(1000),
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# --- Machine, report ---------------------------------------------------------------------------


def machine_info(wrk: str | None) -> dict:
    from importlib.metadata import version

    from machine import describe_machine

    return {
        **describe_machine(),
        "load_average_at_start": os.getloadavg(),
        "django": version("django"),
        "uvicorn": version("uvicorn"),
        "daphne": version("daphne"),
        "wrk": wrk_version(wrk) if wrk else None,
    }


def fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


def report(results: dict) -> str:
    m, f = results["machine"], results["fleet"]
    lines = [
        f"Placement benchmark, {m['date']} ({m['date_local']})",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"Python {m['python']}, PostgreSQL {m['postgresql']}, Django {m['django']}; load average "
        f"{m['load_average_at_start'][0]:.2f} at the start, {m['load_average_at_end'][0]:.2f} at the end",
        f"Fleet: {f['nodes']} nodes ({f['gpus']} GPUs) in {f['racks']} racks at {SITES} sites, {f['busy_nodes']} "
        f"nodes busy ({f['sliced_nodes']} of them sliced) with {f['allocations']} allocations "
        f"({f['slice_allocations']} of slices); a request's window finds {f['window_busy_share']:.0%} of its "
        f"(site, type)'s nodes held, {f['window_partly_share']:.0%} in part (medians)",
        "",
    ]

    def row(label, s, statements=None):
        return (
            f"{label:<40}  {s['count']:>6}   {fmt(s['p50_ms'], 3):>8}  {fmt(s['p99_ms'], 3):>8}   "
            f"{fmt(statements, 0) if statements is not None else '':>10}"
        )

    if "placement" in results:
        p, c = results["placement"], results["create"]
        lines += [
            "In process                                 count     p50 ms    p99 ms   statements",
            "----------------------------------------   -----   --------  --------   ----------",
            row("placement_pick, placed (all shapes)", p["all_placed"]),
        ]
        for shape, r in p["shapes"].items():
            what = "1-8 whole nodes" if shape == "node" else "one whole rack" if shape == "rack" else "a slice"
            lines.append(row(f"  {shape} ({what})", r, r["statements"]))
            if r["cpu"]["count"]:
                lines.append(row("    CPU (client + PostgreSQL)", r["cpu"]))
            if r["refused"]["count"]:
                lines.append(row(f"  {shape}, refused", r["refused"]))
        lines.append(row("reservation_create, committed (all)", c["all_created"], c["statements_per_create"]))
        lines += [row(f"  {shape}", r) for shape, r in c["shapes"].items()]
        lines.append(row("reservation_create, refused", c["refused"]))
        for kind, r in results.get("refusals", {}).items():
            lines.append(row(f"refused + earliest_fit: {kind}", r))
        lines.append("")
    if "baseline" in results:
        b = results["baseline"]
        lines += [
            f"placement_pick, this tree vs {b['ref']}, interleaved   now p50    p99   {b['ref'][:10]:>10} p50    p99"
            "   placed alike",
        ]
        for shape, r in b["shapes"].items():
            for label, c, o in [(shape, r["current"], r["baseline"]), ("  CPU", r["current_cpu"], r["baseline_cpu"])]:
                if not c["count"]:
                    continue
                alike = f"{r['placed_alike']}/{c['count']}" if label == shape else ""
                lines.append(
                    f"  {label:<46} {fmt(c['p50_ms']):>8} {fmt(c['p99_ms']):>6} {fmt(o['p50_ms']):>14} "
                    f"{fmt(o['p99_ms']):>6}   {alike}"
                )
        lines.append("")
    if "request_path" in results:
        r = results["request_path"]
        lines += [
            "One request, in process (test client; API-like body)   p50 ms    p99 ms   statements",
            "-----------------------------------------------------  --------  --------   ----------",
        ]
        for name, label in {
            "client_get_me": "GET /api/v1/me/ through the test client",
            "client_post_reservation": "POST /api/v1/reservations/ through the test client",
        }.items():
            s = r[name]
            lines.append(f"{label:<53}  {fmt(s['p50_ms'], 3):>8}  {fmt(s['p99_ms'], 3):>8}   {s['statements']:>10}")
        profile = r["profile"]
        lines += [
            "",
            f"Where a POST's time goes ({profile['requests']} requests, steps timed; mean "
            f"{profile['total']['mean_ms']:.2f} ms, p50 {profile['total']['p50_ms']:.2f} ms)",
            f"{'step':<68}  mean ms   p50 ms   share  statements",
        ]
        labels = {**PROFILE_STEPS, "rest": "Django and DRF: handler, middleware, routing, parsing, rendering"}
        for step, s in profile["steps"].items():
            lines.append(
                f"  {labels[step]:<66}  {s['mean_ms']:7.3f}  {s['p50_ms']:7.3f}  {s['share']:6.1%}  "
                f"{s['statements']:10.1f}"
            )
        lines.append("")
    for kind, a in results.get("api", {}).items():
        lines += [
            f"API, {kind}, {results['settings']['connections']} connections, "
            f"{results['settings']['duration_s']} s × {results['settings']['repeats']} (medians)",
            f"  GET /api/v1/me/ (ceiling)        {a['ceiling_requests_per_s']:8.0f} req/s   "
            f"p50 {a['ceiling_p50_ms']:6.1f} ms   p99 {a['ceiling_p99_ms']:6.1f} ms",
            f"  POST /api/v1/reservations/       {a['reservations_requests_per_s']:8.0f} req/s   "
            f"p50 {a['reservations_p50_ms']:6.1f} ms   p99 {a['reservations_p99_ms']:6.1f} ms",
            f"  reservations created             {a['reservations_created_per_s']:8.0f} /s      "
            f"= {a['ratio_created_to_ceiling']:.2f} × the ceiling",
            "",
        ]
    return "\n".join(lines)


# --- Main --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=10_000, help="fleet size (default 10000)")
    parser.add_argument(
        "--placements", type=int, default=400, help="timed placements of each shape (default 400; 5 shapes)"
    )
    parser.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also time placement_pick as of this git ref, interleaved with the working tree's, same fleet",
    )
    parser.add_argument(
        "--baseline-placements", type=int, default=100, help="timed pairs of each shape for --baseline (100)"
    )
    parser.add_argument("--creations", type=int, default=1000, help="timed committed creations (default 1000)")
    parser.add_argument("--requests", type=int, default=300, help="timed test-client requests (default 300)")
    parser.add_argument(
        "--refusals", type=int, default=3, help="timed refusals of each kind (default 3; each takes seconds)"
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds per API measurement (default 15)")
    parser.add_argument("--repeats", type=int, default=3, help="API measurements per endpoint (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent API connections (default 32)")
    parser.add_argument("--server", choices=["uvicorn", "daphne", "both"], default="uvicorn")
    parser.add_argument("--skip-api", action="store_true", help="placement in process only")
    parser.add_argument(
        "--reuse-fleet",
        action="store_true",
        help="keep the database of a previous run (same --nodes and --seed) instead of seeding a new one",
    )
    parser.add_argument(
        "--database-url", help="benchmark database, dropped and recreated (default: local neocloud_bench)"
    )
    parser.add_argument("--seed", type=int, default=3, help="random seed for the fleet and the requests")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/placement-<date>.json)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    wrk = None
    if not args.skip_api:
        wrk = shutil.which("wrk")
        if wrk is None:
            say("The API part needs wrk: apt-get install wrk (Debian/Ubuntu) or brew install wrk; or pass --skip-api.")
            return 2
    database_url = bench_database_url(args.database_url or os.environ.get("DATABASE_URL"), DEFAULT_DATABASE_URL)
    env = configure_environment(database_url)
    if not args.reuse_fleet:
        say(f"Recreating {urlsplit(database_url).path.lstrip('/')} and migrating")
        database_recreate(database_url)
    django_setup()
    from django.core.management import call_command
    from django.utils import timezone

    call_command("migrate", verbosity=0)
    rng = random.Random(args.seed)  # noqa: S311 - reproducible test data, not secrets
    if args.reuse_fleet:
        say("Reusing the fleet of a previous run")
        fleet = fleet_load()
    else:
        say(f"Seeding a {args.nodes}-node fleet")
        fleet = fleet_seed(nodes=args.nodes, rng=rng, now=timezone.now())
    database_analyze()
    results: dict = {
        "machine": machine_info(wrk),
        "settings": {
            "nodes": args.nodes,
            "placements_per_shape": args.placements,
            "baseline": args.baseline,
            "baseline_placements_per_shape": args.baseline_placements if args.baseline else None,
            "creations": args.creations,
            "requests": args.requests,
            "refusals": args.refusals,
            "duration_s": args.duration,
            "repeats": args.repeats,
            "connections": args.connections,
            "seed": args.seed,
            "reuse_fleet": args.reuse_fleet,
            "database": urlsplit(database_url)._replace(netloc=urlsplit(database_url).hostname or "").geturl(),
        },
    }
    say("Placement in process")
    results["placement"] = measure_placement(fleet, rng, args.placements)
    if args.baseline:
        results["baseline"] = measure_baseline(fleet, rng, args.baseline_placements, args.baseline)
    results["create"] = measure_create(fleet, rng, args.creations)
    results["request_path"] = measure_request_path(fleet, rng, args.requests)
    if args.refusals:
        results["refusals"] = measure_refusals(fleet, rng, args.refusals)
    results["fleet"] = {
        "nodes": fleet.nodes,
        "racks": fleet.racks,
        "sites": SITES,
        "gpus": fleet.nodes * 8,
        "node_offers": len(fleet.node_offers),
        "slice_offers": sum(len(offers) for offers in fleet.slice_offers.values()),
        "rack_offers": len(fleet.rack_offers),
        "busy_nodes": fleet.busy_nodes,
        "sliced_nodes": fleet.sliced_nodes,
        "allocations": fleet.allocations,
        "slice_allocations": fleet.slice_allocations,
        "window_busy_share": results["placement"]["window_occupancy"]["busy"],
        "window_partly_share": results["placement"]["window_occupancy"]["partly"],
    }
    if not args.skip_api:
        servers = ["uvicorn", "daphne"] if args.server == "both" else [args.server]
        results["api"] = measure_api(
            fleet=fleet,
            servers=servers,
            env=env,
            repeats=args.repeats,
            duration=args.duration,
            connections=args.connections,
            wrk=wrk,
        )
    results["machine"]["load_average_at_end"] = os.getloadavg()
    output = args.output or BENCH / "results" / f"placement-{datetime.now(UTC):%Y-%m-%d}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report(results))
    say(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
