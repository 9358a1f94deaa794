#!/usr/bin/env python
"""Billing benchmark (issue 6): rating and invoicing one month for 10,000 tenants with 100,000
reservations, time and peak memory.

It measures, in one run and on one machine, on data built for the purpose:

1. **Rating.** ``usage_rate(now=...)`` over 100,000 reservations that were active during the previous
   month (the month invoiced), some since before it began, some into the current month, some still
   active, some just released: wall time, reservations/s, usage records and ledger rows written, the
   time spent waiting on PostgreSQL (every statement and COMMIT, timed in the process), the CPU of
   the Python process and of its PostgreSQL backend, and the peak resident memory of the process.
   ``after_rating`` (spend alerts, depletion, balance push, per tenant) and the Redis pushes are timed
   apart, as a part of the whole.
2. **Rating again.** The same call a second time must write nothing (idempotence, asserted): what a
   beat run costs when everything is already rated.
3. **Invoicing.** ``invoice_month(month=previous month)`` for every tenant: invoices and lines
   written, time, peak memory.
4. **The ceiling, in the same run**, after each repeat: the same rows (the usage records, ledger
   transactions and entries the rating wrote; the invoices and lines) COPYed into empty scratch
   tables with the same indexes and no logic (no foreign keys, no triggers, no Python), plus a bare
   ``SELECT ... sum(amount) ... GROUP BY`` over them, in one committed transaction each.

Each measured pass runs in a fresh Python process (this script with ``--worker``), so its peak
memory is that of a worker doing the job, not of the process that built the data; between repeats
the billing tables are truncated and the grants and holds restored from a snapshot, so every
repeat starts from the same state (committed for real: the ledger's balance check runs at COMMIT).
With ``--tracemalloc`` one more, untimed pass reports the Python heap's peak (tracemalloc slows
Python down about three times, so its times are not used); with ``--profile`` one more pass runs under
cProfile and the functions with the most time are reported.

    .venv/bin/python bench/billing.py                 # 10,000 tenants, 100,000 reservations, ~8 minutes
    .venv/bin/python bench/billing.py --tracemalloc   # and the Python heap's peak: one more pass, ~14 minutes
    .venv/bin/python bench/billing.py --quick         # 500 tenants, 5,000 reservations, 1 pass: a smoke run
    .venv/bin/python bench/billing.py --tenants 2000 --reservations 20000 --repeats 1 --profile \
        --output bench/results/billing-profile-<date>.json   # where Python's time goes, at a fifth of the size

The data lives in a dedicated database (``neocloud_bench_billing`` on the local PostgreSQL by
default), dropped and recreated at the start; balance pushes go to Redis database 8 by default
(nobody listens). Progress goes to stderr; the table to stdout and everything to
``bench/results/billing-<date>.json``. Nothing here asserts on time: machines are noisy, so read
medians and ratios, and compare only numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from database import accelerator_types_create, bench_database_url, database_recreate  # bench/database.py

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/neocloud_bench_billing"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"
SITES = 5
LEDGER_CHUNK = 2000  # transactions per post_many call while seeding
# What a reset empties; the grants and holds come back from the snapshot tables.
BILLING_TABLES = (
    "marketplace_invoiceline",
    "marketplace_invoice",
    "marketplace_usagerecord",
    "marketplace_ledgerentry",
    "marketplace_ledgertransaction",
    "marketplace_billingnotice",
    "marketplace_billingprofile",
)
SNAPSHOT = {"marketplace_ledgertransaction": "bench_snapshot_txn", "marketplace_ledgerentry": "bench_snapshot_entry"}

if str(ROOT) not in sys.path:  # run as a script: the project is importable
    sys.path.insert(0, str(ROOT))
from console.kernel.progress import Progress, say  # noqa: E402 - the bar the management commands show


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- Environment and database ------------------------------------------------------------------


def configure_environment(database_url: str, redis_url: str) -> dict[str, str]:
    """Settings for this process and its workers (the project reads them from the environment)."""
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DJANGO_SETTINGS_MODULE": "console.settings.development",
            "DEBUG": "false",  # with DEBUG every statement would be kept in memory
            "LOG_LEVEL": "WARNING",
        }
    )
    return dict(os.environ)


def django_setup() -> None:
    import django

    django.setup()


def sql_run(statement: str, params=None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def sql_value(statement: str, params=None):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


def previous_month(now: datetime) -> date:
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.money import month_bounds, month_start

    return month_start(month_bounds(month_start(now))[0] - timedelta(days=1))


# --- The data ----------------------------------------------------------------------------------


@dataclass
class Seed:
    tenants: int = 0
    reservations: int = 0
    states: Counter = field(default_factory=Counter)
    spans: Counter = field(default_factory=Counter)
    gpus: int = 0
    expected_usage: Decimal = Decimal(0)  # what rating everything up to ``now`` must charge in total
    holds: Decimal = Decimal(0)
    grants: Decimal = Decimal(0)
    ledger_transactions: int = 0
    ledger_entries: int = 0
    energy_reservations: int = 0
    energy_gpus: int = 0
    rollups: int = 0
    seconds: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "tenants": self.tenants,
            "reservations": self.reservations,
            "states": dict(self.states),
            "spans": dict(self.spans),
            "gpus_reserved": self.gpus,
            "expected_usage": str(self.expected_usage),
            "holds": str(self.holds),
            "grants": str(self.grants),
            "ledger_transactions_seeded": self.ledger_transactions,
            "ledger_entries_seeded": self.ledger_entries,
            "energy_reservations": self.energy_reservations,
            "energy_gpus": self.energy_gpus,
            "rollups": self.rollups,
            "setup_seconds": self.seconds,
        }


@dataclass
class Catalog:
    types: list
    sites: list
    racks: dict  # site id -> a rack for rack reservations
    node_offers: list
    rack_offers: list


def catalog_seed() -> Catalog:
    """Two accelerator types at 5 sites: a node offer per (site, type), an H100 rack offer per site."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.choices import OfferShape
    from marketplace.models import Offer
    from provisioning.choices import SiteKind
    from provisioning.models import Rack, Site

    types = accelerator_types_create()
    sites = Site.objects.bulk_create(
        Site(slug=f"bill-{s}", name=f"Billing bench {s}", region="eu-central", kind=SiteKind.HALL, location="Bench")
        for s in range(SITES)
    )
    racks = {
        rack.site_id: rack
        for rack in Rack.objects.bulk_create(
            Rack(site=site, name="rack-r000", power_budget_kw=Decimal("44")) for site in sites
        )
    }
    prices = {types[0].pk: Decimal("2.49"), types[1].pk: Decimal("3.29")}
    node_offers = Offer.objects.bulk_create(
        Offer(site=site, accelerator_type=kind, shape=OfferShape.NODE, price_per_gpu_hour=prices[kind.pk])
        for site in sites
        for kind in types
    )
    rack_offers = Offer.objects.bulk_create(
        Offer(site=site, accelerator_type=types[0], shape=OfferShape.RACK, price_per_gpu_hour=Decimal("2.29"))
        for site in sites
    )
    return Catalog(types=types, sites=sites, racks=racks, node_offers=node_offers, rack_offers=rack_offers)


def organizations_seed(count: int) -> list:
    """Tenants as bare organizations (no users: nothing billed needs one)."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.models import Organization

    progress = Progress("organizations", count)
    ids = []
    for start in range(0, count, 5000):
        rows = Organization.objects.bulk_create(
            Organization(slug=f"bench-{i:06d}", name=f"Bench tenant {i}")
            for i in range(start, min(count, start + 5000))
        )
        ids += [row.pk for row in rows]
        progress.advance(len(rows))
    progress.close()
    return ids


def tenant_of_each(rng: random.Random, tenants: int, count: int) -> list[int]:
    """Tenant indexes for ``count`` reservations: every tenant gets one (while there are enough), the
    rest go to tenants with Zipf-like weights, so a few tenants hold hundreds and most a handful."""
    first = list(range(min(tenants, count)))
    weights = [1 / (rank + 1) ** 0.8 for rank in range(tenants)]
    rng.shuffle(weights)
    rest = rng.choices(range(tenants), weights=weights, k=count - len(first))
    return first + rest


def active_interval(rng: random.Random, *, start_of_month: datetime, end_of_month: datetime, now: datetime):
    """(activated_at, deactivated_at or None): an interval that overlaps the month. A fifth began
    before it; 12 % are still active, 3 % were released in the last two hours; the rest last 1 h -
    30 days, some past the month's end."""
    hour = 3600.0
    if rng.random() < 0.2:
        activated = start_of_month - timedelta(seconds=rng.uniform(hour, 30 * 24 * hour))
    else:
        activated = start_of_month + timedelta(seconds=rng.uniform(0, (end_of_month - start_of_month).total_seconds()))
    if rng.random() < 0.12:
        return activated, None
    if rng.random() < 0.03:  # released in the last two hours: releasing, its nodes being wiped
        return activated, now - timedelta(seconds=rng.uniform(60, 7200))
    pick = rng.random()
    hours = rng.uniform(1, 24) if pick < 0.45 else rng.uniform(24, 168) if pick < 0.85 else rng.uniform(168, 720)
    deactivated = activated + timedelta(seconds=hours * hour)
    if deactivated <= start_of_month:  # it must be active during the month
        deactivated = start_of_month + timedelta(seconds=rng.uniform(hour, 72 * hour))
    return activated, (deactivated if deactivated < now else None)


def reservations_seed(
    rng: random.Random, *, catalog: Catalog, organization_ids: list, count: int, now: datetime, month: date, seed: Seed
) -> list:
    """``count`` reservations active during ``month``, built in memory and bulk-created. Node offers
    (92 %, 1-8 nodes) or whole racks (8 %); 10 % on a reserved term at a discount. State follows the
    interval: active (no end yet), releasing (ended in the last 2 h) or completed. The period is what
    was booked (and held): from a few minutes before activation to the end, or later when released
    early; active ones are booked up to 30 days ahead."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db.backends.postgresql.psycopg_any import DateTimeTZRange

    from marketplace.choices import OfferShape, ReservationState
    from marketplace.models import Reservation
    from marketplace.money import cents, cost, month_bounds, seconds_between

    start_of_month, end_of_month = month_bounds(month)
    owners = tenant_of_each(rng, len(organization_ids), count)
    rows = []
    for index in owners:
        activated, deactivated = active_interval(rng, start_of_month=start_of_month, end_of_month=end_of_month, now=now)
        if rng.random() < 0.08:
            offer, shape, quantity, nodes = rng.choice(catalog.rack_offers), OfferShape.RACK, 1, 8
            rack = catalog.racks[offer.site_id]
        else:
            offer, shape, rack = rng.choice(catalog.node_offers), OfferShape.NODE, None
            quantity = nodes = rng.choices([1, 2, 4, 8], weights=[60, 20, 12, 8])[0]
        term = rng.choice([1, 3, 6, 12]) if rng.random() < 0.1 else None
        price = offer.price_per_gpu_hour * (Decimal("0.8") if term else 1)
        booked_from = activated - timedelta(seconds=rng.uniform(60, 900))
        if deactivated is None:
            booked_to = now + timedelta(seconds=rng.uniform(3600, 30 * 86400))
            state = ReservationState.ACTIVE
        else:
            early = rng.random() < 0.3
            booked_to = deactivated + timedelta(seconds=rng.uniform(3600, 48 * 3600)) if early else deactivated
            state = ReservationState.RELEASING if deactivated > now - timedelta(hours=2) else ReservationState.COMPLETED
        gpus = nodes * offer.gpus_per_node
        rows.append(
            Reservation(
                organization_id=organization_ids[index],
                offer=offer,
                shape=shape,
                quantity=quantity,
                rack=rack,
                node_count=nodes,
                gpu_count=gpus,
                period=DateTimeTZRange(booked_from, booked_to, "[)"),
                state=state,
                price_per_gpu_hour=price,
                activated_at=activated,
                deactivated_at=deactivated,
                term_months=term,
            )
        )
        seed.states[state] += 1
        seed.spans[span_kind(activated, deactivated, start_of_month, end_of_month)] += 1
        seed.gpus += gpus
        seed.expected_usage += cost(
            price_per_gpu_hour=price, gpus=gpus, seconds=seconds_between(activated, deactivated or now)
        )
        seed.holds += cents(cost(price_per_gpu_hour=price, gpus=gpus, seconds=seconds_between(booked_from, booked_to)))
    progress = Progress("reservations", len(rows))
    for start in range(0, len(rows), 5000):
        Reservation.objects.bulk_create(rows[start : start + 5000])
        progress.advance(len(rows[start : start + 5000]))
    progress.close(", ".join(f"{n} {state}" for state, n in seed.states.most_common()))
    seed.reservations = len(rows)
    return rows


def span_kind(activated: datetime, deactivated: datetime | None, start: datetime, end: datetime) -> str:
    before = "from before the month" if activated < start else "from within the month"
    if deactivated is None:
        return f"{before}, still active"
    return f"{before}, {'ended after it' if deactivated > end else 'ended within it'}"


def ledger_seed(*, organization_ids: list, reservations: list, now: datetime, seed: Seed) -> None:
    """Through the ledger service: a credit grant per tenant (1.25 × its reservations' holds + $1,000,
    so no balance runs out) and a hold per reservation for the cost of its booked period, as
    reservation_create places it. post_many in chunks; each chunk commits (the balance check runs)."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.choices import AccountKind, TransactionKind
    from marketplace.models import LedgerTransaction
    from marketplace.money import cents, cost, seconds_between
    from marketplace.services.billing.ledger import Leg, accounts_of, post_many

    accounts = accounts_of(organization_ids)
    grants_account = accounts[(None, AccountKind.GRANTS)]
    holds = []
    held_by: Counter = Counter()
    for r in reservations:
        amount = cents(
            cost(price_per_gpu_hour=r.price_per_gpu_hour, gpus=r.gpu_count, seconds=seconds_between(r.start, r.end))
        )
        held_by[r.organization_id] += amount
        holds.append(
            (
                LedgerTransaction(
                    kind=TransactionKind.HOLD,
                    organization_id=r.organization_id,
                    memo=f"Hold for reservation {str(r.pk)[:8]}",
                    created_at=r.start,
                ),
                [
                    Leg(accounts[(r.organization_id, AccountKind.CREDITS)], -amount, r.pk),
                    Leg(accounts[(r.organization_id, AccountKind.HOLDS)], amount, r.pk),
                ],
            )
        )
    grants = []
    for organization_id in organization_ids:
        amount = (held_by[organization_id] * Decimal("1.25") + Decimal(1000)).quantize(Decimal(1))
        seed.grants += amount
        grants.append(
            (
                LedgerTransaction(
                    kind=TransactionKind.GRANT,
                    organization_id=organization_id,
                    memo="Credit grant",
                    created_at=now - timedelta(days=90),
                ),
                [Leg(grants_account, -amount), Leg(accounts[(organization_id, AccountKind.CREDITS)], amount)],
            )
        )
    batch = grants + holds
    progress = Progress("ledger: grants and holds (post_many)", len(batch))
    for start in range(0, len(batch), LEDGER_CHUNK):
        post_many(batch[start : start + LEDGER_CHUNK])
        progress.advance(len(batch[start : start + LEDGER_CHUNK]))
    progress.close(f"{len(grants)} grants, {len(holds)} holds")
    seed.ledger_transactions = len(batch)
    seed.ledger_entries = 2 * len(batch)


def energy_seed(
    rng: random.Random, *, catalog: Catalog, reservations: list, share: float, now: datetime, month: date, seed: Seed
) -> None:
    """Give ``share`` of the one-node reservations a node of their own with 8 GPUs, an allocation and
    telemetry rollups over the month, so the invoice's energy join (allocations -> GPUs -> rollups)
    has rows to sum. One rollup row per GPU per hour, carrying the hour's energy (the real rollups
    are per minute: 60 times the rows); the other reservations have no allocation and no energy."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db.backends.postgresql.psycopg_any import NumericRange

    from marketplace.choices import ReservationState
    from marketplace.models import Allocation
    from marketplace.money import month_bounds
    from provisioning.choices import NodeState
    from provisioning.models import Gpu, Node, Rack

    candidates = [r for r in reservations if r.node_count == 1 and r.rack_id is None]
    chosen = rng.sample(candidates, min(len(candidates), round(len(reservations) * share)))
    if not chosen:
        return
    by_site: dict[int, list] = {}
    for r in chosen:
        by_site.setdefault(r.offer.site_id, []).append(r)
    nodes, allocations = [], []
    for site_id, site_reservations in by_site.items():
        racks = Rack.objects.bulk_create(
            Rack(site_id=site_id, name=f"rack-e{i:03d}", power_budget_kw=Decimal("44"))
            for i in range((len(site_reservations) + 7) // 8)
        )
        for i, r in enumerate(site_reservations):
            node = Node(
                rack=racks[i // 8],
                hostname=f"bill-{site_id}-e{i:05d}",
                state=NodeState.AVAILABLE,
                accelerator_type_id=r.offer.accelerator_type_id,
                gpu_count=8,
            )
            nodes.append(node)
            live = r.state != ReservationState.COMPLETED
            allocations.append(
                Allocation(reservation=r, node=node, gpus=NumericRange(0, node.gpu_count), period=r.period, live=live)
            )
    Node.objects.bulk_create(nodes, batch_size=2000)
    Allocation.objects.bulk_create(allocations, batch_size=2000)
    Gpu.objects.bulk_create(
        (
            Gpu(
                node=node,
                index=g,
                uuid=f"GPU-bill-{node.pk}-{g}",
                accelerator_type_id=node.accelerator_type_id,
                memory_mib=81559,
            )
            for node in nodes
            for g in range(8)
        ),
        batch_size=5000,
    )
    start_of_month, end_of_month = month_bounds(month)
    say("  rollups: one per GPU-hour of the month, generated in PostgreSQL")
    sql_run(
        """INSERT INTO provisioning_gpurollup (gpu_id, minute, samples, util_n, util_sum, util_max, power_n,
                                               power_sum, power_max, temp_max, fb_used_max, energy_mj)
           SELECT g.id, m, 60, 60, 60 * 85.0, 99, 60, 60 * 560.0, 690, 71, 70000, 2016000000 + (g.id %% 7) * 1000000
           FROM marketplace_allocation a
           JOIN marketplace_reservation r ON r.id = a.reservation_id
           JOIN provisioning_gpu g ON g.node_id = a.node_id
           CROSS JOIN LATERAL generate_series(
               date_trunc('hour', greatest(r.activated_at, %(start)s)),
               least(coalesce(r.deactivated_at, %(now)s), %(end)s) - interval '1 microsecond',
               interval '1 hour') AS m""",
        {"start": start_of_month, "end": end_of_month, "now": now},
    )
    seed.energy_reservations = len(chosen)
    seed.energy_gpus = len(nodes) * 8
    seed.rollups = sql_value("SELECT count(*) FROM provisioning_gpurollup")


def database_analyze() -> None:
    """VACUUM ANALYZE, as autovacuum would soon do: without statistics the planner guesses, and the
    benchmark would measure the guess. Then a CHECKPOINT, so no repeat pays for the last one's writes."""
    sql_run("VACUUM ANALYZE")
    sql_run("CHECKPOINT")


def snapshot_take() -> None:
    for table, snapshot in SNAPSHOT.items():
        sql_run(f"DROP TABLE IF EXISTS {snapshot}")
        sql_run(f"CREATE TABLE {snapshot} AS SELECT * FROM {table}")  # noqa: S608 - our own table names


def billing_reset() -> None:
    """Back to the state after seeding: no usage, invoices, profiles or notices, the grants and holds
    only, nothing settled. TRUNCATE (the immutability triggers are per row, and a benchmark is the
    one place that may empty these tables); the restored entries pass the balance check at COMMIT."""
    from django.db import transaction

    with transaction.atomic():
        sql_run(f"TRUNCATE {', '.join(BILLING_TABLES)}")
        for table, snapshot in SNAPSHOT.items():
            sql_run(f"INSERT INTO {table} SELECT * FROM {snapshot}")  # noqa: S608 - our own table names
        sql_run("UPDATE marketplace_reservation SET billing_settled_at = NULL WHERE billing_settled_at IS NOT NULL")
    database_analyze()


def seed_all(args, rng: random.Random, now: datetime, month: date) -> Seed:
    seed = Seed(tenants=args.tenants)
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        seed.seconds[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    catalog = catalog_seed()
    organization_ids = organizations_seed(args.tenants)
    lap("organizations")
    reservations = reservations_seed(
        rng,
        catalog=catalog,
        organization_ids=organization_ids,
        count=args.reservations,
        now=now,
        month=month,
        seed=seed,
    )
    lap("reservations")
    energy_seed(
        rng, catalog=catalog, reservations=reservations, share=args.energy_share, now=now, month=month, seed=seed
    )
    lap("allocations_and_rollups")
    ledger_seed(organization_ids=organization_ids, reservations=reservations, now=now, seed=seed)
    lap("ledger")
    database_analyze()
    snapshot_take()
    lap("analyze_and_snapshot")
    return seed


# --- The measured worker -----------------------------------------------------------------------


_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


def statement_kind(sql: str) -> str:
    """ "INSERT marketplace_ledgerentry", "SELECT marketplace_reservation": the verb and the first table."""
    verb = sql.lstrip().split(None, 1)[0].upper()
    table = _TABLE.search(sql)
    return f"{verb} {table.group(1)}" if table else verb


class DbClock:
    """Time this process waits on PostgreSQL: every statement (an execute wrapper; also per kind of
    statement) and every COMMIT (where the deferred balance check and the foreign keys run)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.statements, self.statement_s, self.commits, self.commit_s = 0, 0.0, 0, 0.0
        self.by_kind: dict[str, list] = {}

    def __call__(self, execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed = time.perf_counter() - started
            self.statement_s += elapsed
            self.statements += 1
            kind = self.by_kind.setdefault(statement_kind(sql), [0, 0.0])
            kind[0] += 1
            kind[1] += elapsed

    def kinds(self, count: int = 12) -> list[dict]:
        ranked = sorted(self.by_kind.items(), key=lambda item: item[1][1], reverse=True)[:count]
        return [{"statement": kind, "count": n, "seconds": round(seconds, 3)} for kind, (n, seconds) in ranked]

    def install(self) -> None:
        from django.db import connections

        wrapper = connections["default"]
        wrapper.execute_wrappers.append(self)
        commit = wrapper._commit

        def timed_commit():
            started = time.perf_counter()
            try:
                return commit()
            finally:
                self.commit_s += time.perf_counter() - started
                self.commits += 1

        wrapper._commit = timed_commit


class Stopwatch:
    """Wall time and calls of one function, wrapped where its callers look it up."""

    def __init__(self, module, name: str):
        self.seconds, self.calls = 0.0, 0
        original = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        setattr(module, name, timed)

    def take(self) -> dict:
        taken = {"seconds": self.seconds, "calls": self.calls}
        self.seconds, self.calls = 0.0, 0
        return taken


def memory_kib() -> dict[str, int]:
    """The process's resident set now and its high-water mark (kB, from /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1])
    return fields


def memory_peak_reset() -> bool:
    """Reset the high-water mark to the current RSS (Linux: clear_refs 5), so each step's peak is its own.
    Not getrusage's ru_maxrss: it cannot be reset, and Linux carries it across fork and exec, so a worker
    started by this process would report this process's RSS (the data built in memory) as its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used so far (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def backend_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of our PostgreSQL backend process so far (it runs on this machine), if readable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profile_top(profiler, count: int = 30) -> dict:
    """The functions with the most time of their own, the most time under them, and the project's own
    functions (marketplace/, console/) by time under them (cProfile)."""
    import pstats

    stats = pstats.Stats(profiler).stats
    project = (str(ROOT / "marketplace"), str(ROOT / "console"))

    def name_of(path: str, line: int, function: str) -> str:
        shown = str(Path(path).relative_to(ROOT)) if path.startswith(project) else Path(path).name
        return f"{shown}:{line}({function})"

    def rows(key: int, only_project: bool = False) -> list[dict]:
        items = [item for item in stats.items() if not only_project or item[0][0].startswith(project)]
        ranked = sorted(items, key=lambda item: item[1][key], reverse=True)[:count]
        return [
            {"function": name_of(*where), "calls": nc, "own_s": round(tt, 3), "cumulative_s": round(ct, 3)}
            for where, (_, nc, tt, ct, _) in ranked
        ]

    return {"by_own_time": rows(2), "by_cumulative_time": rows(3), "project_by_cumulative_time": rows(3, True)}


def measured_step(name: str, call, *, db: DbClock, watches: dict, backend_pid: int | None, mode: str) -> dict:
    import cProfile
    import gc
    import tracemalloc

    gc.collect()
    peak_resettable = memory_peak_reset()
    before = memory_kib()
    db.reset()
    for watch in watches.values():
        watch.take()
    profiler = cProfile.Profile() if mode == "profile" else None
    if mode == "tracemalloc":
        tracemalloc.start()
    busy0, cpu0, backend0 = machine_busy_s(), time.process_time(), backend_cpu_s(backend_pid)
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    outcome = call()
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - started
    cpu, backend1, busy = time.process_time() - cpu0, backend_cpu_s(backend_pid), machine_busy_s() - busy0
    heap_peak = None
    if mode == "tracemalloc":
        heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    after = memory_kib()
    return {
        "step": name,
        "outcome": outcome,
        "wall_s": wall,
        "python_cpu_s": cpu,
        "backend_cpu_s": None if backend0 is None or backend1 is None else backend1 - backend0,
        # Everything else on the machine meanwhile: PostgreSQL's WAL writer and checkpointer, Redis, and
        # whatever else runs there (on a shared machine, mostly that: read it as noise).
        "other_cpu_s": busy - cpu - (backend1 - backend0 if backend0 is not None and backend1 is not None else 0),
        "db_statement_s": db.statement_s,
        "db_commit_s": db.commit_s,
        "statements": db.statements,
        "statement_kinds": db.kinds(),
        "commits": db.commits,
        "rss_before_mib": before["VmRSS"] / 1024,
        "rss_peak_mib": after["VmHWM"] / 1024 if peak_resettable else None,
        "python_heap_peak_mib": heap_peak / 2**20 if heap_peak is not None else None,
        "parts": {name: watch.take() for name, watch in watches.items()},
        "mode": mode,
        "profile": profile_top(profiler) if profiler else None,
    }


def worker_main(args) -> int:
    """One pass in a fresh process: rate, rate again, invoice. Prints its results as JSON on stdout."""
    django_setup()
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db import connection

    import console.kernel.events
    import marketplace.services.billing.spend
    from marketplace.selectors.billing import reservations_to_rate_count
    from marketplace.services.billing.invoicing import invoice_month
    from marketplace.services.billing.metering import usage_rate

    now, month = datetime.fromisoformat(args.now), date.fromisoformat(args.month)
    backend_pid = sql_value("SELECT pg_backend_pid()")
    db = DbClock()
    db.install()
    watches = {
        "after_rating": Stopwatch(marketplace.services.billing.spend, "after_rating"),
        "redis_publish": Stopwatch(console.kernel.events, "publish"),
    }
    label = "" if args.mode == "timed" else f" ({args.mode})"
    steps = []

    def rate(title: str):
        def call():
            progress = Progress(f"{title}{label}", reservations_to_rate_count())
            totals = usage_rate(now=now, progress=progress.advance)
            progress.close(f"{totals['records']} records, {totals['settled']} settled")
            return totals

        return call

    def invoice():
        progress = Progress(f"invoice_month {month:%Y-%m}{label}", args.tenants)
        written = invoice_month(month=month, progress=progress.advance)
        progress.close(f"{written} invoices")
        return {"invoices": written}

    common = {"db": db, "watches": watches, "backend_pid": backend_pid, "mode": args.mode}
    steps.append(measured_step("rate", rate("usage_rate"), **common))
    steps.append(measured_step("rate_again", rate("usage_rate again"), **common))
    if steps[-1]["outcome"]["records"] != 0:
        raise AssertionError(f"the second rating wrote {steps[-1]['outcome']['records']} records, not 0")
    steps.append(measured_step("invoice", invoice, **common))
    connection.close()
    print(json.dumps({"steps": steps, "backend_pid": backend_pid}))
    return 0


def worker_run(*, env: dict, now: datetime, month: date, tenants: int, mode: str = "timed") -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--now", now.isoformat()]
    command += ["--month", month.isoformat(), "--tenants", str(tenants)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return {step["step"]: step for step in json.loads(done.stdout)["steps"]}


# --- Checks and counts (not measured) ----------------------------------------------------------


def rows_written(seed: Seed, month: date) -> dict:
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.money import month_bounds

    start, end = month_bounds(month)
    return {
        "usage_records": sql_value("SELECT count(*) FROM marketplace_usagerecord"),
        "usage_records_in_month": sql_value(
            "SELECT count(*) FROM marketplace_usagerecord WHERE period <@ tstzrange(%s, %s, '[)')", [start, end]
        ),
        "ledger_transactions": sql_value("SELECT count(*) FROM marketplace_ledgertransaction")
        - seed.ledger_transactions,
        "ledger_entries": sql_value("SELECT count(*) FROM marketplace_ledgerentry") - seed.ledger_entries,
        "invoices": sql_value("SELECT count(*) FROM marketplace_invoice"),
        "invoice_lines": sql_value("SELECT count(*) FROM marketplace_invoiceline"),
        "billing_profiles": sql_value("SELECT count(*) FROM marketplace_billingprofile"),
        "notices": sql_value("SELECT count(*) FROM marketplace_billingnotice"),
    }


def check(seed: Seed, run: dict, rows: dict) -> None:
    """What must hold after a pass, or the timings mean nothing: all usage charged exactly once, every
    reservation that left active settled with nothing left held, one invoice per tenant and one line
    per reservation (each was active in the month)."""
    charged = sql_value("SELECT coalesce(sum(amount), 0) FROM marketplace_usagerecord")
    problems = []
    if charged != seed.expected_usage:
        problems.append(f"usage charged {charged}, expected {seed.expected_usage}")
    settled = run["rate"]["outcome"]["settled"]
    if settled != seed.reservations - seed.states["active"]:
        problems.append(f"{settled} settled, expected {seed.reservations - seed.states['active']}")
    held = sql_value(
        """SELECT count(*) FROM (
               SELECT e.reservation_id FROM marketplace_ledgerentry e
               JOIN marketplace_ledgeraccount a ON a.id = e.account_id AND a.kind = 'holds'
               JOIN marketplace_reservation r ON r.id = e.reservation_id AND r.billing_settled_at IS NOT NULL
               GROUP BY 1 HAVING sum(e.amount) <> 0) AS left_held"""
    )
    if held:
        problems.append(f"{held} settled reservations still hold money")
    if rows["invoices"] != seed.tenants or rows["invoice_lines"] != seed.reservations:
        problems.append(f"{rows['invoices']} invoices and {rows['invoice_lines']} lines written")
    if problems:
        raise AssertionError("; ".join(problems))


# --- The ceiling -------------------------------------------------------------------------------


SCRATCH = {
    "bench_ceiling_txn": "marketplace_ledgertransaction",
    "bench_ceiling_entry": "marketplace_ledgerentry",
    "bench_ceiling_usage": "marketplace_usagerecord",
    "bench_ceiling_invoice": "marketplace_invoice",
    "bench_ceiling_line": "marketplace_invoiceline",
}


def copy_out(cursor, query: str) -> bytes:
    with cursor.copy(f"COPY ({query}) TO STDOUT") as copy:
        return b"".join(bytes(chunk) for chunk in copy)


def copy_in(cursor, table: str, data: bytes) -> None:
    with cursor.copy(f"COPY {table} FROM STDIN") as copy:
        for start in range(0, len(data), 1 << 20):
            copy.write(data[start : start + (1 << 20)])


def ceiling_measure(month: date) -> dict:
    """The same rows the pass wrote, COPYed into empty tables with the same indexes (LIKE ... INCLUDING
    ALL: the exclusion constraint too) but no foreign keys and no triggers, plus the aggregate each
    step needs, one committed transaction per step: the floor for putting these rows in this database.
    (Not included: the UPDATE that marks reservations settled, and the foreign-key checks.)"""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db import connection, transaction

    from marketplace.money import month_bounds

    start, end = month_bounds(month)
    with connection.cursor() as cursor:
        for scratch, table in SCRATCH.items():
            cursor.execute(f"DROP TABLE IF EXISTS {scratch}")
            cursor.execute(f"CREATE TABLE {scratch} (LIKE {table} INCLUDING ALL)")
        written = "SELECT t.* FROM marketplace_ledgertransaction t WHERE t.kind IN ('usage', 'hold_release')"
        data = {
            "bench_ceiling_txn": copy_out(cursor, written),
            "bench_ceiling_entry": copy_out(
                cursor,
                "SELECT e.* FROM marketplace_ledgerentry e JOIN marketplace_ledgertransaction t "
                "ON t.id = e.transaction_id WHERE t.kind IN ('usage', 'hold_release')",
            ),
            "bench_ceiling_usage": copy_out(cursor, "SELECT * FROM marketplace_usagerecord"),
            "bench_ceiling_invoice": copy_out(cursor, "SELECT * FROM marketplace_invoice"),
            "bench_ceiling_line": copy_out(cursor, "SELECT * FROM marketplace_invoiceline"),
        }
    sql_run("CHECKPOINT")
    result = {}
    with connection.cursor() as cursor:
        started = time.perf_counter()
        with transaction.atomic():
            for table in ("bench_ceiling_txn", "bench_ceiling_entry", "bench_ceiling_usage"):
                copy_in(cursor, table, data[table])
            copied = time.perf_counter()
            cursor.execute("SELECT reservation_id, sum(amount) FROM bench_ceiling_entry GROUP BY 1")
            groups = len(cursor.fetchall())
        finished = time.perf_counter()
        result["rate"] = {
            "wall_s": finished - started,
            "copy_s": copied - started,
            "aggregate_s": finished - copied,
            "groups": groups,
            "bytes": sum(len(data[t]) for t in ("bench_ceiling_txn", "bench_ceiling_entry", "bench_ceiling_usage")),
        }
        started = time.perf_counter()
        with transaction.atomic():
            cursor.execute(
                "SELECT organization_id, reservation_id, sum(seconds), sum(amount), min(lower(period)), "
                "max(upper(period)) FROM bench_ceiling_usage WHERE period <@ tstzrange(%s, %s, '[)') "
                "GROUP BY 1, 2 ORDER BY 1, 5",
                [start, end],
            )
            groups = len(cursor.fetchall())
            aggregated = time.perf_counter()
            for table in ("bench_ceiling_invoice", "bench_ceiling_line"):
                copy_in(cursor, table, data[table])
        finished = time.perf_counter()
        result["invoice"] = {
            "wall_s": finished - started,
            "copy_s": finished - aggregated,
            "aggregate_s": aggregated - started,
            "groups": groups,
            "bytes": sum(len(data[t]) for t in ("bench_ceiling_invoice", "bench_ceiling_line")),
        }
        for scratch in SCRATCH:
            cursor.execute(f"DROP TABLE {scratch}")
    return result


def push_ceiling() -> dict:
    """after_rating pushes each tenant its balance with one ``publish`` each: an ``async_to_sync`` call,
    so an event loop and a Redis connection per push. The same pushes (same groups, a payload of the
    same shape) sent one ``publish`` at a time, and all from one event loop, for comparison."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from console.kernel.events import publish, tenant_group
    from marketplace.models import Organization

    groups = [tenant_group(pk) for pk in Organization.objects.values_list("pk", flat=True)]
    payload = {
        "balance": "1234.56",
        "available": "1000.00",
        "held": "234.56",
        "credit_limit": "0.00",
        "spent": "99.99",
        "spent_this_month": "12.34",
        "depleted_at": None,
    }
    message = {"type": "event.message", "event": "billing.balance", "data": payload}

    async def send_all() -> None:
        layer = get_channel_layer()
        for group in groups:
            await layer.group_send(group, message)

    started = time.perf_counter()
    for group in groups:
        publish(group, "billing.balance", payload)
    one_by_one = time.perf_counter() - started
    started = time.perf_counter()
    async_to_sync(send_all)()
    one_loop = time.perf_counter() - started
    return {"pushes": len(groups), "one_publish_each_s": one_by_one, "one_event_loop_s": one_loop}


# --- Report ------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    """Medians over the repeats, per step, and the ratios to the ceiling (per repeat, then median)."""

    def med(step: str, key: str):
        values = [run["steps"][step][key] for run in runs if run["steps"][step][key] is not None]
        return median(values)

    summary = {}
    for step in ("rate", "rate_again", "invoice"):
        summary[step] = {
            key: med(step, key)
            for key in (
                "wall_s",
                "python_cpu_s",
                "backend_cpu_s",
                "other_cpu_s",
                "db_statement_s",
                "db_commit_s",
                "statements",
                "commits",
                "rss_before_mib",
                "rss_peak_mib",
            )
        }
        summary[step]["parts"] = {
            part: median([run["steps"][step]["parts"][part]["seconds"] for run in runs])
            for part in runs[0]["steps"][step]["parts"]
        }
    for step in ("rate", "invoice"):
        summary[step]["ceiling_s"] = median([run["ceiling"][step]["wall_s"] for run in runs])
        summary[step]["ratio_to_ceiling"] = median(
            [run["steps"][step]["wall_s"] / run["ceiling"][step]["wall_s"] for run in runs]
        )
    summary["rows"] = runs[0]["rows"]
    summary["rate"]["reservations"] = runs[0]["steps"]["rate"]["outcome"]["reservations"]
    summary["rate_again"]["reservations"] = runs[0]["steps"]["rate_again"]["outcome"]["reservations"]
    return summary


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(results: dict) -> str:
    m, d, s = results["machine"], results["data"], results["summary"]
    rows, rate, again, invoice = s["rows"], s["rate"], s["rate_again"], s["invoice"]
    lines = [
        f"Billing benchmark, {m['date']} ({m['date_local']})",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"Python {m['python']}, PostgreSQL {m['postgresql']}, Django {m['django']}",
        f"Data: {d['tenants']:,} tenants, {d['reservations']:,} reservations active in {results['settings']['month']} "
        f"({', '.join(f'{n:,} {k}' for k, n in d['states'].items())}); {d['energy_reservations']:,} with an "
        f"allocation and {d['rollups']:,} hourly rollups; medians of {results['settings']['repeats']} passes",
        "",
        f"{'step':<18} {'time s':>8} {'rows written':<44} {'per s':>14} {'peak RSS MiB':>13} "
        f"{'ceiling s':>10} {'ratio':>6}",
    ]

    def row(label, step, written, per_s, ceiling=True) -> str:
        peak = f"{fmt(step['rss_peak_mib'], 0)} ({fmt(step['rss_before_mib'], 0)})"
        tail = f" {step['ceiling_s']:10.2f} {step['ratio_to_ceiling']:6.1f}" if ceiling else ""
        return f"{label:<18} {step['wall_s']:8.1f} {written:<44} {per_s:>14} {peak:>13}{tail}"

    lines += [
        row(
            "usage_rate",
            rate,
            f"{rows['usage_records']:,} usage, {rows['ledger_transactions']:,} txn, {rows['ledger_entries']:,} entries",
            f"{rate['reservations'] / rate['wall_s']:,.0f} resv",
        ),
        row(
            "usage_rate again",
            again,
            f"0 ({again['reservations']:,} reservations looked at)",
            f"{again['reservations'] / again['wall_s']:,.0f} resv",
            ceiling=False,
        ),
        row(
            "invoice_month",
            invoice,
            f"{rows['invoices']:,} invoices, {rows['invoice_lines']:,} lines",
            f"{rows['invoice_lines'] / invoice['wall_s']:,.0f} lines",
        ),
        "(peak RSS of the worker process during the step, and its RSS when the step began)",
        "",
        "Where the time went (medians, s): Python CPU of the worker, waiting on PostgreSQL (statements, COMMITs),",
        "the PostgreSQL backend's CPU; after_rating and the Redis balance pushes are parts of usage_rate",
    ]
    for name, step in (("usage_rate", rate), ("usage_rate again", again), ("invoice_month", invoice)):
        lines.append(
            f"  {name:<17} wall {step['wall_s']:6.1f}   Python CPU {fmt(step['python_cpu_s'])}   statements "
            f"{fmt(step['db_statement_s'])} ({fmt(step['statements'], 0)})   COMMIT {fmt(step['db_commit_s'])} "
            f"({fmt(step['commits'], 0)})   backend CPU {fmt(step['backend_cpu_s'])}   "
            f"other processes' CPU {fmt(step['other_cpu_s'])}"
        )
    lines.append(
        f"  usage_rate parts: after_rating {rate['parts']['after_rating']:.1f}, of which Redis pushes "
        f"{rate['parts']['redis_publish']:.1f} ({rows['billing_profiles']:,} billing profiles and "
        f"{rows['notices']:,} notices written)"
    )
    p = results["push_ceiling"]
    lines.append(
        f"  the same {p['pushes']:,} pushes alone: {p['one_publish_each_s']:.1f} s one publish each, "
        f"{p['one_event_loop_s']:.1f} s from one event loop"
    )
    if "tracemalloc" in results:
        t = results["tracemalloc"]
        peaks = ", ".join(f"{step} {fmt(t[step]['python_heap_peak_mib'])} MiB" for step in t)
        lines += ["", f"Python heap peak (tracemalloc, one untimed pass): {peaks}"]
    for step, profile in results.get("profile", {}).items():
        lines += ["", f"cProfile, {step} ({profile['wall_s']:.1f} s under the profiler), by own time:"]
        lines += [
            f"  {r['own_s']:8.2f} s own {r['cumulative_s']:8.2f} s cumul. {r['calls']:>9} calls  {r['function']}"
            for r in profile["by_own_time"][:12]
        ]
        lines += ["", f"cProfile, {step}, the project's functions by time under them:"]
        lines += [
            f"  {r['cumulative_s']:8.2f} s cumul. {r['own_s']:8.2f} s own {r['calls']:>9} calls  {r['function']}"
            for r in profile["project_by_cumulative_time"][:15]
        ]
    return "\n".join(lines)


def machine_info() -> dict:
    from importlib.metadata import version

    from machine import describe_machine

    return {**describe_machine(), "django": version("django"), "psycopg": version("psycopg")}


# --- Main --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tenants", type=int, help="organizations (default 10000; 500 with --quick)")
    parser.add_argument("--reservations", type=int, help="reservations (default 100000; 5000 with --quick)")
    parser.add_argument("--repeats", type=int, help="measured passes, each on fresh data (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 tenants, 5,000 reservations, 1 pass")
    parser.add_argument(
        "--energy-share",
        type=float,
        default=0.01,
        help="share of reservations with an allocation and rollups (default 0.01)",
    )
    parser.add_argument("--tracemalloc", action="store_true", help="one more, untimed pass for the Python heap's peak")
    parser.add_argument(
        "--profile", action="store_true", help="one more, untimed pass under cProfile: where Python's time goes"
    )
    parser.add_argument(
        "--database-url", help="benchmark database, dropped and recreated (default: local neocloud_bench_billing)"
    )
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help=f"Redis for the pushes (default {DEFAULT_REDIS_URL})"
    )
    parser.add_argument("--seed", type=int, default=6, help="random seed for the data")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/billing-<date>.json)")
    # A measured pass, run by the benchmark itself in a fresh process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["timed", "tracemalloc", "profile"], default="timed", help=argparse.SUPPRESS)
    parser.add_argument("--now", help=argparse.SUPPRESS)
    parser.add_argument("--month", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.tenants = args.tenants or (500 if quick else 10_000)
    args.reservations = args.reservations or (5_000 if quick else 100_000)
    args.repeats = args.repeats or (1 if quick else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    database_url = bench_database_url(args.database_url, DEFAULT_DATABASE_URL)
    env = configure_environment(database_url, args.redis_url)
    say(f"Recreating {urlsplit(database_url).path.lstrip('/')} and migrating")
    database_recreate(database_url)
    django_setup()
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    call_command("migrate", verbosity=0)
    now = timezone.now().replace(microsecond=0)
    month = previous_month(now)
    rng = random.Random(args.seed)  # noqa: S311 - reproducible test data, not secrets
    say(f"Seeding {args.tenants:,} tenants and {args.reservations:,} reservations active in {month:%Y-%m}")
    seed = seed_all(args, rng, now, month)
    results: dict = {
        "machine": machine_info(),
        "settings": {
            "tenants": args.tenants,
            "reservations": args.reservations,
            "repeats": args.repeats,
            "energy_share": args.energy_share,
            "seed": args.seed,
            "now": now.isoformat(),
            "month": f"{month:%Y-%m}",
            "database": urlsplit(database_url)._replace(netloc=urlsplit(database_url).hostname or "").geturl(),
        },
        "data": seed.summary(),
    }
    runs = []
    for i in range(args.repeats):
        say(f"Pass {i + 1}/{args.repeats}: reset, then rate, rate again and invoice in a fresh process")
        billing_reset()
        connection.close()  # the worker has the database to itself
        load_before = os.getloadavg()[0]
        run = {"steps": worker_run(env=env, now=now, month=month, tenants=args.tenants)}
        run["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
        run["rows"] = rows_written(seed, month)
        check(seed, run["steps"], run["rows"])
        say("  ceiling: the same rows COPYed into bare tables, and the aggregates")
        run["ceiling"] = ceiling_measure(month)
        runs.append(run)
    results["runs"] = runs
    results["summary"] = summarize(runs)
    say("Redis: the balance pushes one publish each, and from one event loop")
    results["push_ceiling"] = push_ceiling()
    if args.tracemalloc:
        say("One more pass with tracemalloc (its times are not used)")
        billing_reset()
        connection.close()
        traced = worker_run(env=env, now=now, month=month, tenants=args.tenants, mode="tracemalloc")
        results["tracemalloc"] = {
            step: {"python_heap_peak_mib": traced[step]["python_heap_peak_mib"], "wall_s": traced[step]["wall_s"]}
            for step in traced
        }
    if args.profile:
        say("One more pass under cProfile (its times are not used)")
        billing_reset()
        connection.close()
        profiled = worker_run(env=env, now=now, month=month, tenants=args.tenants, mode="profile")
        results["profile"] = {step: {"wall_s": run["wall_s"], **run["profile"]} for step, run in profiled.items()}
    name = f"billing{'-quick' if args.quick else ''}-{datetime.now(UTC):%Y-%m-%d}.json"
    output = args.output or BENCH / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report(results))
    say(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
