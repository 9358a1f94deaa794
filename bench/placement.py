#!/usr/bin/env python
"""Placement benchmark (issue 3): how fast the console places reservations on a 10,000-node fleet.

It measures, in one run and on one machine:

1. **Placement in process.** ``placement_pick`` (the capacity query, the row locks and the re-check)
   on a 10,000-node fleet where about half the nodes hold live allocations over the next weeks, for
   random offers, quantities 1-8 and random windows; each pick is rolled back so every sample sees
   the same fleet. Then the whole ``reservation_create`` (quota check, placement, rows written,
   commit, event published), committed. p50/p99 of each, and SQL statements per call. A few requests
   that cannot be placed show what a refusal costs (it also searches for the earliest window).
2. **Reservations through the API.** ``POST /api/v1/reservations/`` from 32 concurrent connections
   (wrk) for a fixed time, beside the ceiling measured in the same run: the bare authenticated
   endpoint ``GET /api/v1/me/``, same server, same keys. Each is repeated (3 times by default,
   interleaved) and the medians and the ratio reservations / ceiling are reported.

The fleet lives in a dedicated database (``neocloud_bench`` on the local PostgreSQL by default),
dropped and recreated at the start. The server (uvicorn with 2 workers, or daphne) runs as a
subprocess on 127.0.0.1 and is stopped at the end, also on errors. Progress goes to stderr; the
table of results to stdout and a JSON file to ``bench/results/placement-<date>.json``.

    .venv/bin/python bench/placement.py                 # everything, about 4 minutes
    .venv/bin/python bench/placement.py --skip-api      # placement only
    .venv/bin/python bench/placement.py --server both   # uvicorn and daphne, about 6 minutes

Needs the project's venv, PostgreSQL and Redis (``DATABASE_URL``/``REDIS_URL`` or the local
defaults) and, for the API part, ``wrk`` (``apt-get install wrk``). Nothing here asserts on time:
machines are noisy, so read medians and ratios, and compare only numbers from the same run.
"""

from __future__ import annotations

import argparse
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


@dataclass
class Fleet:
    node_offers: list = field(default_factory=list)
    rack_offers: list = field(default_factory=list)
    nodes: int = 0
    racks: int = 0
    nodes_per_offer: dict = field(default_factory=dict)
    allocations: int = 0
    busy_nodes: int = 0


def fleet_seed(*, nodes: int, rng: random.Random, now: datetime) -> Fleet:
    """10 sites × N racks × 8 nodes, racks alternating H100 and H200; a node offer per (site, type)
    and a rack offer for H100 at each site. Racks: a quarter fully busy, a quarter free, half with 4
    busy nodes; a busy node holds back-to-back allocations (gaps of up to 8 h) over the next 35 days,
    so a window in the next weeks overlaps allocations on about half the nodes."""
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
        Rack(site=site, name=f"r{r:03d}", power_budget_kw=Decimal("44"))
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

    offers = {}
    for site in sites:
        for kind in types:
            offers[(site.pk, kind.pk)] = Offer(
                site=site, accelerator_type=kind, shape=OfferShape.NODE, price_per_gpu_hour=Decimal("2.49")
            )
    rack_offers = [
        Offer(site=site, accelerator_type=types[0], shape=OfferShape.RACK, price_per_gpu_hour=Decimal("2.29"))
        for site in sites
    ]
    Offer.objects.bulk_create([*offers.values(), *rack_offers])
    fleet.node_offers, fleet.rack_offers = list(offers.values()), rack_offers
    for node in fleet_nodes:
        key = offers[(node.rack.site_id, node.accelerator_type_id)].pk
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
    for node in busy:
        offer = offers[(node.rack.site_id, node.accelerator_type_id)]
        t = now + timedelta(hours=rng.uniform(0, 12))
        while t < horizon:
            end = t + timedelta(hours=rng.uniform(12, 96))
            period = DateTimeTZRange(t, end, "[)")
            reservation = Reservation(
                organization=background,
                offer=offer,
                created_by=owner,
                shape=OfferShape.NODE,
                quantity=1,
                node_count=1,
                gpu_count=8,
                period=period,
                state=ReservationState.PENDING,
                price_per_gpu_hour=offer.price_per_gpu_hour,
            )
            reservations.append(reservation)
            allocations.append(
                Allocation(
                    reservation=reservation, node_id=node.pk, gpus=NumericRange(0, node.gpu_count), period=period
                )
            )
            t = end + timedelta(hours=rng.uniform(0, 8))
    progress = Progress("background reservations and allocations", len(reservations) * 2)
    batch = 5000
    for i in range(0, len(reservations), batch):
        Reservation.objects.bulk_create(reservations[i : i + batch])
        progress.advance(len(reservations[i : i + batch]))
    for i in range(0, len(allocations), batch):
        Allocation.objects.bulk_create(allocations[i : i + batch])
        progress.advance(len(allocations[i : i + batch]))
    progress.close(f"{len(allocations)} allocations on {len(busy)} nodes")
    fleet.allocations = len(allocations)
    return fleet


def database_analyze() -> None:
    """VACUUM ANALYZE after the bulk load, as autovacuum would soon do: without statistics the
    planner guesses, and the benchmark would measure the guess."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")


def tenant_make(label: str, i: int):
    from marketplace.choices import Role
    from marketplace.services.billing.credits import credits_grant
    from marketplace.services.tenancy.members import organization_create, user_create
    from marketplace.tenant_context import TenantContext

    user = user_create(email=f"bench-{label}-{i}@example.com")
    organization = organization_create(name=f"Bench {label} {i}", owner=user)
    # Reservations hold their expected cost (issue 6): ample credit, so money is never what refuses.
    credits_grant(organization=organization, amount=HUGE_CREDIT, memo="bench")
    return TenantContext(organization=organization, user=user, role=Role.OWNER)


# --- 1. Placement in process -------------------------------------------------------------------


@dataclass
class Request:
    offer: object
    quantity: int
    start: datetime
    end: datetime


def random_request(fleet: Fleet, rng: random.Random, now: datetime, rack_share: float = 0.2) -> Request:
    """A node offer (80 %) for 1-8 nodes or a rack offer (20 %), starting within the next 4 weeks,
    lasting 1-48 hours: inside the busy part of the calendar."""
    from marketplace.choices import OfferShape

    offer = rng.choice(fleet.rack_offers if rng.random() < rack_share else fleet.node_offers)
    quantity = 1 if offer.shape == OfferShape.RACK else rng.randint(1, 8)
    start = (now + timedelta(hours=rng.uniform(1, 28 * 24))).replace(second=0, microsecond=0)
    return Request(offer, quantity, start, start + timedelta(hours=rng.randint(1, 48)))


def overlap_share(fleet: Fleet, requests: list[Request]) -> float:
    """Median share of an offer's nodes that hold an allocation overlapping a request's window."""
    from django.db import connection

    from marketplace.selectors.capacity import free_nodes_per_rack

    shares = []
    for request in requests:
        if request.offer.shape != "node":
            continue
        free = sum(free_nodes_per_rack(offer=request.offer, start=request.start, end=request.end).values())
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM provisioning_node n JOIN provisioning_rack r ON r.id = n.rack_id "
                "WHERE r.site_id = %s AND n.accelerator_type_id = %s AND n.state = 'available'",
                [request.offer.site_id, request.offer.accelerator_type_id],
            )
            total = cursor.fetchone()[0]
        shares.append(1 - free / total)
    return median(shares) or 0.0


def measure_placement(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """placement_pick alone, each in a transaction rolled back: every sample sees the same fleet."""
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from marketplace.services.reservations.placement import CapacityUnavailable, placement_pick

    now = timezone.now()
    requests = [random_request(fleet, rng, now) for _ in range(count)]
    for request in requests[:20]:  # warm the connection, the plan cache and the buffers
        with transaction.atomic():
            try:
                placement_pick(offer=request.offer, quantity=request.quantity, start=request.start, end=request.end)
            except CapacityUnavailable:
                pass
            transaction.set_rollback(True)
    samples: dict[str, list[int]] = {"node": [], "rack": [], "node_refused": [], "rack_refused": []}
    progress = Progress("placement_pick (rolled back)", count)
    for request in requests:
        with transaction.atomic():
            t0 = time.perf_counter_ns()
            try:
                placement_pick(offer=request.offer, quantity=request.quantity, start=request.start, end=request.end)
                outcome = request.offer.shape
            except CapacityUnavailable:
                outcome = f"{request.offer.shape}_refused"
            samples[outcome].append(time.perf_counter_ns() - t0)
            transaction.set_rollback(True)
        progress.advance()
    progress.close()
    queries = {"node": [], "rack": []}
    for request in requests[:40]:
        with transaction.atomic(), CaptureQueriesContext(connection) as captured:
            try:
                placement_pick(offer=request.offer, quantity=request.quantity, start=request.start, end=request.end)
                queries[request.offer.shape].append(len(captured.captured_queries))
            except CapacityUnavailable:
                pass
            transaction.set_rollback(True)
    placed = samples["node"] + samples["rack"]
    return {
        "all_placed": summary_ms(placed),
        "node": summary_ms(samples["node"]),
        "rack": summary_ms(samples["rack"]),
        "node_refused": summary_ms(samples["node_refused"]),
        "rack_refused": summary_ms(samples["rack_refused"]),
        "statements_per_pick": {shape: median(n) for shape, n in queries.items()},
        "window_overlaps_share_of_nodes": overlap_share(fleet, requests[:100]),
    }


def measure_create(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """The whole reservation_create, committed: quota check, placement, rows, commit, event."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from marketplace.services.reservations.lifecycle import reservation_create
    from marketplace.services.reservations.placement import CapacityUnavailable

    tenant = tenant_make("inprocess", 0)
    now = timezone.now()
    requests = [random_request(fleet, rng, now) for _ in range(count + 40)]
    samples: dict[str, list[int]] = {"node": [], "rack": [], "refused": []}
    progress = Progress("reservation_create (committed)", count)
    for request in requests[:count]:
        t0 = time.perf_counter_ns()
        try:
            reservation_create(
                tenant=tenant, offer=request.offer, quantity=request.quantity, start=request.start, end=request.end
            )
            outcome = request.offer.shape
        except CapacityUnavailable:
            outcome = "refused"
        samples[outcome].append(time.perf_counter_ns() - t0)
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
        "all_created": summary_ms(samples["node"] + samples["rack"]),
        "node": summary_ms(samples["node"]),
        "rack": summary_ms(samples["rack"]),
        "refused": summary_ms(samples["refused"]),
        "statements_per_create": median(statements),
    }


def measure_refusals(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """Requests that cannot be placed, through reservation_create: the refusal also computes the
    earliest window that would fit (earliest_fit). Two kinds: more nodes than are free in the window
    (but fewer than the offer has), and more nodes than the offer has at all."""
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
    """What the load generator sends: quantity 1 of a random node offer, a random start within
    the next 360 days, 1-4 hours (bench/wrk_api.lua draws the same)."""
    start = now + timedelta(seconds=rng.randint(3600, API_HORIZON_DAYS * 86400))
    return {
        "offer": rng.choice(fleet.node_offers).pk,
        "quantity": 1,
        "start": start.replace(microsecond=0).isoformat(),
        "duration_hours": rng.randint(1, 4),
    }


def measure_request_path(fleet: Fleet, rng: random.Random, count: int) -> dict:
    """Where a POST /api/v1/reservations/ spends its time, without a server: the Django test client
    (the same middleware, authentication, view and serializer; WSGI instead of ASGI) for the two
    endpoints, and the view's steps called alone with the same kind of request."""
    from django.db import connection, transaction
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone
    from django.utils.dateparse import parse_datetime

    from console.kernel.events import publish, tenant_group
    from marketplace.selectors.catalog import offer_for_reservation
    from marketplace.selectors.reservations import reservation_get
    from marketplace.services.reservations.lifecycle import _check_quota, reservation_create
    from marketplace.services.reservations.placement import placement_pick
    from marketplace.services.tenancy.api_keys import api_key_create

    tenant = tenant_make("client", 0)
    _, key = api_key_create(tenant=tenant, name="bench")
    client = Client(SERVER_NAME="localhost", HTTP_AUTHORIZATION=f"Bearer {key}")
    now = timezone.now()

    def get_me():
        response = client.get("/api/v1/me/")
        if response.status_code != 200:
            raise RuntimeError(f"GET /api/v1/me/ answered {response.status_code}: {response.content[:300]!r}")

    created = []

    def post():
        response = client.post("/api/v1/reservations/", api_like_body(fleet, rng, now), content_type="application/json")
        if response.status_code != 201:
            raise RuntimeError(
                f"POST /api/v1/reservations/ answered {response.status_code}: {response.content[:300]!r}"
            )
        created.append(response.json()["id"])

    offers = {offer.pk: offer for offer in fleet.node_offers}

    def create():
        body = api_like_body(fleet, rng, now)
        start = parse_datetime(body["start"])
        reservation_create(
            tenant=tenant,
            offer=offers[body["offer"]],
            quantity=1,
            start=start,
            end=start + timedelta(hours=body["duration_hours"]),
        )

    def pick():
        body = api_like_body(fleet, rng, now)
        start = parse_datetime(body["start"])
        with transaction.atomic():
            placement_pick(
                offer=offers[body["offer"]],
                quantity=1,
                start=start,
                end=start + timedelta(hours=body["duration_hours"]),
            )
            transaction.set_rollback(True)

    def quota():
        body = api_like_body(fleet, rng, now)
        start = parse_datetime(body["start"])
        end = start + timedelta(hours=body["duration_hours"])
        _check_quota(organization=tenant.organization, offer=offers[body["offer"]], gpus=8, start=start, end=end)

    steps = {
        "client_get_me": get_me,
        "client_post_reservation": post,
        "offer_for_reservation": lambda: offer_for_reservation(offer_id=rng.choice(fleet.node_offers).pk),
        "reservation_create": create,
        "placement_pick": pick,
        "check_quota": quota,
        "publish": lambda: publish(tenant_group(tenant.organization.pk), "bench.ping", {"id": "bench"}),
        "reservation_get": lambda: reservation_get(tenant=tenant, reservation_id=rng.choice(created)),
    }
    result = {}
    progress = Progress("request path in process (test client)", len(steps) * count)
    for name, step in steps.items():
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
    from marketplace.models import Reservation

    return Reservation.objects.filter(organization_id__in=organization_ids).count()


def measure_api(
    *, fleet: Fleet, servers: list[str], env: dict, repeats: int, duration: int, connections: int, wrk: str
) -> dict:
    from django.db import connection

    tenants = [tenant_make("api", i) for i in range(connections)]
    from marketplace.services.tenancy.api_keys import api_key_create

    keys = [api_key_create(tenant=tenant, name="bench")[1] for tenant in tenants]
    organization_ids = [tenant.organization.pk for tenant in tenants]
    workdir = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    config = workdir / "wrk.conf"
    config.write_text(
        "".join(f"key {key}\n" for key in keys)
        + "".join(f"offer {offer.pk}\n" for offer in fleet.node_offers)
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
        f"Python {m['python']}, PostgreSQL {m['postgresql']}, Django {m['django']}",
        f"Fleet: {f['nodes']} nodes in {f['racks']} racks at {SITES} sites, {f['busy_nodes']} nodes busy with "
        f"{f['allocations']} allocations; a request's window overlaps allocations on "
        f"{f['window_overlaps_share']:.0%} of its offer's nodes (median)",
        "",
    ]
    if "placement" in results:
        p, c = results["placement"], results["create"]
        lines += [
            "In process                            count     p50 ms    p99 ms   statements",
            "-----------------------------------   -----   --------  --------   ----------",
        ]

        def row(label, s, statements=None):
            return (
                f"{label:<36}  {s['count']:>6}   {fmt(s['p50_ms'], 3):>8}  {fmt(s['p99_ms'], 3):>8}   "
                f"{fmt(statements, 0) if statements is not None else '':>10}"
            )

        lines += [
            row("placement_pick, placed", p["all_placed"]),
            row("  node offer, 1-8 nodes", p["node"], p["statements_per_pick"]["node"]),
            row("  rack offer, one rack", p["rack"], p["statements_per_pick"]["rack"]),
            row("placement_pick, refused: node offer", p["node_refused"]),
            row("placement_pick, refused: rack offer", p["rack_refused"]),
            row("reservation_create, committed", c["all_created"], c["statements_per_create"]),
            row("reservation_create, refused", c["refused"]),
        ]
        for kind, r in results.get("refusals", {}).items():
            lines.append(row(f"refused + earliest_fit: {kind}", r))
        lines.append("")
    if "request_path" in results:
        r = results["request_path"]
        lines += [
            "One request, in process (test client; API-like body)   p50 ms    p99 ms   statements",
            "-----------------------------------------------------  --------  --------   ----------",
        ]
        labels = {
            "client_get_me": "GET /api/v1/me/ through the test client",
            "client_post_reservation": "POST /api/v1/reservations/ through the test client",
            "offer_for_reservation": "  of which offer_for_reservation (the offer row)",
            "reservation_create": "  of which reservation_create (quantity 1)",
            "placement_pick": "    of which placement_pick (rolled back)",
            "check_quota": "    of which _check_quota",
            "publish": "    of which the event (console.kernel.events.publish)",
            "reservation_get": "  of which reservation_get (for the response)",
        }
        for name, label in labels.items():
            s = r[name]
            lines.append(f"{label:<53}  {fmt(s['p50_ms'], 3):>8}  {fmt(s['p99_ms'], 3):>8}   {s['statements']:>10}")
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
    parser.add_argument("--placements", type=int, default=1000, help="timed placements and creations (default 1000)")
    parser.add_argument(
        "--refusals", type=int, default=3, help="timed refusals of each kind (default 3; each takes seconds)"
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds per API measurement (default 15)")
    parser.add_argument("--repeats", type=int, default=3, help="API measurements per endpoint (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent API connections (default 32)")
    parser.add_argument("--server", choices=["uvicorn", "daphne", "both"], default="uvicorn")
    parser.add_argument("--skip-api", action="store_true", help="placement in process only")
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
    say(f"Recreating {urlsplit(database_url).path.lstrip('/')} and migrating")
    database_recreate(database_url)
    django_setup()
    from django.core.management import call_command
    from django.utils import timezone

    call_command("migrate", verbosity=0)
    rng = random.Random(args.seed)  # noqa: S311 - reproducible test data, not secrets
    say(f"Seeding a {args.nodes}-node fleet")
    fleet = fleet_seed(nodes=args.nodes, rng=rng, now=timezone.now())
    database_analyze()
    results: dict = {
        "machine": machine_info(wrk),
        "settings": {
            "nodes": args.nodes,
            "placements": args.placements,
            "refusals": args.refusals,
            "duration_s": args.duration,
            "repeats": args.repeats,
            "connections": args.connections,
            "seed": args.seed,
            "database": urlsplit(database_url)._replace(netloc=urlsplit(database_url).hostname or "").geturl(),
        },
    }
    say("Placement in process")
    results["placement"] = measure_placement(fleet, rng, args.placements)
    results["create"] = measure_create(fleet, rng, args.placements)
    results["request_path"] = measure_request_path(fleet, rng, min(args.placements, 300))
    if args.refusals:
        results["refusals"] = measure_refusals(fleet, rng, args.refusals)
    results["fleet"] = {
        "nodes": fleet.nodes,
        "racks": fleet.racks,
        "sites": SITES,
        "node_offers": len(fleet.node_offers),
        "rack_offers": len(fleet.rack_offers),
        "busy_nodes": fleet.busy_nodes,
        "allocations": fleet.allocations,
        "window_overlaps_share": results["placement"]["window_overlaps_share_of_nodes"],
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
    output = args.output or BENCH / "results" / f"placement-{datetime.now(UTC):%Y-%m-%d}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report(results))
    say(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
