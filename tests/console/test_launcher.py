"""`make demo`'s launcher as a user runs it: a real subprocess with embedded PostgreSQL and Redis,
daphne, a Celery worker and beat, the agents and the demo endpoint's model server. SIGTERM must leave
nothing running."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from django.conf import settings

from console.devservers import free_port

pytestmark = pytest.mark.slow


def log_text(tmp_path) -> str:
    return (tmp_path / "launcher.log").read_text(errors="replace")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_the_demo_comes_up_and_sigterm_stops_every_process_it_started(tmp_path, server):
    port, gateway_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}}
    log = open(tmp_path / "launcher.log", "wb")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "console.launcher",
            "--port",
            str(port),
            "--dir",
            str(tmp_path / "demo"),
            "--server",
            server,
            "--gateway-port",
            str(gateway_port),
        ],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and launcher.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/schema/", timeout=3) as response:
                    status = response.status
                    break
            except OSError:
                time.sleep(0.5)
        assert status == 200, (tmp_path / "launcher.log").read_text()[-4000:]
        while (
            time.monotonic() < deadline
            and "Neocloud Console is running." not in (tmp_path / "launcher.log").read_text()
        ):
            time.sleep(0.2)

        started = descendants(launcher.pid)
        commands = [" ".join(p.cmdline()) for p in started if not gone(p)]
        assert any("postgres" in c for c in commands), commands
        assert any("redis-server" in c for c in commands), commands
        assert any(" worker" in c for c in commands) and any(" beat" in c for c in commands), commands
        assert any(server in c for c in commands), commands
        assert any("console.gateway.asgi:application" in c for c in commands), commands
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/healthz", timeout=3) as response:
            assert response.status == 200
        assert any("provisioning.agent.cli fleet" in c for c in commands), commands
        deadline_agents = time.monotonic() + 60
        while time.monotonic() < deadline_agents and "nodes enrolled, connecting" not in log_text(tmp_path):
            time.sleep(0.3)
        assert "fleet: 28 of 28 nodes enrolled, connecting" in log_text(tmp_path), log_text(tmp_path)[-3000:]
        # The demo endpoint's replica: a real model server, started by the fleet's simulated agent.
        server = None
        while time.monotonic() < deadline_agents + 120 and server is None:
            server = next(
                (p for p in descendants(launcher.pid) if "provisioning.agent.serving" in " ".join(p.cmdline())), None
            )
            time.sleep(0.3)
        assert server is not None, log_text(tmp_path)[-3000:]
        started.append(server)

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(gone(p) for p in started):
            time.sleep(0.2)
        left = [f"{p.pid} {' '.join(p.cmdline())}" for p in started if not gone(p)]
        assert not left, f"still running after SIGTERM: {left}"
        output = (tmp_path / "launcher.log").read_text()
        assert "Neocloud Console is running." in output and "ops@neocloud.example" in output
        assert "Inference endpoint of Acme AI" in output and "from openai import OpenAI" in output
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for process in descendants(launcher.pid):
            process.kill()
        log.close()
