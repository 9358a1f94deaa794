#!/usr/bin/env python
"""Live telemetry benchmark (issue 5): simulated agents for 1,250 nodes × 8 GPUs at 1 Hz (10,000 GPU
samples/s) against one ASGI server, Redis and PostgreSQL on this machine, with a client subscribed like
a browser.

It measures, in one run and on one machine:

1. **The ramp.** The load generator (bench/telemetry_agents.py: one WebSocket per node, the agent's
   protocol and frames) connects 125, 250, 500, 1,000 and 1,250 nodes in turn; at each level every
   node sends one batch of its 8 GPUs per second (and a heartbeat every 10 s). The measuring client
   (bench/telemetry_browser.py) holds ``/ws/fleet/`` as a staff user and ``/ws/reservations/<id>/`` for
   8 reservations as the tenant. For each level: batches offered by the agents, batches accepted by the
   server (its snapshot writes, counted in Redis; the flusher's counters for exact totals), frames
   delivered to the browser sockets, agent-to-browser latency p50/p99 (receive time - the batch's
   ``at``), what was sent but never delivered, and the CPU of each process (server, agents, browser
   client, Redis, PostgreSQL, everything else) over the steady-state window. Between levels the agents
   pause, the server drains, and the next nodes connect. A window in which other processes on the
   machine took more than ``--disturbed`` cores is measured again once.
2. **Servers and channel layers.** The ramp runs on daphne (one process) and on uvicorn (2 workers,
   ``--ws websockets`` as console/launcher.py runs it), both with the project's
   ``RedisPubSubChannelLayer``; then on daphne with channels-redis' core ``RedisChannelLayer`` at its
   default capacity (100) and with a large one, at ``--core-levels`` (bench/telemetry_settings.py).
3. **The real agent.** ``neocloud-agent fleet`` with the first ``--real-agents`` nodes, measured like a
   level, to show what the project's own agent process costs per batch next to the lean generator.
4. **The ceiling, in the same run**, before and after: Redis PUBLISH of a message the size of a node's
   batch with a subscriber (redis-benchmark, 32 clients); one Python process publishing one message per
   await (redis-py, as channels-redis does) to a subscriber in another process; and each channel layer
   alone in one process (bench/telemetry_layer.py).

The server runs with bench/gc_probe on its PYTHONPATH, which logs each garbage collection of 10 ms or
more (``--no-gc-probe`` to leave it out); the pauses are counted per window. Optional extras:
``--what-if-gc-freeze`` runs daphne once more with ``gc.freeze()`` after each connect phase (what the
probe's SIGUSR1 handler does; the project's code is unchanged), and ``--profile`` samples the daphne
process with py-spy while ``--profile-nodes`` nodes send, and splits the samples by what the server was
doing.

    .venv/bin/python bench/telemetry.py                      # everything, about 10 minutes
    .venv/bin/python bench/telemetry.py --nodes 500 --seconds 10 --skip-core --servers daphne
    .venv/bin/python bench/telemetry.py --profile --py-spy /tmp/pyspy/bin/py-spy --what-if-gc-freeze

The fleet lives in a dedicated database (``neocloud_telemetry_bench`` on the local PostgreSQL by
default), dropped and recreated at the start; Redis database 7 by default (only this benchmark's keys
are deleted; its channel-layer prefix is its own). All traffic is on 127.0.0.1. Progress goes to
stderr; the tables to stdout and everything to ``bench/results/telemetry-<date>.json``. Nothing here
asserts on time: machines are noisy, so read medians and ratios, and compare only numbers from the same
run.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from database import bench_database_url, database_recreate  # bench/database.py

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/neocloud_telemetry_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
CHANNEL_PREFIX = "bench-telemetry"
SITES, NODES_PER_RACK, GPUS_PER_NODE = 5, 8, 8
GPU_MODEL = "h100-sxm-80gb"
FLUSH_SECONDS = 10  # ROLLUP_FLUSH_SECONDS, the project's default
HEARTBEAT_SECONDS = 10  # AGENT_HEARTBEAT_SECONDS, the project's default
TELEMETRY_KEYS = ("neocloud:telemetry:counters", "neocloud:telemetry:latest", "neocloud:telemetry:summary")
COUNTERS_KEY = TELEMETRY_KEYS[0]


# --- Output and statistics -------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0-100), linear interpolation between closest ranks; ``values`` sorted."""
    if not values:
        return None
    rank = (len(values) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


def rounded(value, digits: int = 3):
    return None if value is None else round(value, digits)


# --- Environment and database ----------------------------------------------------------------------


def server_environment(database_url: str, redis_url: str) -> dict[str, str]:
    """What the project reads from the environment, for this process and the servers it starts."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DJANGO_SETTINGS_MODULE": "bench.telemetry_settings",
            "BENCH_CHANNEL_LAYER": "pubsub",
            "BENCH_CHANNEL_PREFIX": CHANNEL_PREFIX,
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "TELEMETRY_SECONDS": "1",
            "AGENT_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "ROLLUP_FLUSH_SECONDS": str(FLUSH_SECONDS),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def redis_client(redis_url: str):
    import redis

    return redis.Redis.from_url(redis_url)


def redis_clear(redis_url: str) -> None:
    """Only this benchmark's keys: the telemetry snapshots and counters, and the core layer's queues."""
    client = redis_client(redis_url)
    client.delete(*TELEMETRY_KEYS)
    keys = []
    for i, key in enumerate(client.scan_iter(match=f"{CHANNEL_PREFIX}*", count=1000)):
        keys.append(key)
        if i > 1_000_000:
            break
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def redis_counters(redis_url: str) -> dict[str, int]:
    raw = redis_client(redis_url).hgetall(COUNTERS_KEY)
    return {k.decode(): int(v) for k, v in raw.items()}


def redis_stats(redis_url: str) -> dict:
    client = redis_client(redis_url)
    commands = client.info("commandstats")

    def calls(name: str) -> int:
        return int(commands.get(f"cmdstat_{name}", {}).get("calls", 0))

    stats, clients = client.info("stats"), client.info("clients")
    return {
        "hset": calls("hset"),
        "publish": calls("publish"),
        "eval": calls("eval") + calls("evalsha"),
        "zadd": calls("zadd"),
        "bzpopmin": calls("bzpopmin"),
        "commands": int(stats.get("total_commands_processed", 0)),
        "net_out_bytes": int(stats.get("total_net_output_bytes", 0)),
        "max_output_buffer": int(clients.get("client_recent_max_output_buffer", 0)),
    }


def redis_pid(redis_url: str) -> int | None:
    return int(redis_client(redis_url).info("server").get("process_id", 0)) or None


def postgres_pid() -> int | None:
    """The postmaster of the server we use (its data directory's postmaster.pid), if readable."""
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW data_directory")
            data_dir = Path(cursor.fetchone()[0])
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except Exception:  # noqa: BLE001 - without it PostgreSQL's CPU is left out, and the report says so
        return None


# --- The fleet -------------------------------------------------------------------------------------


@dataclass
class Fixture:
    hostnames: list[str]
    secrets: list[str]
    node_ids: list[int]
    reserved: set[int]  # node indexes a tenant's active reservation holds
    watched: list[str]  # reservations the measuring client subscribes to
    watched_nodes: set[int]
    staff_cookie: str
    tenant_cookie: str
    gpu_name: str
    memory_mib: int
    reservations: int = 0
    frame_bytes: dict = field(default_factory=dict)


def fixture_build(*, nodes: int, watch: int) -> Fixture:
    """``nodes`` nodes of 8 H100 in racks of 8 over 5 sites, every GPU row with the UUID the simulated
    backend reports, a stored secret per node (digest only, as enrolment leaves it), every other rack
    held by one tenant's active rack reservation, and browser sessions for a staff user and the tenant."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.conf import settings
    from django.db.backends.postgresql.psycopg_any import DateTimeTZRange, NumericRange
    from django.test import Client
    from django.utils import timezone

    from console.kernel.tokens import new_token
    from marketplace.choices import OfferShape, ReservationState
    from marketplace.models import Allocation, Offer, Reservation
    from marketplace.services.tenancy.members import organization_create, user_create
    from provisioning.agent.backends.profile import load_profile
    from provisioning.agent.backends.simulated import gpu_uuid
    from provisioning.choices import NodeState, SiteKind, Vendor
    from provisioning.models import AcceleratorType, Gpu, Node, NodeCredential, Rack, Site

    profile = load_profile(GPU_MODEL)
    kind = AcceleratorType.objects.create(
        slug="h100-sxm-80gb",
        vendor=Vendor.NVIDIA,
        model="H100 SXM",
        memory_gib=80,
        tdp_watts=700,
        interconnect="NVLink 4 (900 GB/s)",
        device_name=profile.name,
    )
    sites = Site.objects.bulk_create(
        Site(slug=f"tb-{s}", name=f"Telemetry bench {s}", region="eu-central", kind=SiteKind.HALL, location="Bench")
        for s in range(SITES)
    )
    rack_count = math.ceil(nodes / NODES_PER_RACK)
    racks = Rack.objects.bulk_create(
        Rack(site=sites[r % SITES], name=f"r{r:03d}", power_budget_kw=Decimal("44")) for r in range(rack_count)
    )
    rows = []
    for i in range(nodes):
        rack = racks[i // NODES_PER_RACK]
        rows.append(
            Node(
                rack=rack,
                hostname=f"{rack.site.slug}-{rack.name}-n{i % NODES_PER_RACK}",
                state=NodeState.AVAILABLE,
                accelerator_type=kind,
                gpu_count=GPUS_PER_NODE,
            )
        )
    fleet = Node.objects.bulk_create(rows, batch_size=2000)
    Gpu.objects.bulk_create(
        (
            Gpu(
                node=node,
                index=g,
                uuid=gpu_uuid(node.hostname, g),
                accelerator_type=kind,
                memory_mib=profile.memory_total_mib,
            )
            for node in fleet
            for g in range(GPUS_PER_NODE)
        ),
        batch_size=5000,
    )
    tokens = [new_token("ncn") for _ in fleet]
    NodeCredential.objects.bulk_create(
        NodeCredential(node=node, prefix=t.prefix, secret_hash=t.digest, rotated_at=timezone.now())
        for node, t in zip(fleet, tokens, strict=True)
    )
    staff = user_create(email="telemetry-bench-ops@example.com", is_staff=True)
    member = user_create(email="telemetry-bench-tenant@example.com")
    organization = organization_create(name="Telemetry bench tenant", owner=member)
    offers = {
        site.pk: Offer.objects.create(
            site=site, accelerator_type=kind, shape=OfferShape.RACK, price_per_gpu_hour=Decimal("2.29")
        )
        for site in sites
    }
    now = timezone.now()
    period = DateTimeTZRange(now - timedelta(hours=1), now + timedelta(days=30), "[)")
    reserved: set[int] = set()
    watched: list[str] = []
    watched_nodes: set[int] = set()
    reservations, allocations = [], []
    for r, rack in enumerate(racks):
        if r % 2:
            continue
        members = [i for i in range(r * NODES_PER_RACK, min(nodes, (r + 1) * NODES_PER_RACK))]
        reservation = Reservation(
            organization=organization,
            offer=offers[rack.site_id],
            created_by=member,
            shape=OfferShape.RACK,
            quantity=1,
            rack=rack,
            node_count=len(members),
            gpu_count=len(members) * GPUS_PER_NODE,
            period=period,
            state=ReservationState.ACTIVE,
            price_per_gpu_hour=Decimal("2.29"),
            activated_at=now - timedelta(hours=1),
        )
        reservations.append(reservation)
        allocations += [
            Allocation(
                reservation=reservation, node_id=fleet[i].pk, gpus=NumericRange(0, fleet[i].gpu_count), period=period
            )
            for i in members
        ]
        reserved.update(members)
        if len(watched) < watch:
            watched.append(str(reservation.pk))
            watched_nodes.update(members)
    Reservation.objects.bulk_create(reservations)
    Allocation.objects.bulk_create(allocations, batch_size=2000)

    def cookie(user) -> str:
        client = Client()
        client.force_login(user)
        return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"

    return Fixture(
        hostnames=[n.hostname for n in fleet],
        secrets=[t.plaintext for t in tokens],
        node_ids=[n.pk for n in fleet],
        reserved=reserved,
        watched=watched,
        watched_nodes=watched_nodes,
        staff_cookie=cookie(staff),
        tenant_cookie=cookie(member),
        gpu_name=profile.name,
        memory_mib=profile.memory_total_mib,
        reservations=len(reservations),
    )


def frame_sizes(fixture: Fixture) -> dict:
    """Sizes of one node's frames as they travel: the agent's batch, the tenant and fleet texts the server
    encodes, and the channel-layer message (msgpack) of the tenant text."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    import msgpack

    from provisioning.agent.backends import get_backend
    from provisioning.agent.client import telemetry_reading
    from provisioning.models import Gpu
    from provisioning.services import telemetry_ingest

    backend = get_backend(
        "simulated",
        hostname=fixture.hostnames[0],
        gpus=GPUS_PER_NODE,
        gpu_name=fixture.gpu_name,
        memory_mib=fixture.memory_mib,
    )
    gpus = [telemetry_reading(r) for r in backend.sample()]
    plain = [{k: v for k, v in g.items() if k != "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"} for g in gpus]
    agent_frame = json.dumps({"type": "telemetry", "seq": 2, "at": time.time(), "gpus": plain})
    stream = telemetry_ingest.NodeStream(
        node_id=fixture.node_ids[0],
        hostname=fixture.hostnames[0],
        site="tb-0",
        rack="r000",
        gpu_ids=dict(Gpu.objects.filter(node_id=fixture.node_ids[0]).values_list("uuid", "id")),
    )
    at, readings = telemetry_ingest.validate(json.loads(agent_frame), stream)
    encoded = telemetry_ingest.encode(stream, at, readings)  # no audience here: the whole node's text
    tenant_text, fleet_text = encoded.node, encoded.fleet
    message = msgpack.packb({"type": "telemetry.frame", "text": tenant_text})
    return {
        "agent_batch": len(agent_frame),
        "agent_batch_with_energy": len(json.dumps({"type": "telemetry", "seq": 1, "at": time.time(), "gpus": gpus})),
        "tenant_text": len(tenant_text),
        "fleet_text": len(fleet_text),
        "layer_message": len(message),
    }


def wait_hello(fixture: Fixture, indexes: range, since: float, timeout: float) -> int:
    """Until the nodes' hello was processed (node_hello stamps last_seen_at); returns how many were."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.db import connection

    from provisioning.models import Node

    ids = [fixture.node_ids[i] for i in indexes]
    if not ids:
        return 0
    stamp = datetime.fromtimestamp(since - 1, UTC)
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        done = Node.objects.filter(pk__in=ids, last_seen_at__gte=stamp).count()
        if done >= len(ids):
            break
        time.sleep(0.5)
    connection.close()
    return done


# --- Processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
    except ProcessLookupError:
        pass


class Server:
    """The ASGI server as a subprocess in its own process group; stop() ends the group."""

    def __init__(self, kind: str, env: dict[str, str], log_path: Path):
        self.kind, self.port = kind, free_port()
        if kind == "uvicorn":
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "console.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "2",
                "--no-access-log",
                "--ws",
                "websockets",
                "--log-level",
                "warning",
            ]  # as console/launcher.py runs it
        else:
            command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "-v", "0"]
            command.append("console.asgi:application")
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as response:  # noqa: S310 - loopback
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} did not answer within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self.process)
        self.log.close()


class Child:
    """A helper process driven by JSON lines on stdin/stdout (its stderr is ours: progress lines)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]):
        self.name = name
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer within {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited ({self.process.poll()})")
        return json.loads(line)

    def command(self, data: dict, timeout: float) -> dict:
        self.process.stdin.write(json.dumps(data) + "\n")
        self.process.stdin.flush()
        return self.expect(timeout)

    def stop(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        stop_group(self.process, timeout=10)


class CpuMeter:
    """CPU seconds of each role's process and its children (live ones, and exited ones their parent
    waited for), and the machine's busy time."""

    def __init__(self, roles: dict[str, int | None], without_children: tuple[str, ...] = ("bench",)):
        import psutil

        self.psutil = psutil
        self.without_children = without_children
        self.roles = {}
        for name, pid in roles.items():
            if pid:
                try:
                    self.roles[name] = psutil.Process(pid)
                except psutil.Error:
                    pass

    def _seconds(self, process, children: bool) -> float:
        try:
            t = process.cpu_times()
            if not children:
                return t.user + t.system
            total = t.user + t.system + t.children_user + t.children_system
            for child in process.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except self.psutil.Error:
                    pass
            return total
        except self.psutil.Error:
            return float("nan")

    def sample(self) -> dict:
        machine = self.psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        return {
            "t": time.monotonic(),
            "machine": busy,
            **{name: self._seconds(p, name not in self.without_children) for name, p in self.roles.items()},
        }

    @staticmethod
    def cores(a: dict, b: dict) -> dict:
        span = b["t"] - a["t"]
        out = {name: rounded((b[name] - a[name]) / span, 3) for name in a if name != "t"}
        ours = sum(v for name, v in out.items() if name not in ("machine",) and v is not None and v == v)
        out["other"] = rounded(out["machine"] - ours, 3)
        return out


# --- The ceiling -----------------------------------------------------------------------------------


def ceiling_redis_benchmark(redis_url: str, size: int, requests: int = 200_000) -> dict:
    """redis-benchmark PUBLISH of a ``size``-byte message from 32 clients, with one subscriber (redis-cli)."""
    bench, cli = shutil.which("redis-benchmark"), shutil.which("redis-cli")
    if not bench or not cli:
        return {"error": "redis-benchmark or redis-cli not found"}
    parts = urlsplit(redis_url)
    host, port = parts.hostname or "127.0.0.1", str(parts.port or 6379)
    channel = f"{CHANNEL_PREFIX}:ceiling"
    subscriber = subprocess.Popen(
        [cli, "-h", host, "-p", port, "subscribe", channel], stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        time.sleep(0.5)
        result = subprocess.run(
            [bench, "-h", host, "-p", port, "-c", "32", "-n", str(requests), "--csv", "PUBLISH", channel, "x" * size],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        stop_group(subscriber, timeout=5)
    lines = [line for line in result.stdout.splitlines() if line.startswith('"PUBLISH')]
    if not lines:
        return {"error": (result.stdout + result.stderr)[-500:]}
    cells = [c.strip('"') for c in lines[-1].split('","')]
    return {"messages_per_s": float(cells[1]), "p50_ms": float(cells[4]), "p99_ms": float(cells[6]), "bytes": size}


CEILING_SUBSCRIBER = """
import sys, time, redis
r = redis.Redis.from_url(sys.argv[1]); p = r.pubsub(ignore_subscribe_messages=True); p.subscribe(sys.argv[2])
print("ready", flush=True)
count, first, last, deadline = 0, None, None, time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    m = p.get_message(timeout=1.0)
    if m is None:
        continue
    if m["data"] == b"stop":
        break
    last = time.monotonic(); first = first or last; count += 1
print(count, (last - first) if count > 1 else 0, flush=True)
"""


def ceiling_python_pair(redis_url: str, size: int, seconds: float = 5.0, concurrency: int = 32) -> dict:
    """One Python process publishing (redis-py asyncio, one message per await, ``concurrency`` tasks: how
    channels-redis' pub/sub layer publishes) to one subscriber in another process; delivered/s."""
    import redis.asyncio

    channel = f"{CHANNEL_PREFIX}:ceiling-py"
    subscriber = subprocess.Popen(
        [sys.executable, "-c", CEILING_SUBSCRIBER, redis_url, channel, str(seconds + 30)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        subscriber.stdout.readline()
        payload = b"x" * size

        async def publish() -> int:
            client = redis.asyncio.Redis.from_url(redis_url)
            sent = 0
            deadline = time.monotonic() + seconds

            async def worker() -> None:
                nonlocal sent
                while time.monotonic() < deadline:
                    await client.publish(channel, payload)
                    sent += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            await client.publish(channel, b"stop")
            await client.aclose()
            return sent

        started = time.monotonic()
        sent = asyncio.run(publish())
        elapsed = time.monotonic() - started
        out, _ = subscriber.communicate(timeout=60)
        received, span = out.split()
    finally:
        stop_group(subscriber, timeout=5)
    return {
        "published_per_s": round(sent / elapsed),
        "delivered_per_s": round(int(received) / float(span)) if float(span) else None,
        "sent": sent,
        "received": int(received),
        "bytes": size,
    }


def ceiling_layer(env: dict[str, str], layer: str, capacity: int, size: int, args) -> dict:
    """bench/telemetry_layer.py: group_send/s of one process through the layer, and what its own
    consumer channel received."""
    layer_env = {
        **env,
        "BENCH_CHANNEL_LAYER": layer,
        "BENCH_CHANNEL_CAPACITY": str(capacity),
        "BENCH_CORE_REDIS": args.core_redis,
        "BENCH_CHANNEL_PREFIX": f"{CHANNEL_PREFIX}-ceiling",
    }
    result = subprocess.run(
        [sys.executable, str(BENCH / "telemetry_layer.py"), "--seconds", "3", "--size", str(size), "--tasks", "32"],
        cwd=ROOT,
        env=layer_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (result.stdout + result.stderr)[-500:]}
    return json.loads(lines[-1])


def measure_ceiling(redis_url: str, size: int, label: str, env: dict[str, str], args) -> dict:
    say(f"Ceiling ({label}): Redis PUBLISH of {size}-byte messages")
    result = {"redis_benchmark": ceiling_redis_benchmark(redis_url, size)}
    result["python_pair"] = ceiling_python_pair(redis_url, size)
    rb, py = result["redis_benchmark"], result["python_pair"]
    say(
        f"  redis-benchmark: {rb.get('messages_per_s', '?')} msg/s; "
        f"python publisher → subscriber: {py['delivered_per_s']} msg/s delivered"
    )
    result["layer"] = {"pubsub": ceiling_layer(env, "pubsub", 100, size, args)}
    if not args.skip_core:
        result["layer"]["core, capacity 100"] = ceiling_layer(env, "core", 100, size, args)
        result["layer"][f"core, capacity {args.core_large_capacity}"] = ceiling_layer(
            env, "core", args.core_large_capacity, size, args
        )
    for name, layer in result["layer"].items():
        say(
            f"  channel layer {name}: {layer.get('group_send_per_s')} group_send/s, "
            f"{layer.get('lost')} of {layer.get('sent')} not received"
        )
    return result


# --- One configuration: a server, a channel layer, a ramp ------------------------------------------


@dataclass
class Config:
    name: str
    server: str
    layer: str = "pubsub"
    capacity: int = 100
    levels: list[int] = field(default_factory=list)
    real_agents: int = 0
    gc_freeze: bool = False  # what-if: gc.freeze() in the server after each connect phase


@dataclass
class Window:
    """One measured level: its times (wall clock) and what was sampled at the edges."""

    nodes: int
    t_on: float
    t0: float
    t1: float
    t_off: float
    cpu: dict
    redis: dict
    drain_s: float
    counters_before: dict = field(default_factory=dict)
    counters_after: dict = field(default_factory=dict)
    connect: dict = field(default_factory=dict)
    hello_done: int = 0
    kind: str = "lean"
    attempt: int = 0
    disturbed: bool = False  # other processes took more than --disturbed cores during the window
    quiet_wait_s: float = 0.0


def helper_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "DJANGO_SETTINGS_MODULE": ""}


def drain(browser: Child, quiet_s: float, timeout: float) -> float:
    """Until the browser client has received nothing new for ``quiet_s``; returns how long it took."""
    started = time.monotonic()
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() - started < timeout:
        count = browser.command({"cmd": "count"}, timeout=30)
        total = count["fleet"] + count["tenant"]
        if total != last_count:
            last_count, last_change = total, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
        time.sleep(0.25)
    return time.monotonic() - started - quiet_s


def start_browser(server: Server, fixture: Fixture, env: dict[str, str], workdir: Path, results: Path) -> Child:
    """The measuring client, its sockets open (raises if the server refused one)."""
    config = workdir / "browser-config.json"
    config.write_text(
        json.dumps(
            {
                "base": f"ws://127.0.0.1:{server.port}",
                "origin": server.base,
                "staff_cookie": fixture.staff_cookie,
                "tenant_cookie": fixture.tenant_cookie,
                "reservations": fixture.watched,
                "hostnames": fixture.hostnames,
            }
        )
    )
    script = str(BENCH / "telemetry_browser.py")
    browser = Child(
        "browser",
        [sys.executable, script, "--config", str(config), "--results", str(results), "--uvloop"],
        helper_env(env),
    )
    try:
        ready = browser.expect(timeout=60)
        if ready.get("refused"):
            raise RuntimeError(f"the server refused the browser sockets: {ready['refused']}")
    except BaseException:
        browser.stop()
        raise
    return browser


def start_agents(
    server: Server, fixture: Fixture, count: int, args, env: dict[str, str], workdir: Path, results: Path
) -> Child:
    """The load generator for the first ``count`` nodes, built and waiting for ``connect``."""
    config = workdir / "agents-config.json"
    config.write_text(
        json.dumps(
            {
                "url": f"ws://127.0.0.1:{server.port}/agent/v1/",
                "nodes": [
                    {"hostname": h, "secret": s}
                    for h, s in zip(fixture.hostnames[:count], fixture.secrets[:count], strict=True)
                ],
                "gpus": GPUS_PER_NODE,
                "gpu_name": fixture.gpu_name,
                "memory_mib": fixture.memory_mib,
                "seed": args.seed,
            }
        )
    )
    script = str(BENCH / "telemetry_agents.py")
    agents = Child(
        "agents",
        [sys.executable, script, "--config", str(config), "--results", str(results), "--uvloop"],
        helper_env(env),
    )
    try:
        agents.expect(timeout=120)
    except BaseException:
        agents.stop()
        raise
    return agents


def freeze_server(server: Server) -> None:
    """What-if: SIGUSR1 to the processes that serve requests (bench/gc_probe: gc.collect + gc.freeze)."""
    import psutil

    parent = psutil.Process(server.process.pid)
    workers = parent.children() if server.kind == "uvicorn" else [parent]
    for worker in workers:
        os.kill(worker.pid, signal.SIGUSR1)
    time.sleep(2)


def gc_pauses(log_path: Path) -> list[dict]:
    """The ``[gc-probe]`` lines of the server's log (bench/gc_probe/sitecustomize.py)."""
    pauses = []
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return pauses
    for line in text.splitlines():
        if not line.startswith("[gc-probe]"):
            continue
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        try:
            pauses.append(
                {"at": float(fields["at"]), "generation": int(fields["generation"]), "ms": float(fields["ms"])}
            )
        except (KeyError, ValueError):
            continue
    return pauses


def run_config(config: Config, fixture: Fixture, args, env: dict[str, str], workdir: Path, redis_url: str) -> dict:
    say(
        f"== {config.name}: levels {config.levels}"
        + (f", real agents {config.real_agents}" if config.real_agents else "")
    )
    redis_clear(redis_url)
    server_env = {
        **env,
        "BENCH_CHANNEL_LAYER": config.layer,
        "BENCH_CHANNEL_CAPACITY": str(config.capacity),
        "BENCH_CORE_REDIS": args.core_redis,
    }
    if config.layer == "core" and args.core_redis == "bench":
        # The project's own Redis client (the telemetry snapshot) has redis-py 8's pool of 100 connections
        # that refuses the 101st; with the core layer the snapshots run concurrently and reach it.
        separator = "&" if "?" in redis_url else "?"
        server_env["REDIS_URL"] = f"{redis_url}{separator}max_connections=10000"
    if args.gc_probe or config.gc_freeze:
        server_env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{BENCH / 'gc_probe'}"
    if config.gc_freeze:
        server_env["BENCH_GC_FREEZE_ON_SIGNAL"] = "1"
    tag = "".join(c if c.isalnum() else "-" for c in config.name)
    server = Server(config.server, server_env, workdir / f"{tag}.log")
    children: list[Child] = []
    windows: list[Window] = []
    agents_file, browser_file = workdir / f"{tag}-agents.json", workdir / f"{tag}-browser.json"
    try:
        server.wait_ready()
        say(f"  {config.server} on port {server.port} ({config.layer} layer)")
        browser = start_browser(server, fixture, env, workdir, browser_file)
        children.append(browser)
        roles = {
            "server": server.process.pid,
            "browser": browser.process.pid,
            "redis": redis_pid(redis_url),
            "postgres": postgres_pid(),
            "bench": os.getpid(),
        }
        last_quiet = time.time()
        if config.real_agents:
            windows.append(real_agents_window(config, fixture, args, env, workdir, server, browser, roles))
            last_quiet = time.time()
        agents = start_agents(server, fixture, max(config.levels), args, env, workdir, agents_file)
        children.append(agents)
        meter = CpuMeter({**roles, "agents": agents.process.pid})
        connected = 0
        for nodes in config.levels:
            t_connect = time.time()
            connect = agents.command({"cmd": "connect", "n": nodes}, timeout=600)
            hello = wait_hello(fixture, range(connected, nodes), t_connect, timeout=180)
            if hello < nodes - connected:
                say(f"  only {hello} of {nodes - connected} new nodes said hello")
            connected = nodes
            if config.gc_freeze:
                freeze_server(server)
            for attempt in range(1 + args.retries):
                # Every batch accepted so far is in the counters once a flush ran after the last one.
                time.sleep(max(0.0, last_quiet + FLUSH_SECONDS + 1.5 - time.time()))
                counters = redis_counters(redis_url)
                if windows and windows[-1].kind == "lean":
                    windows[-1].counters_after = counters
                waited = wait_quiet(meter, args.disturbed, timeout=args.quiet_timeout)
                window = measure_window(nodes, agents, browser, meter, args, redis_url)
                last_quiet = time.time()
                window.counters_before, window.connect, window.hello_done = counters, connect, hello
                window.quiet_wait_s = waited
                window.attempt = attempt
                windows.append(window)
                other = window.cpu.get("other") or 0.0
                say(f"  {nodes} nodes: drained in {window.drain_s:.1f} s; CPU {window.cpu}")
                if other <= args.disturbed:
                    break
                window.disturbed = True
                say(f"  {nodes} nodes: other processes used {other:.2f} cores during the window")
        time.sleep(max(0.0, last_quiet + FLUSH_SECONDS + 1.5 - time.time()))
        if windows and windows[-1].kind == "lean":
            windows[-1].counters_after = redis_counters(redis_url)
        agents.command({"cmd": "stop"}, timeout=120)
        browser.command({"cmd": "stop"}, timeout=120)
    finally:
        for child in children:
            child.stop()
        server.stop()
    log_tail = "\n".join(line for line in server.log_tail(200_000).splitlines() if not line.startswith("[gc-probe]"))
    pauses = gc_pauses(server.log_path)
    sent = json.loads(agents_file.read_text()) if agents_file.exists() else {}
    feeds = json.loads(browser_file.read_text()) if browser_file.exists() else []
    result = analyse(config, windows, sent, feeds, fixture, args)
    for level, window in zip(result["levels"], windows, strict=True):
        inside = [x for x in pauses if window.t0 <= x["at"] < window.t1]
        level["gc_pauses"] = {
            "count": len(inside),
            "generation_2": sum(1 for x in inside if x["generation"] == 2),
            "total_ms": round(sum(x["ms"] for x in inside), 1),
            "max_ms": max((x["ms"] for x in inside), default=None),
        }
    if args.raw:
        args.raw.mkdir(parents=True, exist_ok=True)
        shutil.copy(server.log_path, args.raw / server.log_path.name)
    result["server_log_tail"] = log_tail[-2000:] if log_tail.strip() else ""
    for path in (agents_file, browser_file):
        if args.raw and path.exists():
            args.raw.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, args.raw / path.name)
            (args.raw / f"{tag}-windows.json").write_text(json.dumps([vars(w) for w in windows], default=str))
        path.unlink(missing_ok=True)
    return result


def wait_quiet(meter: CpuMeter, threshold: float, timeout: float) -> float:
    """Until the machine's other users take at most ``threshold`` cores over a second (at most ``timeout``
    seconds); returns how long it waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        a = meter.sample()
        time.sleep(1.0)
        if (CpuMeter.cores(a, meter.sample()).get("other") or 0.0) <= threshold:
            break
    return round(time.monotonic() - started, 1)


def measure_window(nodes: int, agents: Child, browser: Child, meter: CpuMeter, args, redis_url: str) -> Window:
    """Telemetry on for every connected node; warm-up, the measured window, telemetry off, drain."""
    agents.command({"cmd": "telemetry", "on": True}, timeout=30)
    t_on = time.time()
    say(f"  {nodes} nodes: telemetry on; {args.warmup} s warm-up, {args.seconds} s measured")
    time.sleep(args.warmup)
    cpu0, redis0, t0 = meter.sample(), redis_stats(redis_url), time.time()
    time.sleep(args.seconds)
    cpu1, redis1, t1 = meter.sample(), redis_stats(redis_url), time.time()
    agents.command({"cmd": "telemetry", "on": False}, timeout=30)
    t_off = time.time()
    drained = drain(browser, quiet_s=2.0, timeout=args.drain_timeout)
    return Window(
        nodes=nodes,
        t_on=t_on,
        t0=t0,
        t1=t1,
        t_off=t_off,
        cpu=CpuMeter.cores(cpu0, cpu1),
        redis={k: redis1[k] - redis0[k] for k in redis0 if k != "max_output_buffer"}
        | {"max_output_buffer": redis1["max_output_buffer"]},
        drain_s=drained,
    )


def real_agents_window(config, fixture, args, env, workdir, server, browser, roles) -> Window:
    """``neocloud-agent fleet`` with the first ``real_agents`` nodes (their stored secrets in per-node state
    directories, as after enrolment), measured like a level; then stopped."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from provisioning.agent.credentials import Credentials, store_credentials

    count = config.real_agents
    state_dir = workdir / "agent-state"
    shutil.rmtree(state_dir, ignore_errors=True)
    members = []
    for hostname, secret in zip(fixture.hostnames[:count], fixture.secrets[:count], strict=True):
        store_credentials(state_dir / hostname, Credentials(node=hostname, secret=secret))
        members.append(
            {
                "hostname": hostname,
                "token": None,
                "gpus": GPUS_PER_NODE,
                "gpu_name": fixture.gpu_name,
                "gpu_memory_mib": fixture.memory_mib,
            }
        )
    tokens = workdir / "fleet-tokens.json"
    tokens.write_text(json.dumps(members))
    executable = Path(sys.executable).parent / "neocloud-agent"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "provisioning.agent.cli"]
    command += [
        "--log-level",
        "WARNING",
        "fleet",
        "--server",
        server.base,
        "--tokens",
        str(tokens),
        "--state-dir",
        str(state_dir),
        "--backend",
        "simulated",
        "--driver",
        "simulated",
    ]
    say(f"  real agents: neocloud-agent fleet with {count} nodes")
    t_start = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=helper_env(env), start_new_session=True)
    try:
        hello = wait_hello(fixture, range(count), t_start, timeout=180)
        meter = CpuMeter({**roles, "agents": process.pid})
        waited = wait_quiet(meter, args.disturbed, timeout=args.quiet_timeout)
        t_on = time.time()
        time.sleep(args.warmup)
        cpu0, redis0, t0 = meter.sample(), redis_stats(args.redis_url), time.time()
        time.sleep(args.seconds)
        cpu1, redis1, t1 = meter.sample(), redis_stats(args.redis_url), time.time()
    finally:
        stop_group(process)
    t_off = time.time()
    drained = drain(browser, quiet_s=2.0, timeout=args.drain_timeout)
    say(f"  real agents: stopped; CPU {CpuMeter.cores(cpu0, cpu1)}")
    window = Window(
        nodes=count,
        t_on=t_on,
        t0=t0,
        t1=t1,
        t_off=t_off,
        cpu=CpuMeter.cores(cpu0, cpu1),
        redis={k: redis1[k] - redis0[k] for k in redis0 if k != "max_output_buffer"}
        | {"max_output_buffer": redis1["max_output_buffer"]},
        drain_s=drained,
        hello_done=hello,
        kind="real",
        quiet_wait_s=waited,
    )
    window.disturbed = (window.cpu.get("other") or 0.0) > args.disturbed
    return window


# --- Analysis --------------------------------------------------------------------------------------


class Series:
    """Frames of one kind sorted by ``at``, with their receive times; and the receive times sorted."""

    def __init__(self, at: list[float], received: list[float], node: list[int] | None = None):
        order = sorted(range(len(at)), key=at.__getitem__)
        self.at = [at[i] for i in order]
        self.received = [received[i] for i in order] if received else []
        self.node = [node[i] for i in order] if node else []
        self.received_sorted = sorted(received) if received else []

    def by_at(self, t0: float, t1: float) -> tuple[int, int]:
        return bisect.bisect_left(self.at, t0), bisect.bisect_left(self.at, t1)

    def count_received(self, t0: float, t1: float) -> int:
        return bisect.bisect_left(self.received_sorted, t1) - bisect.bisect_left(self.received_sorted, t0)


def latency_summary(series: Series, t0: float, t1: float) -> dict:
    lo, hi = series.by_at(t0, t1)
    latencies = sorted(series.received[i] - series.at[i] for i in range(lo, hi))
    return {
        "frames": len(latencies),
        "p50_ms": rounded(percentile(latencies, 50) * 1000, 1) if latencies else None,
        "p90_ms": rounded(percentile(latencies, 90) * 1000, 1) if latencies else None,
        "p99_ms": rounded(percentile(latencies, 99) * 1000, 1) if latencies else None,
        "max_ms": rounded(latencies[-1] * 1000, 1) if latencies else None,
    }


def timeline(series: Series, t0: float, t1: float) -> list[dict]:
    """Per second of ``at`` in the window: frames delivered, and their p50, p99 and worst latency (spikes
    every ROLLUP_FLUSH_SECONDS point at the rollup flush)."""
    rows = []
    for second in range(int(t1 - t0)):
        lo, hi = series.by_at(t0 + second, t0 + second + 1)
        latencies = sorted(series.received[i] - series.at[i] for i in range(lo, hi))
        rows.append(
            {
                "second": second,
                "frames": len(latencies),
                "p50_ms": rounded(percentile(latencies, 50) * 1000, 1) if latencies else None,
                "p99_ms": rounded(percentile(latencies, 99) * 1000, 1) if latencies else None,
                "max_ms": rounded(latencies[-1] * 1000, 1) if latencies else None,
            }
        )
    return rows


def analyse(config: Config, windows: list[Window], sent: dict, feeds: list[dict], fixture: Fixture, args) -> dict:
    sent_series = Series(sent.get("sent_at", []), [], sent.get("sent_node", []))
    fleet_feed = [f for f in feeds if f["kind"] == "fleet"]
    tenant_feeds = [f for f in feeds if f["kind"] == "tenant"]
    fleet = Series(
        [a for f in fleet_feed for a in f["at"]],
        [r for f in fleet_feed for r in f["received"]],
        [n for f in fleet_feed for n in f["node"]],
    )
    tenant = Series(
        [a for f in tenant_feeds for a in f["at"]],
        [r for f in tenant_feeds for r in f["received"]],
        [n for f in tenant_feeds for n in f["node"]],
    )
    levels = []
    for w in windows:
        span = w.t1 - w.t0
        accepted_per_s = w.redis["hset"] / 2 / span  # the snapshot: 2 HSETs per accepted batch
        row = {
            "kind": w.kind,
            "nodes": w.nodes,
            "attempt": w.attempt,
            "disturbed": w.disturbed,
            "quiet_wait_s": w.quiet_wait_s,
            "window_s": round(span, 2),
            "hello_done": w.hello_done,
            "connect": w.connect,
            "accepted_batches_per_s": round(accepted_per_s, 1),
            "accepted_gpu_samples_per_s": round(accepted_per_s * GPUS_PER_NODE),
            "fleet_delivered_per_s": round(fleet.count_received(w.t0, w.t1) / span, 1),
            "tenant_delivered_per_s": round(tenant.count_received(w.t0, w.t1) / span, 1),
            "fleet_latency": latency_summary(fleet, w.t0, w.t1),
            "tenant_latency": latency_summary(tenant, w.t0, w.t1),
            "cpu_cores": w.cpu,
            "redis_per_s": {k: round(v / span, 1) for k, v in w.redis.items() if k != "max_output_buffer"},
            "redis_max_output_buffer": w.redis["max_output_buffer"],
            "drain_s": round(w.drain_s, 1),
            "fleet_timeline": timeline(fleet, w.t0, w.t1),
        }
        if w.kind == "lean":
            lo, hi = sent_series.by_at(w.t0, w.t1)
            sent_window = hi - lo
            sent_watched = sum(1 for i in range(lo, hi) if sent_series.node[i] in fixture.watched_nodes)
            seg_lo, seg_hi = sent_series.by_at(w.t_on, w.t_off + 1)
            flo, fhi = fleet.by_at(w.t_on, w.t_off + 1)
            accepted_segment = w.counters_after.get("accepted", 0) - w.counters_before.get("accepted", 0)
            rejected_segment = w.counters_after.get("rejected", 0) - w.counters_before.get("rejected", 0)
            row |= {
                "offered_batches_per_s": round(sent_window / span, 1),
                "offered_gpu_samples_per_s": round(sent_window / span * GPUS_PER_NODE),
                "fleet_not_delivered": sent_window - row["fleet_latency"]["frames"],
                "tenant_expected": sent_watched,
                "tenant_not_delivered": sent_watched - row["tenant_latency"]["frames"],
                "segment": {
                    "sent": seg_hi - seg_lo,
                    "accepted": accepted_segment,
                    "rejected": rejected_segment,
                    "fleet_delivered": fhi - flo,
                },
            }
        cpu = w.cpu
        if accepted_per_s > 0:
            row["cpu_ms_per_batch"] = {
                role: rounded(cores * 1000 / accepted_per_s, 3)
                for role, cores in cpu.items()
                if cores is not None and cores == cores
            }
        levels.append(row)
    agents_before_stop = [d for d in sent.get("disconnects", []) if windows and d["at"] < windows[-1].t_off + 1]
    return {
        "name": config.name,
        "server": config.server,
        "layer": config.layer,
        "capacity": config.capacity if config.layer == "core" else None,
        "levels": levels,
        "agents": {
            "skipped_ticks": sent.get("skipped"),
            "heartbeats": sent.get("heartbeats"),
            "errors": sent.get("errors"),
            "disconnects_during_run": len(agents_before_stop),
            "disconnect_codes": dict(Counter(str(d["code"]) for d in agents_before_stop)),
            "connect_failures": len(sent.get("connect_failures", [])),
            "connect_failure_examples": sent.get("connect_failures", [])[:3],
        },
        "browser_sockets_closed": [f["closed"] for f in feeds if f["closed"]],
    }


# --- Profile ---------------------------------------------------------------------------------------


def run_profile(fixture: Fixture, args, env: dict[str, str], workdir: Path, py_spy: str) -> dict:
    """py-spy samples the daphne process (pub/sub layer) while ``--profile-nodes`` nodes send telemetry."""
    nodes = min(args.profile_nodes, len(fixture.hostnames))
    say(f"== profile: daphne, pub/sub layer, {nodes} nodes, py-spy for {args.profile_seconds} s")
    redis_clear(args.redis_url)
    server = Server("daphne", env, workdir / "profile.log")
    children: list[Child] = []
    raw = workdir / "profile.txt"
    try:
        server.wait_ready()
        browser = start_browser(server, fixture, env, workdir, workdir / "browser-profile-out.json")
        children.append(browser)
        agents = start_agents(server, fixture, nodes, args, env, workdir, workdir / "agents-profile-out.json")
        children.append(agents)
        t_connect = time.time()
        agents.command({"cmd": "connect", "n": nodes}, timeout=600)
        wait_hello(fixture, range(nodes), t_connect, timeout=180)
        agents.command({"cmd": "telemetry", "on": True}, timeout=30)
        time.sleep(args.warmup)
        result = subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(server.process.pid),
                "--duration",
                str(args.profile_seconds),
                "--rate",
                str(args.profile_rate),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(raw),
            ],
            capture_output=True,
            text=True,
            timeout=args.profile_seconds + 60,
            check=False,
        )
        agents.command({"cmd": "telemetry", "on": False}, timeout=30)
        agents.command({"cmd": "stop"}, timeout=120)
        browser.command({"cmd": "stop"}, timeout=120)
    finally:
        for child in children:
            child.stop()
        server.stop()
    if not raw.exists():
        return {"error": (result.stdout + result.stderr)[-1000:]}
    if args.raw:
        args.raw.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw, args.raw / "profile-py-spy-raw.txt")
    summary = profile_summary(raw.read_text(), rate=args.profile_rate, seconds=args.profile_seconds)
    return summary | {"nodes": nodes, "seconds": args.profile_seconds, "rate": args.profile_rate}


# What the server was doing, by the frames of a sample's stack below the event loop's callback
# (Handle._run) or in the sync thread: (label, function name ends with, path contains); the first group
# that matches any frame wins, so the specific ones come first.
PROFILE_GROUPS = [
    ("rollup flush: rollups_write (sync thread)", "rollups_write", "provisioning/services/telemetry.py"),
    ("rollup flush: drain and counters (event loop)", "flush", "provisioning/services/telemetry.py"),
    ("heartbeats: node_seen UPDATE (sync thread)", "node_seen", "provisioning/services/agents.py"),
    ("connects and hellos (database)", "", "provisioning/services/agents.py"),
    ("connects and hellos (database)", "", "provisioning/services/fleet.py"),
    ("on_telemetry: validate", "validate", "provisioning/services/telemetry_ingest.py"),
    ("on_telemetry: RollupBuffer.fold", "fold", "provisioning/services/telemetry_ingest.py"),
    ("on_telemetry: encode (2 json.dumps)", "encode", "provisioning/services/telemetry_ingest.py"),
    ("on_telemetry: group_send (msgpack, PUBLISH round trip)", "group_send", ""),
    ("on_telemetry: snapshot (HSET pipeline round trip)", "snapshot", "provisioning/services/telemetry.py"),
    ("AgentConsumer: json.loads of the batch", "_parse", "provisioning/consumers.py"),
    ("AgentConsumer: other", "", "provisioning/consumers.py"),
    ("FeedConsumer.telemetry_frame: send to the browser", "telemetry_frame", ""),
    ("channel layer: pub/sub reader (parse, msgpack, queues)", "", "channels_redis/"),
    ("channels: consumer plumbing (dispatch, queues)", "", "channels/"),
    ("daphne/Twisted/autobahn: WebSocket frames in and out", "", "autobahn/"),
    ("daphne/Twisted/autobahn: WebSocket frames in and out", "", "twisted/"),
    ("daphne/Twisted/autobahn: WebSocket frames in and out", "", "daphne/"),
    ("redis-py: commands and replies (caller not in the sampled stack)", "", "redis/"),
    ("database (other)", "", "django/db/"),
    ("database (other)", "", "psycopg"),
]


# Leaves where a thread waits rather than runs (py-spy --nonblocking cannot always tell): the event
# loop's epoll and the sync thread's wait for work. Left out of the shares.
IDLE_LEAVES = ("EpollSelector.select ", "select (", "_worker (")


def _frame_parts(frame: str) -> tuple[str, str]:
    name, _, where = frame.partition(" (")
    return name, where.rsplit(":", 1)[0]


def profile_group(frames: list[str]) -> str:
    """The PROFILE_GROUPS label of one stack (root first)."""
    # py-spy shows a task's coroutine frames either under the loop's Handle._run or as a stack of their own.
    below = [] if any(f.startswith("BaseEventLoop._run_once ") for f in frames) else frames
    for i in range(len(frames) - 1, -1, -1):
        if frames[i].startswith(("Handle._run ", "_WorkItem.run ")):
            below = frames[i + 1 :]
            break
    parts = [_frame_parts(f) for f in below]
    for label, name_end, path_part in PROFILE_GROUPS:
        for name, path in parts:
            if (not name_end or name.endswith(name_end)) and (not path_part or path_part in path):
                return label
    if frames[0].startswith("Thread._bootstrap "):
        return "sync thread: other"
    return "asyncio event loop: select, scheduling, other"


def profile_summary(text: str, *, rate: int, seconds: float) -> dict:
    """Self and inclusive shares per function from py-spy's raw (collapsed) stacks, of all samples in
    which a thread ran Python; plus a split of the samples by what the server was doing."""
    self_counts: Counter = Counter()
    inclusive: Counter = Counter()
    groups: Counter = Counter()
    roots: Counter = Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n
            continue
        total += n
        roots["sync thread" if frames[0].startswith("Thread._bootstrap") else "event loop thread"] += n
        functions = [shorten(f) for f in frames]
        self_counts[functions[-1]] += n
        for function in set(functions):
            inclusive[function] += n
        groups[profile_group(frames)] += n
    if not total:
        return {"error": "no samples"}

    def share(counter: Counter, top: int) -> list[dict]:
        return [{"function": f, "share": round(c / total, 4)} for f, c in counter.most_common(top)]

    return {
        "samples": total,
        "idle_samples_left_out": idle,
        "busy_share_of_one_core": round(total / (rate * seconds), 3),
        "threads": {t: round(c / total, 3) for t, c in roots.most_common()},
        "groups": [{"what": g, "share": round(c / total, 4)} for g, c in groups.most_common()],
        "top_self": share(self_counts, 25),
        "top_inclusive": share(inclusive, 60),
    }


def shorten(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:123)`` → ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


# --- Machine, report -------------------------------------------------------------------------------


def machine_info(redis_url: str) -> dict:
    from importlib.metadata import version

    from machine import describe_machine

    packages = ["django", "channels", "channels-redis", "daphne", "uvicorn", "websockets", "msgpack"]
    return {
        **describe_machine(),
        "redis_server": redis_client(redis_url).info("server").get("redis_version"),
        "redis-py": version("redis"),
        **{name: version(name) for name in packages},
    }


def background_load(seconds: float = 3.0) -> float:
    """Cores busy on the machine while this benchmark does nothing: other users of the machine."""
    meter = CpuMeter({})
    a = meter.sample()
    time.sleep(seconds)
    return CpuMeter.cores(a, meter.sample())["machine"]


def fmt(value, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def latency_cell(latency: dict) -> str:
    if not latency or latency.get("p50_ms") is None:
        return "-"
    return f"{fmt(latency['p50_ms'])} / {fmt(latency['p99_ms'])} ms"


def chosen_levels(levels: list[dict]) -> list[dict]:
    """Per (kind, nodes), the attempt that other processes disturbed least."""
    best: dict[tuple, dict] = {}
    for level in levels:
        key = (level["kind"], level["nodes"])
        other = level["cpu_cores"].get("other") or 0.0
        if key not in best or other < (best[key]["cpu_cores"].get("other") or 0.0):
            best[key] = level
    return list(best.values())


def report(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, {m['date_local']}")
    sizes = results["frame_bytes"]
    lines.append(
        f"Frames: agent batch {sizes['agent_batch']} B, tenant text {sizes['tenant_text']} B, "
        f"fleet summary {sizes['fleet_text']} B, layer message {sizes['layer_message']} B"
    )
    for label, ceiling in results["ceiling"].items():
        rb, py = ceiling["redis_benchmark"], ceiling["python_pair"]
        lines.append(
            f"Ceiling ({label}): redis-benchmark PUBLISH {fmt(rb.get('messages_per_s'))} msg/s; "
            f"one Python publisher → subscriber {fmt(py.get('delivered_per_s'))} msg/s delivered"
        )
        for name, layer in ceiling.get("layer", {}).items():
            lines.append(
                f"  channel layer {name}, one process: {fmt(layer.get('group_send_per_s'))} group_send/s, "
                f"{fmt(layer.get('lost'))} of {fmt(layer.get('sent'))} not received"
            )
    for run in results["runs"]:
        lines.append("")
        lines.append(f"## {run['name']}")
        lines.append(
            "| nodes | offered batches/s | accepted batches/s (GPU samples/s) | to fleet socket/s | fleet p50 / p99 "
            "| tenant p50 / p99 | not delivered (fleet, tenant) | CPU cores: server / agents / browser / redis / "
            "postgres / other / machine |"
        )
        lines.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for level in chosen_levels(run["levels"]):
            c = level["cpu_cores"]
            nodes = f"{level['nodes']}" + (" (neocloud-agent)" if level["kind"] == "real" else "")
            nodes += " *" if level["disturbed"] else ""
            not_delivered = (
                f"{level['fleet_not_delivered']}, {level['tenant_not_delivered']}" if level["kind"] == "lean" else "-"
            )
            lines.append(
                f"| {nodes} | {fmt(level.get('offered_batches_per_s'))} | {fmt(level['accepted_batches_per_s'])} "
                f"({fmt(level['accepted_gpu_samples_per_s'])}) | {fmt(level['fleet_delivered_per_s'])} "
                f"| {latency_cell(level['fleet_latency'])} | {latency_cell(level['tenant_latency'])} "
                f"| {not_delivered} | {fmt(c.get('server'), 2)} / {fmt(c.get('agents'), 2)} / "
                f"{fmt(c.get('browser'), 2)} / {fmt(c.get('redis'), 2)} / {fmt(c.get('postgres'), 2)} / "
                f"{fmt(c.get('other'), 2)} / {fmt(c.get('machine'), 2)} |"
            )
        lines.append("")
        lines.append(
            "| nodes | server CPU per batch | agents CPU per batch | Redis commands/s | GC pauses ≥ 10 ms in window "
            "(gen 2, longest) | drained in |"
        )
        lines.append("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for level in chosen_levels(run["levels"]):
            per_batch = level.get("cpu_ms_per_batch", {})
            gc_pauses = level.get("gc_pauses") or {}
            lines.append(
                f"| {level['nodes']}{' (neocloud-agent)' if level['kind'] == 'real' else ''} "
                f"| {fmt(per_batch.get('server'), 2, ' ms')} | {fmt(per_batch.get('agents'), 2, ' ms')} "
                f"| {fmt(level['redis_per_s'].get('commands'))} "
                f"| {gc_pauses.get('count', '-')} ({gc_pauses.get('generation_2', '-')}, "
                f"{fmt(gc_pauses.get('max_ms'), 0, ' ms')}) | {fmt(level['drain_s'], 1, ' s')} |"
            )
        agents = run["agents"]
        if any(level["disturbed"] for level in chosen_levels(run["levels"])):
            lines.append("*: other processes on the machine took more than --disturbed cores in every attempt")
        lines.append(
            f"agents: {agents['skipped_ticks']} ticks skipped, errors {agents['errors']}, "
            f"{agents['disconnects_during_run']} disconnects {agents['disconnect_codes']}, "
            f"{agents['connect_failures']} connect failures"
        )
    profile = results.get("profile")
    if profile and "groups" in profile:
        lines.append("")
        lines.append(f"## Profile (daphne, {profile['nodes']} nodes): {profile['samples']} samples with Python running")
        for group in profile["groups"]:
            lines.append(f"  {group['share'] * 100:5.1f} %  {group['what']}")
        lines.append("  top self:")
        for entry in profile["top_self"][:15]:
            lines.append(f"  {entry['share'] * 100:5.1f} %  {entry['function']}")
    return "\n".join(lines)


# --- Main ------------------------------------------------------------------------------------------


def levels_arg(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a comma-separated list of node counts") from None
    if not levels or any(n <= 0 for n in levels):
        raise argparse.ArgumentTypeError("node counts must be positive")
    return sorted(levels)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1250, help="fleet size, the top of the ramp (default 1250)")
    parser.add_argument(
        "--levels", type=levels_arg, help="nodes sending at each step (default 125,250,500,1000,1250 of --nodes)"
    )
    parser.add_argument("--seconds", type=int, default=15, help="measured seconds per level (default 15)")
    parser.add_argument("--warmup", type=int, default=5, help="seconds before each measurement (default 5)")
    parser.add_argument(
        "--servers", choices=["daphne", "uvicorn", "both", "none"], default="both", help="ramps to run (default both)"
    )
    parser.add_argument("--skip-core", action="store_true", help="leave out the core channel layer")
    parser.add_argument(
        "--core-levels", type=levels_arg, help="levels for the core layer (default 500,1000 of --nodes)"
    )
    parser.add_argument(
        "--core-redis",
        choices=["bench", "default"],
        default="bench",
        help="Redis pools with the core layer: bench (default: the layer's without socket timeout, the layer's\n"
        "and the server's own with up to 10,000 connections) or redis-py's defaults, with which consumers\n"
        "crash (bench/telemetry_settings.py)",
    )
    parser.add_argument("--core-large-capacity", type=int, default=100_000, help="the core layer's large capacity")
    parser.add_argument("--real-agents", type=int, default=250, help="nodes run by neocloud-agent fleet (0: none)")
    parser.add_argument("--watch", type=int, default=8, help="reservations the browser client watches (default 8)")
    parser.add_argument(
        "--disturbed",
        type=float,
        default=0.3,
        help="a window in which other processes took more cores than this is measured again (default 0.3)",
    )
    parser.add_argument("--retries", type=int, default=1, help="times a disturbed window is measured again")
    parser.add_argument("--quiet-timeout", type=float, default=20, help="longest wait for other processes to calm down")
    parser.add_argument("--drain-timeout", type=float, default=90, help="longest wait for the server to drain")
    parser.add_argument(
        "--what-if-gc-freeze",
        action="store_true",
        help="also run daphne with gc.freeze() after connecting (bench/gc_probe), at the top two levels",
    )
    parser.add_argument("--profile", action="store_true", help="sample the server with py-spy (needs py-spy)")
    parser.add_argument("--profile-nodes", type=int, default=1250, help="nodes sending while profiling")
    parser.add_argument("--profile-seconds", type=int, default=30, help="seconds sampled (default 30)")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--py-spy", help="the py-spy executable (default: on PATH)")
    parser.add_argument("--database-url", help=f"dropped and recreated (default {DEFAULT_DATABASE_URL})")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"default {DEFAULT_REDIS_URL}")
    parser.add_argument(
        "--no-gc-probe", dest="gc_probe", action="store_false", help="do not log the server's long GC pauses"
    )
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--raw", type=Path, help="keep every frame's times (agents and browser files) here")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/telemetry-<date>.json)")
    args = parser.parse_args(argv)
    scale = args.nodes / 1250
    if args.levels is None:
        args.levels = sorted({max(1, round(n * scale)) for n in (125, 250, 500, 1000, 1250)})
    if args.core_levels is None:
        args.core_levels = sorted({max(1, round(n * scale)) for n in (500, 1000)})
    args.levels = [n for n in args.levels if n <= args.nodes] or [args.nodes]
    args.core_levels = [n for n in args.core_levels if n <= args.nodes] or [args.nodes]
    args.real_agents = min(args.real_agents, args.nodes)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    py_spy = None
    if args.profile:
        py_spy = args.py_spy or shutil.which("py-spy")
        if not py_spy:
            say("--profile needs py-spy: python -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy, then --py-spy")
            return 2
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    database_url = bench_database_url(args.database_url, DEFAULT_DATABASE_URL)
    env = server_environment(database_url, args.redis_url)
    os.environ.update(
        {
            k: env[k]
            for k in (
                "DATABASE_URL",
                "REDIS_URL",
                "DJANGO_SETTINGS_MODULE",
                "DEBUG",
                "ALLOWED_HOSTS",
                "LOG_LEVEL",
                "BENCH_CHANNEL_LAYER",
            )
        }
    )
    started = time.monotonic()
    say(f"Recreating {urlsplit(database_url).path.lstrip('/')} and migrating")
    database_recreate(database_url)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    say(f"Building a fleet of {args.nodes} nodes × {GPUS_PER_NODE} GPUs")
    fixture = fixture_build(nodes=args.nodes, watch=args.watch)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    fixture.frame_bytes = frame_sizes(fixture)
    connection.close()
    say(
        f"  {len(fixture.reserved)} nodes in {fixture.reservations} active reservations; the browser watches "
        f"{len(fixture.watched)} of them ({len(fixture.watched_nodes)} nodes); frames {fixture.frame_bytes}"
    )
    results: dict = {
        "machine": machine_info(args.redis_url),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("database_url",)
        }
        | {
            "database": urlsplit(database_url).path.lstrip("/"),
            "gpus_per_node": GPUS_PER_NODE,
            "telemetry_seconds": 1,
            "heartbeat_seconds": HEARTBEAT_SECONDS,
            "rollup_flush_seconds": FLUSH_SECONDS,
            "reserved_nodes": len(fixture.reserved),
            "watched_reservations": len(fixture.watched),
            "watched_nodes": len(fixture.watched_nodes),
        },
        "frame_bytes": fixture.frame_bytes,
        "ceiling": {},
        "runs": [],
    }
    results["machine"]["background_busy_cores"] = background_load()
    say(f"Machine busy before the run: {results['machine']['background_busy_cores']} cores (other users)")
    message_size = fixture.frame_bytes["layer_message"]
    results["ceiling"]["before"] = measure_ceiling(args.redis_url, message_size, "before", env, args)
    configs = []
    servers = {"both": ["daphne", "uvicorn"], "none": []}.get(args.servers, [args.servers])
    for i, server in enumerate(servers):
        label = "daphne, 1 process" if server == "daphne" else "uvicorn, 2 workers"
        configs.append(
            Config(
                name=f"{label}, pub/sub layer",
                server=server,
                levels=args.levels,
                real_agents=args.real_agents if i == 0 else 0,
            )
        )
    if args.what_if_gc_freeze:
        configs.append(
            Config(
                name="daphne, 1 process, pub/sub layer, gc.freeze() after connecting (what-if)",
                server="daphne",
                levels=args.levels[-2:],
                gc_freeze=True,
            )
        )
    if not args.skip_core:
        configs.append(
            Config(
                name="daphne, core layer (capacity 100)",
                server="daphne",
                layer="core",
                capacity=100,
                levels=args.core_levels,
            )
        )
        configs.append(
            Config(
                name=f"daphne, core layer (capacity {args.core_large_capacity:,})",
                server="daphne",
                layer="core",
                capacity=args.core_large_capacity,
                levels=[max(args.core_levels)],
            )
        )
    with tempfile.TemporaryDirectory(prefix="telemetry-bench-") as tmp:
        workdir = Path(tmp)
        for config in configs:
            results["runs"].append(run_config(config, fixture, args, env, workdir, args.redis_url))
        if py_spy:
            results["profile"] = run_profile(fixture, args, env, workdir, py_spy)
    results["ceiling"]["after"] = measure_ceiling(args.redis_url, message_size, "after", env, args)
    redis_clear(args.redis_url)
    results["elapsed_s"] = round(time.monotonic() - started)
    output = args.output or BENCH / "results" / f"telemetry-{datetime.now(UTC):%Y-%m-%d}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report(results))
    say(f"Results written to {output} ({results['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
