"""Real processes for end-to-end tests: daphne, a Celery worker, Celery beat and node agents, all on
the test database and the test Redis, on this machine's loopback."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from django.conf import settings

from console.devservers import ApiClient as Api  # noqa: F401 - the e2e tests import it from here
from console.devservers import free_port, stop_process
from provisioning.agent.drivers.access.manager import SshAccess
from provisioning.agent.drivers.base import no_progress

ROOT = Path(settings.BASE_DIR)


def wait_for(condition: Callable[[], object], *, timeout: float, what: str, every: float = 0.2):
    """Poll until ``condition()`` is truthy; its value is returned. Fails the test with ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def database_url() -> str:
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own loopback URL
            return response.status == 200
    except OSError:
        return False


class Stack:
    """The console's processes. Each runs in its own process group, logs to a file in ``logs``."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.agent_state_dirs: list[Path] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"},
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "DJANGO_SETTINGS_MODULE": "console.settings.test",
            "PYTHONUNBUFFERED": "1",
            "RESERVATION_TICK_SECONDS": "1",
            "RECONCILE_SECONDS": "2",
            "AGENT_HEARTBEAT_SECONDS": "2",
            "PROVISION_TIMEOUT_SECONDS": "90",
            "RELEASE_TIMEOUT_SECONDS": "60",
            "DATABASE_POOL": "false",
        }

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_daphne(self):
        self.start(
            "daphne",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "console.asgi:application"],
        )
        wait_for(self._healthy, timeout=60, what="daphne to answer /healthz")

    def start_gateway(self, env: dict | None = None) -> str:
        """The gateway as its own uvicorn process, as the launcher runs it; returns its base URL."""
        port = free_port()
        self.start(
            "gateway",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "console.gateway.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--lifespan",
                "on",
            ],
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base}/healthz"), timeout=60, what="the gateway to answer /healthz")
        return base

    def start_worker(self):
        self.start(
            "worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "console",
                "worker",
                "-l",
                "INFO",
                "-Q",
                "default,provisioning,billing,telemetry",
                "--concurrency",
                "2",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
        )

    def start_beat(self, schedule: Path):
        self.start(
            "beat", [sys.executable, "-m", "celery", "-A", "console", "beat", "-l", "INFO", "--schedule", str(schedule)]
        )

    def start_agents(self, tokens: list[dict], state_dir: Path, *options: str):
        self.agent_state_dirs.append(state_dir)
        path = state_dir / "tokens.json"
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(tokens))
        self.start(
            "agents",
            [
                sys.executable,
                "-m",
                "provisioning.agent.cli",
                "fleet",
                "--server",
                self.base,
                "--tokens",
                str(path),
                "--state-dir",
                str(state_dir),
                *options,
            ],
        )

    def kill(self, name: str, sig: int = signal.SIGKILL):
        """Send ``sig`` to the process's group; if it has not exited after 30 s (daphne drains its
        connections on SIGTERM, slowly on a loaded machine), SIGKILL it, so no test leaves it running."""
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, sig)
            process.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)

    def _healthy(self) -> bool:
        return http_ok(f"{self.base}/healthz")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self):
        for name in ["agents", "beat", "worker", "gateway", "daphne", *self.processes]:
            process = self.processes.pop(name, None)
            if process is not None:
                stop_process(process, timeout=20)
        # A real host's agent leaves its workloads running when it stops (an upgrade must not kill them);
        # a test's host is this machine, so what the agents started goes with the test.
        for state_dir in self.agent_state_dirs:
            for registry in state_dir.glob("**/workloads.json"):
                for entry in json.loads(registry.read_text() or "{}").values():
                    group = entry if isinstance(entry, int) else entry["group"]
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, signal.SIGKILL)
            # The same for SSH access a failed test left set up: its servers, sessions and accounts.
            for registry in state_dir.glob("**/access.json"):
                _close_every_access(registry)


def _close_every_access(registry: Path) -> None:
    """Close what an agent's access records hold, in a thread of its own: a browser test's page runs an
    event loop in this one."""
    access = SshAccess(state_dir=registry.parent, listen="127.0.0.1", host=None, grace_s=1)

    async def close_all():
        for reservation in json.loads(registry.read_text() or "{}"):
            await access.close(reservation, no_progress)

    closing = threading.Thread(target=asyncio.run, args=(close_all(),))
    closing.start()
    closing.join()


def purge_celery_queues() -> None:
    """Tasks other tests enqueued (for rows long rolled back) must not reach this test's worker."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete("default", "provisioning", "billing", "telemetry", "unacked", "unacked_index", "unacked_mutex")


@pytest.fixture
def stack(tmp_path, transactional_db):
    purge_celery_queues()
    running = Stack(tmp_path)
    try:
        yield running
    finally:
        running.stop()
        for name in ["daphne", "worker", "beat", "agents", "gateway"]:
            text = running.log(name)
            if text:
                print(f"----- {name} (last 3000 chars) -----\n{text[-3000:]}")
