#!/usr/bin/env python
"""SSH access benchmark (issue 15): how fast a rented slice becomes reachable with its tenant's key, and
how fast a key let in or taken out reaches its server, with the whole console running as real processes.

The stack is tests/e2e/test_access.py's: daphne, a Celery worker and beat (console/launcher.py's
commands), and a simulated agent host (``provisioning.agent.cli fleet``, ``--speed 1000``: its pretend
steps cost milliseconds) with one 8-GPU node, which sets up each reservation's access for real: an
account (``nc-<12 hex>``), an authorized_keys file and OpenSSH's sshd of its own. Logins are OpenSSH's
``ssh`` with the tenant's private key. The world is made through the services; the tenant's keys and
reservations through the API, as a tenant's client does. Each round:

1. **Reachable.** ``POST /api/v1/reservations/`` (a 1-GPU slice, with the tenant's key) to the first
   successful ``ssh … true``, split at the reservation's ``activated_at``: API -> active (the console's
   provisioning path: the request, the worker's tasks, the command pushed to the agent, the agent's
   provision, the result back) and active -> first login (the bench sees the row active, reads the
   access from the API, logs in). The provision command's timestamps split the first part further.
2. **Key change.** ``POST /api/v1/reservations/<id>/ssh-keys/`` (a new key) to the first successful
   login with it, then ``DELETE …/ssh-keys/<key>/`` (the first key) to the first refused login with that
   one, ``ssh`` tried every ~50 ms; the access command's timestamps split each.
3. **Release.** The reservation is cancelled and waited for until completed; then no account of it may
   be left (``getent passwd``) nor any process of it (its marker or its directory, from /proc).

Ceilings, measured in every round on the same machine: a login (``ssh … true``) to the reservation's
server already running, and a refused one; a bare sshd started by hand with the agent's own
configuration (servers.py's ``sshd_config``), until its port answers with a banner; the account tools
(``useradd --system`` and ``userdel``) the agent runs; and the agent's access code alone (``SshAccess``:
account, keys, server, then its teardown), called in this process without the console. One round first
is not measured (the processes' first requests, imports and connections).

    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/neocloud_access_bench
    export REDIS_URL=redis://127.0.0.1:6379/11
    .venv/bin/python bench/access.py --rounds 10     # about 50 s on a quiet 2-core machine
    .venv/bin/python bench/access.py --rounds 3      # a smoke run

Run it as root (accounts are made per reservation, as on a GPU host), with OpenSSH's client and server
installed. The agents' state directory is made under /run: sshd trusts a keys file only when every
directory above it is root's and writable by root only (not /tmp, not a user's). The data lives in a
dedicated database, ``DATABASE_URL`` (or ``--database-url``; ``neocloud_access_bench`` on the local
PostgreSQL by default; a name without "bench" is never dropped), **dropped and recreated** at the
start; Redis is ``REDIS_URL`` (or ``--redis-url``; database 11 by default), whose Celery queues are
emptied at the start. All traffic is on 127.0.0.1. The API's read and write throttles are raised so
the bench's requests are never refused; everything else is the project's settings. Progress goes to
stderr (a line a round), the report to stdout, everything to ``bench/results/access-<date>.json``.
Nothing here asserts on time: every process shares this machine's cores; read the medians, the
ratios and the load averages recorded with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from database import accelerator_types_create, bench_database_url, database_recreate  # bench/database.py
from stack import (
    Child,
    edge_site_create,
    environment_configure,
    machine_facts,
    machine_facts_end,
    median,
    results_write,
    tenant_create,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/neocloud_access_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
CELERY_KEYS = ("default", "provisioning", "billing", "telemetry", "unacked", "unacked_index", "unacked_mutex")
SPEED = "1000"  # the simulated agent's pretend steps, divided by this: milliseconds in all
POLL_S = 0.05  # between two ssh tries, and two reads of the reservation's row
CEILING_LOGINS = 5  # logins (and refused ones) a round, to the server already running
BANNER_POLL_S = 0.002  # the bare sshd's port, tried this often (the agent tries every 50 ms)
WAIT_S = 60.0  # at most, for anything to happen

from console.devservers import ApiClient as Api  # noqa: E402
from console.devservers import free_port  # noqa: E402 - bench/stack.py made the project importable
from console.kernel.progress import say  # noqa: E402
from console.launcher import _children  # noqa: E402 - the processes exactly as the launcher runs them
from provisioning.agent.drivers.access.accounts import MARKER, Account, account_name  # noqa: E402 - no Django
from provisioning.agent.drivers.access.keys import keys_of  # noqa: E402
from provisioning.agent.drivers.access.manager import SshAccess  # noqa: E402
from provisioning.agent.drivers.access.servers import SSHD, Setup, host_key_make, sshd_config  # noqa: E402
from provisioning.agent.drivers.base import no_progress  # noqa: E402
from provisioning.agent.drivers.visibility import visibility_environment  # noqa: E402
from provisioning.choices import CommandKind, NodeState  # noqa: E402 - choices need no django.setup()


def ts(value) -> float | None:
    """A database datetime as wall-clock seconds (every process here shares this machine's clock)."""
    return None if value is None else value.timestamp()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values`` (bench/autoscale.py's)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


# --- Environment and the world -------------------------------------------------------------------


def world_build() -> dict:
    """An enrolling node (its agent reports its GPUs), a 1-GPU slice offer, a tenant with credit and its
    API key; through the services."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.services.tenancy.api_keys import api_key_create
    from provisioning.services.agents import bootstrap_token_create

    h100, _h200 = accelerator_types_create()
    _site, (node,), offer = edge_site_create(h100, hostnames=["bench-access-1"], inventory=False)
    token = {
        "hostname": node.hostname,
        "token": bootstrap_token_create(node=node, actor="access bench"),
        "gpus": 8,
        "gpu_name": h100.device_name,
        "gpu_memory_mib": h100.memory_gib * 1024,
    }
    tenant = tenant_create(name="Access bench", email="bench@access.bench.invalid")
    _key, plaintext = api_key_create(tenant=tenant, name="access bench")
    return {"node": node.pk, "offer": offer.pk, "token": token, "key": plaintext}


def celery_queues_purge(redis_url: str) -> None:
    """Tasks a previous run left for rows long gone must not reach this run's worker."""
    import redis

    redis.Redis.from_url(redis_url).delete(*CELERY_KEYS)


# --- Processes -------------------------------------------------------------------------------------


class Stack:
    """daphne, a Celery worker and beat as the launcher starts them, and the simulated agent host."""

    def __init__(self, env: dict[str, str], workdir: Path, state_dir: Path):
        self.env, self.workdir, self.state_dir = env, workdir, state_dir
        self.children: dict[str, Child] = {}

    def start(self, token: dict) -> float:
        port = free_port()
        commands = _children("127.0.0.1", port, "daphne", self.workdir, free_port())
        for name in ("daphne", "celery worker", "celery beat"):  # not the gateway: no endpoint here
            key = name.replace("celery ", "")
            port_of = port if key == "daphne" else None
            self.children[key] = Child(name, commands[name], self.env, self.workdir / f"{key}.log", port_of)
        started = self.children["daphne"].wait_healthy(90)
        tokens = self.workdir / "tokens.json"
        tokens.write_text(json.dumps([token]))
        agent = [
            sys.executable, "-m", "provisioning.agent.cli", "fleet", "--server", self.base, "--tokens",
            str(tokens), "--state-dir", str(self.state_dir), "--speed", SPEED,
        ]  # fmt: skip
        self.children["agents"] = Child("agents", agent, self.env, self.workdir / "agents.log", None)
        return started

    @property
    def base(self) -> str:
        return self.children["daphne"].base

    def check(self) -> None:
        for child in self.children.values():
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}: {child.log_tail()}")

    def stop(self) -> None:
        """Every process. A simulated host's SSH servers and sessions stop with its agent (a reservation
        the bench could not release keeps its account: ``accesses_close``)."""
        for name in ("agents", "beat", "worker", "daphne"):
            child = self.children.pop(name, None)
            if child is not None:
                child.stop()


def accesses_close(state_dir: Path) -> None:
    """What access a failed run left set up: its servers, sessions and accounts."""
    for registry in state_dir.glob("**/access.json"):
        access = SshAccess(state_dir=registry.parent, listen="127.0.0.1", host=None, grace_s=1)
        for reservation in json.loads(registry.read_text() or "{}"):
            asyncio.run(access.close(reservation, no_progress))


# --- ssh -------------------------------------------------------------------------------------------


def key_pair(directory: Path, name: str) -> Path:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path


def ssh(key: Path, access: dict) -> tuple[bool, bool, float, float]:
    """One ``ssh … true``: (logged in, refused by the server, started, ended)."""
    ok, refused, started, ended, _cpu = ssh_timed(key, access)
    return ok, refused, started, ended


def ssh_timed(key: Path, access: dict) -> tuple[bool, bool, float, float, float]:
    """``ssh``'s, and the CPU seconds the client took (this process waits for no other child meanwhile)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    run = subprocess.run(
        [
            "ssh", "-i", str(key), "-p", str(access["port"]),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
            f"{access['user']}@{access['host']}", "true",
        ],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return run.returncode == 0, "Permission denied" in run.stderr, started, ended, cpu


def ssh_until(key: Path, access: dict, *, logged_in: bool) -> dict:
    """``ssh`` every POLL_S until it logs in (``logged_in``) or is refused; the last try's start and end,
    and how many tries it took."""
    deadline = time.monotonic() + WAIT_S
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        ok, refused, started, ended = ssh(key, access)
        if ok if logged_in else refused:
            return {"tries": tries, "try_started": started, "try_ended": ended}
        time.sleep(POLL_S)
    raise RuntimeError(f"ssh was not {'let in' if logged_in else 'refused'} within {WAIT_S:.0f} s: {access}")


def logins_timed(key: Path, access: dict, *, expect_in: bool) -> tuple[list[float], list[float]]:
    """CEILING_LOGINS logins (``expect_in``) or refused ones, back to back: each one's seconds, and the
    CPU seconds of its client."""
    seconds, cpu = [], []
    for _ in range(CEILING_LOGINS):
        ok, refused, started, ended, client = ssh_timed(key, access)
        if (ok if expect_in else refused) is not True:
            raise RuntimeError(f"a ceiling login was {'refused' if expect_in else 'let in'}: {access}")
        seconds.append(ended - started)
        cpu.append(client)
    return seconds, cpu


# --- Ceilings by hand ------------------------------------------------------------------------------


def banner_answered(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.makefile("rb").readline().startswith(b"SSH-")
    except OSError:
        return False


def bare_sshd_start(directory: Path) -> float:
    """A bare sshd with the configuration the agent writes (servers.py's ``sshd_config``, for an account
    that need not exist: no one logs in), started as the agent starts it; seconds until its port answers
    with a banner. The host key is made before the clock starts (``agent_access_alone`` times it with
    the rest of the agent's part)."""
    directory.mkdir(mode=0o700)
    account = Account(user="nc-000000000000", uid=65534, gid=65534, home=directory / "home", made=True)
    setup = Setup(reservation="ceiling", directory=directory, account=account, listen="127.0.0.1",
                  port=free_port(), environment={MARKER: "ceiling"})  # fmt: skip
    host_key_make(directory)
    config = directory / "sshd_config"
    config.write_text(sshd_config(setup))
    log_path = directory / "server.log"
    with open(log_path, "ab") as log:
        started = time.monotonic()
        server = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=directory, start_new_session=True,
        )  # fmt: skip
    try:
        while not banner_answered(setup.port):
            if server.poll() is not None:
                raise RuntimeError(f"the bare sshd exited with {server.returncode}: {log_path.read_text()[-500:]}")
            if time.monotonic() > started + 10:
                raise RuntimeError(f"the bare sshd did not listen within 10 s: {log_path.read_text()[-500:]}")
            time.sleep(BANNER_POLL_S)
        return time.monotonic() - started
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def agent_access_alone(state_dir: Path, key: Path) -> dict[str, float]:
    """The agent's own part of a provision and a release, without the console: SshAccess (the code both
    drivers call) prepares the account, installs the key and starts the server until its banner answers
    (polled every 50 ms, as the agent polls), then closes it all, in this process."""
    access = SshAccess(state_dir=state_dir, listen="127.0.0.1", host="127.0.0.1", grace_s=1)
    keys = keys_of({"keys": [key.with_suffix(".pub").read_text().strip()], "version": 0})
    reservation = str(uuid.uuid4())

    async def timed() -> dict[str, float]:
        started = time.monotonic()
        account = await access.prepare(reservation, (0,))
        prepared = time.monotonic()
        environment = visibility_environment("nvidia", (0,))
        await access.open(reservation, account, keys, environment, no_progress, gpu_lines=["GPU 0: bench"])
        opened = time.monotonic()
        await access.close(reservation, no_progress)
        return {"prepare": prepared - started, "open": opened - prepared, "close": time.monotonic() - opened}

    return asyncio.run(timed())


def account_tools(home: Path) -> dict[str, float]:
    """``useradd`` and ``userdel`` as the agent runs them (accounts.py), for an account of the bench's."""
    user = "ncbench-ceiling"
    add = [
        "useradd", "--system", "--user-group", "--shell", "/bin/bash", "--home-dir", str(home),
        "--no-create-home", "--password", "*", user,
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(add, check=True, capture_output=True)
    added = time.monotonic()
    subprocess.run(["userdel", user], check=True, capture_output=True)
    return {"useradd": added - started, "userdel": time.monotonic() - added}


# --- One round -------------------------------------------------------------------------------------


def row_wait(reservation: str, states: tuple[str, ...], stack: Stack) -> tuple[float, object]:
    """Read the reservation's row every POLL_S until it is in one of ``states``; when the bench saw it."""
    from marketplace.models import Reservation  # models: after django.setup(), once the database is chosen

    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        row = Reservation.objects.get(pk=reservation)
        if row.state in states:
            return time.time(), row
        stack.check()
        time.sleep(POLL_S)
    raise RuntimeError(f"reservation {reservation} was not {' or '.join(states)} within {WAIT_S:.0f} s")


def command_of(reservation: str, kind: str, *, after: float | None = None):
    """The reservation's last command of ``kind`` (made after ``after``)."""
    from provisioning.models import NodeCommand  # models: after django.setup(), once the database is chosen

    commands = NodeCommand.objects.filter(correlation_id=reservation, kind=kind).order_by("-created_at")
    command = commands.first()
    if command is None or (after is not None and ts(command.created_at) < after):
        return None
    return command


def command_answered(reservation: str, kind: str, *, after: float):
    """That command once its agent has answered (ssh may see a change before the result is back)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        command = command_of(reservation, kind, after=after)
        if command is not None and command.state in ("succeeded", "failed"):
            return command
        time.sleep(POLL_S)
    return None


def command_times(command) -> dict[str, float | None]:
    """When it was made, pushed to the agent and answered (its last change of state: succeeded)."""
    return {
        "made": ts(command.created_at),
        "pushed": ts(command.sent_at),
        "answered": ts(command.state_changed_at),
        "state": command.state,
    }


def parts(marks: list[tuple[str, float | None]]) -> dict[str, float | None]:
    """The differences of consecutive instants, each named by the later one: they add up to the whole."""
    out = {}
    for (_, before), (name, at) in zip(marks, marks[1:], strict=False):
        out[name] = None if before is None or at is None else at - before
    return out


def key_add(api: Api, key: Path, name: str) -> str:
    body = {"public_key": key.with_suffix(".pub").read_text(), "name": name}
    return api.expect(201, "POST", "/api/v1/ssh-keys/", body)["id"]


def reachable(api: Api, stack: Stack, world: dict, key: Path, key_id: str) -> dict:
    """From the reservation's POST to the first login with its key."""
    posted = time.time()
    body = {"offer": world["offer"], "duration_hours": 1, "ssh_keys": [key_id]}
    reservation = api.expect(201, "POST", "/api/v1/reservations/", body)["id"]
    answered = time.time()
    seen, row = row_wait(reservation, ("active", "failed"), stack)
    if row.state != "active":
        raise RuntimeError(f"reservation {reservation} failed: {row.failure_reason}")
    detail = api.expect(200, "GET", f"/api/v1/reservations/{reservation}/")
    read = time.time()
    if detail["access"]["status"] != "ready":
        raise RuntimeError(f"reservation {reservation} is active, its access {detail['access']}")
    (access,) = detail["access"]["nodes"]
    login = ssh_until(key, access, logged_in=True)
    activated = ts(row.activated_at)
    provision = command_times(command_of(reservation, CommandKind.PROVISION))
    return {
        "reservation": reservation,
        "access": {k: access[k] for k in ("host", "port", "user")},
        "api_to_active_s": activated - posted,
        "active_to_first_login_s": login["try_ended"] - activated,
        "api_to_first_login_s": login["try_ended"] - posted,
        "post_answered_s": answered - posted,
        "login_tries": login["tries"],
        "split_s": parts(
            [
                ("posted", posted),
                ("command_made", provision["made"]),  # the POST, begin_reservation and provision_reservation
                ("command_pushed", provision["pushed"]),  # to the agent's connection (Redis, daphne)
                ("agent_answered", provision["answered"]),  # the agent's provision and its result back
                ("active", activated),  # the hook marking the reservation active
                ("seen_active", seen),  # the bench's read of the row (every POLL_S)
                ("access_read", read),  # GET /api/v1/reservations/<id>/
                ("logged_in", login["try_ended"]),  # the ssh that let it in
            ]
        ),
    }


def key_change(api: Api, reservation: str, access: dict, *, path: str, method: str, body: dict | None,
               key: Path, logged_in: bool) -> dict:  # fmt: skip
    """From the API call that changes the keys to the first login (``logged_in``) or refusal with ``key``."""
    posted = time.time()
    api.expect(200, method, path, body)
    answered = time.time()
    seen = ssh_until(key, access, logged_in=logged_in)
    command = command_answered(reservation, CommandKind.ACCESS, after=posted)
    times = command_times(command) if command is not None else {"made": None, "pushed": None, "answered": None}
    return {
        "seconds": seen["try_ended"] - posted,
        # The console's command path: row -> Redis -> agent -> file, and the result back.
        "console_path_s": None if times["answered"] is None else times["answered"] - posted,
        "call_answered_s": answered - posted,
        "ssh_tries": seen["tries"],
        "seeing_try_started_s": seen["try_started"] - posted,  # after the call was made
        "version": None if command is None else command.params.get("version"),
        "split_s": parts(
            [
                ("posted", posted),
                ("command_made", times["made"]),  # in the request's transaction, pushed after its commit
                ("command_pushed", times["pushed"]),
                ("agent_answered", times["answered"]),  # the file written, the result back
                ("seen_by_ssh", seen["try_ended"]),  # the next ssh try, and that try itself
            ]
        ),
    }


def nc_accounts() -> list[str]:
    """``getent passwd | grep ^nc-``: the accounts of reservations on this host."""
    entries = subprocess.run(["getent", "passwd"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [entry.split(":", 1)[0] for entry in entries if entry.startswith("nc-")]


def leftovers(reservation: str, user: str, state_dir: Path) -> dict:
    """What is left of a released reservation on this host: its account, other ``nc-`` accounts (another
    run's, or another session's on a shared machine), and processes carrying its marker or directory."""
    accounts = nc_accounts()
    marker = f"{MARKER}={reservation}".encode()
    directory = str(state_dir).encode() + b"/"  # any node's access/<reservation>
    processes = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline, environ = (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") or (directory in cmdline and reservation.encode() in cmdline):
            processes.append(int(entry.name))
    return {
        "account_left": user in accounts,
        "other_nc_accounts": [a for a in accounts if a != user],
        "processes_left": processes,
        "directory_left": any(state_dir.glob(f"*/access/{reservation}")),
    }


def round_run(number: int, api: Api, stack: Stack, world: dict, keys: Path, workdir: Path, state_dir: Path) -> dict:
    """One round: the ceilings by hand, reachable, the logins' ceilings, a key let in, one taken out,
    the release and what is left of it."""
    first, second = key_pair(keys, f"round{number}-first"), key_pair(keys, f"round{number}-second")
    first_id, second_id = key_add(api, first, f"round {number} first"), key_add(api, second, f"round {number} second")
    result = {
        "round": number,
        "bare_sshd_start_s": bare_sshd_start(workdir / f"bare-sshd-{number}"),
        "account_tools_s": account_tools(workdir / "ceiling-home"),
        "agent_access_alone_s": agent_access_alone(state_dir / "ceiling", first),
    }
    result["reachable"] = up = reachable(api, stack, world, first, first_id)
    reservation, access = up["reservation"], up["access"]
    result["login_s"], result["login_client_cpu_s"] = logins_timed(first, access, expect_in=True)
    result["refused_login_s"], result["refused_client_cpu_s"] = logins_timed(second, access, expect_in=False)
    base = f"/api/v1/reservations/{reservation}/ssh-keys/"
    result["key_added"] = key_change(
        api, reservation, access, path=base, method="POST", body={"key": second_id}, key=second, logged_in=True
    )
    result["key_removed"] = key_change(
        api, reservation, access, path=f"{base}{first_id}/", method="DELETE", body=None, key=first, logged_in=False
    )
    cancelled = time.time()
    api.expect(200, "POST", f"/api/v1/reservations/{reservation}/cancel/")
    completed, _row = row_wait(reservation, ("completed",), stack)
    result["release_s"] = completed - cancelled
    result["left"] = leftovers(reservation, account_name(reservation), stack.state_dir)
    return result


def round_line(r: dict) -> str:
    up = r["reachable"]
    left = r["left"]
    clean = not (left["account_left"] or left["processes_left"] or left["directory_left"])
    return (
        f"API->active {up['api_to_active_s']:.3f} s, active->login {up['active_to_first_login_s']:.3f} s; key in "
        f"{r['key_added']['seconds']:.3f} s ({r['key_added']['ssh_tries']} tries), out "
        f"{r['key_removed']['seconds']:.3f} s ({r['key_removed']['ssh_tries']}); login "
        f"{median(r['login_s']):.3f} s, bare sshd {r['bare_sshd_start_s']:.3f} s; "
        f"released in {r['release_s']:.2f} s, {'nothing left' if clean else left}"
    )


# --- Summary and report ----------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"median": median(values), "p90": percentile(values, 90), "min": min(values, default=None),
            "max": max(values, default=None), "n": len(values)}  # fmt: skip


def summary(rounds: list[dict]) -> dict:
    """Medians and p90 over the rounds; the ceilings' are over every login of every round."""

    def of(path: str) -> list:
        values = []
        for r in rounds:
            value = r
            for name in path.split("."):
                value = value.get(name) if isinstance(value, dict) else None
            values.append(value)
        return values

    out = {
        "reachable": {
            name: spread(of(f"reachable.{name}"))
            for name in ("api_to_active_s", "active_to_first_login_s", "api_to_first_login_s", "post_answered_s")
        },
        "reachable_split_s": {k: spread(of(f"reachable.split_s.{k}")) for k in rounds[0]["reachable"]["split_s"]},
        "key_added_s": spread(of("key_added.seconds")),
        "key_added_console_path_s": spread(of("key_added.console_path_s")),
        "key_added_split_s": {k: spread(of(f"key_added.split_s.{k}")) for k in rounds[0]["key_added"]["split_s"]},
        "key_added_tries": spread(of("key_added.ssh_tries")),
        "key_added_seeing_try_started_s": spread(of("key_added.seeing_try_started_s")),
        "key_removed_s": spread(of("key_removed.seconds")),
        "key_removed_console_path_s": spread(of("key_removed.console_path_s")),
        "key_removed_split_s": {k: spread(of(f"key_removed.split_s.{k}")) for k in rounds[0]["key_removed"]["split_s"]},
        "key_removed_tries": spread(of("key_removed.ssh_tries")),
        "key_removed_seeing_try_started_s": spread(of("key_removed.seeing_try_started_s")),
        "release_s": spread(of("release_s")),
        "ceilings": {
            "login_s": spread([s for r in rounds for s in r["login_s"]]),
            "login_client_cpu_s": spread([s for r in rounds for s in r["login_client_cpu_s"]]),
            "refused_login_s": spread([s for r in rounds for s in r["refused_login_s"]]),
            "refused_client_cpu_s": spread([s for r in rounds for s in r["refused_client_cpu_s"]]),
            "bare_sshd_start_s": spread(of("bare_sshd_start_s")),
            "useradd_s": spread(of("account_tools_s.useradd")),
            "userdel_s": spread(of("account_tools_s.userdel")),
            "agent_access_prepare_s": spread(of("agent_access_alone_s.prepare")),
            "agent_access_open_s": spread(of("agent_access_alone_s.open")),
            "agent_access_close_s": spread(of("agent_access_alone_s.close")),
        },
        "rounds_with_leftovers": [
            r["round"]
            for r in rounds
            if r["left"]["account_left"] or r["left"]["processes_left"] or r["left"]["directory_left"]
        ],
    }
    c = out["ceilings"]
    login, refused, sshd = c["login_s"]["median"], c["refused_login_s"]["median"], c["bare_sshd_start_s"]["median"]
    out["ratios"] = {
        "api_to_first_login_over_sshd_start_plus_login": out["reachable"]["api_to_first_login_s"]["median"]
        / (sshd + login),
        "api_to_active_over_sshd_start": out["reachable"]["api_to_active_s"]["median"] / sshd,
        "active_to_first_login_over_login": out["reachable"]["active_to_first_login_s"]["median"] / login,
        "key_added_over_login": out["key_added_s"]["median"] / login,
        "key_removed_over_refused_login": out["key_removed_s"]["median"] / refused,
    }
    return out


def fmt(s: dict, scale: float = 1000.0, unit: str = "ms") -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median'] * scale:7.0f} {unit}  p90 {s['p90'] * scale:7.0f} {unit}"


def seeing_try(s: dict, change: str) -> str:
    return (
        f"      (the call to the agent's answer {fmt(s[f'{change}_console_path_s'])}; ssh tries: median "
        f"{s[f'{change}_tries']['median']:g}, max {s[f'{change}_tries']['max']:g}; the one that saw it started "
        f"{fmt(s[f'{change}_seeing_try_started_s'])} after the call)"
    )


def report(results: dict) -> str:
    m, s = results["machine"], results["summary"]
    c, ratio = s["ceilings"], s["ratios"]
    lines = [
        f"SSH access benchmark, {m['date']} ({m['date_local']}); {results['settings']['rounds']} rounds",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}; Python "
        f"{m['python']}, PostgreSQL {m['postgresql']}, {m['openssh']}; everything shares the {m['cpus']} CPUs",
        f"Load: {m['uptime_at_start']}  ->  {m.get('uptime_at_end', '')}",
        "",
        "Reachable (medians, p90)",
        f"  POST /reservations/ -> first login   {fmt(s['reachable']['api_to_first_login_s'])}   "
        f"x{ratio['api_to_first_login_over_sshd_start_plus_login']:.1f} a bare sshd's start + a login",
        f"    API -> active                      {fmt(s['reachable']['api_to_active_s'])}   "
        f"x{ratio['api_to_active_over_sshd_start']:.1f} a bare sshd's start",
        f"    active -> first login              {fmt(s['reachable']['active_to_first_login_s'])}   "
        f"x{ratio['active_to_first_login_over_login']:.1f} a login",
    ]
    lines += [f"      {name:<33}{fmt(v)}" for name, v in s["reachable_split_s"].items()]
    lines += [
        "",
        "Key change (medians, p90; ssh tried every 50 ms)",
        f"  key let in -> first login            {fmt(s['key_added_s'])}   "
        f"x{ratio['key_added_over_login']:.1f} a login",
    ]
    lines += [f"      {name:<33}{fmt(v)}" for name, v in s["key_added_split_s"].items()]
    lines.append(seeing_try(s, "key_added"))
    lines.append(
        f"  key taken out -> first refusal       {fmt(s['key_removed_s'])}   "
        f"x{ratio['key_removed_over_refused_login']:.1f} a refused login"
    )
    lines += [f"      {name:<33}{fmt(v)}" for name, v in s["key_removed_split_s"].items()]
    lines.append(seeing_try(s, "key_removed"))
    lines += [
        "",
        "Ceilings (same run)",
        f"  ssh … true, server running          {fmt(c['login_s'])}   (client CPU {fmt(c['login_client_cpu_s'])})",
        f"  ssh refused, server running         {fmt(c['refused_login_s'])}   "
        f"(client CPU {fmt(c['refused_client_cpu_s'])})",
        f"  bare sshd: start -> banner          {fmt(c['bare_sshd_start_s'])}",
        f"  useradd --system / userdel          {fmt(c['useradd_s'])} / {fmt(c['userdel_s'])}",
        f"  the agent's access code alone: prepare (account) {fmt(c['agent_access_prepare_s'])}, open (keys, "
        f"server) {fmt(c['agent_access_open_s'])}, close {fmt(c['agent_access_close_s'])}",
        "",
        f"Release (cancel -> completed)         {fmt(s['release_s'])}",
        f"Rounds with something left after release: {s['rounds_with_leftovers'] or 'none'}; nc- accounts at the "
        f"end: {results['nc_accounts_at_end'] or 'none'}",
    ]
    return "\n".join(lines)


# --- Main --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (10)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds first, not measured (1)")
    parser.add_argument("--database-url", help="benchmark database, dropped and recreated (DATABASE_URL)")
    parser.add_argument("--redis-url", help=f"Redis (REDIS_URL, else {DEFAULT_REDIS_URL})")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/access-<date>.json)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (their folder is printed)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds at least 1, --warmup at least 0")
    if os.geteuid() != 0:
        parser.error("run it as root: the agent makes an account per reservation, as on a GPU host")
    missing = [tool for tool in ("ssh", "ssh-keygen", "useradd", "userdel") if shutil.which(tool) is None]
    if missing or not os.access(SSHD, os.X_OK):
        parser.error(f"needs OpenSSH's client and server and the account tools; missing: {missing or [SSHD]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    database_url = bench_database_url(args.database_url or os.environ.get("DATABASE_URL"), DEFAULT_DATABASE_URL)
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    # What is measured is the access path, not the API's budget: it never refuses here.
    env = environment_configure(
        database_url, redis_url, log_level="INFO", API_THROTTLE_READ="1000000/min", API_THROTTLE_WRITE="1000000/min"
    )
    say(f"Recreating {urlsplit(database_url).path.lstrip('/')} and migrating")
    database_recreate(database_url)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    celery_queues_purge(redis_url)
    say("Building the world through the services: a node, a slice offer, a tenant and its API key")
    world = world_build()
    facts = machine_facts(["django", "celery", "daphne", "channels", "psutil"])
    facts["openssh"] = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()
    results: dict = {
        "machine": facts,
        "settings": {
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "agent": f"provisioning.agent.cli fleet --speed {SPEED} (simulated node, real accounts and sshd)",
            "poll_s": POLL_S,
            "ceiling_logins_per_round": CEILING_LOGINS,
            "database": urlsplit(database_url)._replace(netloc=urlsplit(database_url).hostname or "").geturl(),
            "redis": redis_url,
        },
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-access-"))
    # sshd trusts the keys only under directories root's and writable by root only, up to /: not /tmp.
    state_dir = Path(tempfile.mkdtemp(prefix="neocloud-bench-access-", dir="/run"))
    os.chmod(state_dir, 0o711)  # noqa: S103 - traverse only, as the agent makes its own state directory
    keys = workdir / "keys"
    keys.mkdir()
    stack = Stack(env, workdir, state_dir / "agents")
    ok = False
    try:
        say("Starting daphne, a Celery worker and beat, and the simulated agent")
        results["daphne_startup_s"] = stack.start(world["token"])
        from provisioning.models import Node  # models: after django.setup(), once the database is chosen

        deadline = time.monotonic() + 90
        while not Node.objects.filter(pk=world["node"], state=NodeState.AVAILABLE).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not connect: {stack.children['agents'].log_tail()}")
            stack.check()
            time.sleep(0.5)
        api = Api(stack.base, world["key"])
        rounds, warmups = [], []
        total = args.warmup + args.rounds
        for number in range(1, total + 1):
            warm = number <= args.warmup
            r = round_run(number, api, stack, world, keys, workdir, state_dir)
            (warmups if warm else rounds).append(r)
            label = "warm-up" if warm else f"round {number - args.warmup}/{args.rounds}"
            say(f"  {label}: {round_line(r)}")
        results["warmup"] = warmups
        results["rounds"] = rounds
        results["summary"] = summary(rounds)
        ok = True
    finally:
        logs = {name: child.log_tail(3000) for name, child in stack.children.items()}
        stack.stop()
        accesses_close(state_dir)  # as tests/e2e/conftest.py does: the agents' and the ceilings'
        shutil.rmtree(state_dir, ignore_errors=True)
        if ok and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"The processes' logs are in {workdir}")
        if not ok:
            for name, text in logs.items():
                say(f"----- {name} (last 3000 characters) -----\n{text}")
    results["nc_accounts_at_end"] = nc_accounts()  # another session's may show here on a shared machine
    machine_facts_end(results["machine"])
    output = results_write(results, name="access", output=args.output)
    print(report(results))
    say(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
