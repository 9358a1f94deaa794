"""`make demo`: the whole system on one machine, as real processes.

Starts (or uses) PostgreSQL and Redis, migrates, seeds the demo world, then runs the ASGI server
(daphne, or uvicorn with --server uvicorn), the inference gateway (uvicorn, --gateway-port, its URL
given to everything as GATEWAY_URL), a Celery worker and Celery beat, each in its own process
group. SIGINT/SIGTERM, or any child dying, stops every child it started, the embedded servers last.

    python -m console.launcher [--host 127.0.0.1] [--port 8000] [--gateway-port 8001] [--server daphne|uvicorn]
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from console.devservers import Stop, data_stores, raise_stop_on_signals, stop_process

logger = logging.getLogger("console.launcher")
ROOT = Path(__file__).resolve().parent.parent
CELERY_QUEUES = "default,provisioning,billing,telemetry"
SSH_KEY_FILE = "demo-ssh-key"  # in the data directory: the private key that logs into Acme AI's demo slice
CONNECT_WAIT_SECONDS = 180
API_KEY_FILE = "demo-api-key"  # in the data directory: Acme AI's key for the demo endpoint (seed_demo writes it)


def _manage(env: dict, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT, check=True)


def _server_command(server: str, host: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "console.asgi:application",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "2",
            "--no-access-log",
            "--ws",
            "websockets",
        ]
    return [sys.executable, "-m", "daphne", "-b", host, "-p", str(port), "console.asgi:application"]


def _gateway_command(host: str, port: int) -> list[str]:
    """The gateway's own process (console.gateway): one, with uvicorn's fast loop and parser."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "console.gateway.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--lifespan",
        "on",
        "--no-access-log",
    ]


def _children(host: str, port: int, server: str, data_dir: Path, gateway_port: int) -> dict[str, list[str]]:
    celery = [sys.executable, "-m", "celery", "-A", "console"]
    return {
        server: _server_command(server, host, port),
        "gateway": _gateway_command(host, gateway_port),
        "celery worker": [
            *celery,
            "worker",
            "-l",
            "INFO",
            "-Q",
            CELERY_QUEUES,
            "--concurrency",
            "2",
            "--without-gossip",
            "--without-mingle",
        ],
        "celery beat": [*celery, "beat", "-l", "INFO", "--schedule", str(data_dir / "celerybeat-schedule")],
    }


def _wait_healthy(url: str, processes: dict[str, subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own http:// URL
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def _endpoint_lines(key_file: Path) -> list[str]:
    """How to call the demo's inference endpoint: its URL, its model and a snippet to paste (unindented,
    so it pastes into Python as it is). The key's plaintext stays in its file; the snippet reads it."""
    from console.demo import demo_endpoint  # after django.setup(), as in _banner

    endpoint = demo_endpoint()
    if endpoint is None:
        return []
    body = json.dumps({"model": endpoint.name, "input": ["hello"]})
    lines = [
        "Inference endpoint of Acme AI (a real model server on a simulated GPU, ready within a minute of start):",
        f"  Base URL    {endpoint.base_url}",
        f"  Model       {endpoint.name}  ({endpoint.model}, embeddings)",
    ]
    if not key_file.exists():
        return [*lines, ""]
    return [
        *lines,
        f"  API key     in {key_file} (Acme AI, member)",
        "With the openai client (installed in .venv: .venv/bin/python, then paste):",
        "",
        "from openai import OpenAI",
        f"client = OpenAI(base_url={endpoint.base_url!r}, api_key=open({str(key_file)!r}).read().strip())",
        f"print(client.embeddings.create(model={endpoint.name!r}, input=['hello']).data[0].embedding[:4])",
        "",
        "Or with curl:",
        f'  curl -s {endpoint.base_url}/embeddings -H "Authorization: Bearer $(cat {key_file})" \\',
        f"    -H 'Content-Type: application/json' -d '{body}'",
        "",
    ]


def _banner(base: str, data_dir: Path) -> str:
    # Imported once django.setup() has run (_run): console.demo imports models, and the launcher itself
    # starts before Django is configured.
    from console.demo import demo_credentials

    lines = [
        "",
        "Neocloud Console is running.",
        f"  Portal      {base}/",
        f"  Admin       {base}/admin/",
        f"  API docs    {base}/api/v1/docs/",
        f"  API schema  {base}/api/v1/schema/",
        "",
        "Demo accounts:",
        *[f"  {who:<24} {email:<26} {password}" for who, email, password in demo_credentials()],
        "",
        "An API key for scripts (from another shell):",
        f"  DATABASE_URL={os.environ['DATABASE_URL']} REDIS_URL={os.environ['REDIS_URL']} \\",
        "    .venv/bin/python manage.py create_api_key acme --user member@acme.example --name my-script",
        "",
        *_endpoint_lines(data_dir / API_KEY_FILE),
        "Press Ctrl-C to stop everything.",
        "",
    ]
    return "\n".join(lines)


def _start(processes: dict, name: str, command: list[str], env: dict) -> None:
    processes[name] = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL)
    logger.info("started %s (pid %s)", name, processes[name].pid)


def _run(args: argparse.Namespace, stores: dict[str, str], processes: dict[str, subprocess.Popen]) -> None:
    gateway = f"http://{args.host}:{args.gateway_port}"
    env = {
        "AGENT_HEARTBEAT_SECONDS": "5",
        "GATEWAY_URL": gateway,
        **os.environ,
        **stores,
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(stores)  # this process reads settings too (the banner)
    os.environ.setdefault("GATEWAY_URL", env["GATEWAY_URL"])
    data_dir = Path(args.dir).resolve()
    tokens = data_dir / "agent-tokens.json"
    _manage(env, "migrate", "--noinput")
    if not args.no_seed:
        _manage(
            env,
            "seed_demo",
            "--agent-tokens",
            str(tokens),
            "--agent-state",
            str(data_dir / "agents"),
            "--api-key-file",
            str(data_dir / API_KEY_FILE),
            "--ssh-key-file",
            str(data_dir / SSH_KEY_FILE),
        )
    for name, command in _children(args.host, args.port, args.server, data_dir, args.gateway_port).items():
        _start(processes, name, command, env)
    base = f"http://{args.host}:{args.port}"
    _wait_healthy(f"{base}/healthz", processes)
    _wait_healthy(f"{gateway}/healthz", processes)
    if tokens.exists() and not args.no_agents:
        # One process hosting a simulated agent for every demo node, each with its own connection and
        # secret, so reservations made in the demo really go live.
        _start(
            processes,
            "agents",
            [
                sys.executable,
                "-m",
                "provisioning.agent.cli",
                "fleet",
                "--server",
                base,
                "--tokens",
                str(tokens),
                "--state-dir",
                str(data_dir / "agents"),
                "--backend",
                "simulated",
                "--driver",
                "simulated",
            ],
            env,
        )
    import django

    django.setup()
    print(_banner(base, data_dir), flush=True)
    connect_by = time.monotonic() + CONNECT_WAIT_SECONDS
    while True:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; stopping everything")
        if connect_by and time.monotonic() < connect_by:
            connect_by = 0 if _print_connect(data_dir / SSH_KEY_FILE) else connect_by
        time.sleep(0.5)


def _print_connect(key_file: Path) -> bool:
    """Once the demo's SSH reservation is active: how to log into it (a real SSH server on this machine)."""
    from console.demo import demo_connect_lines  # after django.setup(), as in _banner

    lines = demo_connect_lines(key_file)
    if not lines:
        return False
    print("SSH into Acme AI's demo slice (a real SSH server on this machine; its sessions see their GPU only):")
    print("\n".join(f"  {line}" for line in lines), "\n", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--gateway-port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8001")), help="The inference gateway."
    )
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default=os.environ.get("ASGI_SERVER", "daphne"))
    parser.add_argument("--dir", default=os.environ.get("DEMO_DIR", ".demo"), help="Data of embedded servers.")
    parser.add_argument("--no-seed", action="store_true", help="Do not seed the demo world.")
    parser.add_argument("--no-agents", action="store_true", help="Do not run the simulated node agents.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="launcher: %(message)s")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings.development")
    raise_stop_on_signals()

    processes: dict[str, subprocess.Popen] = {}
    exit_code = 0
    try:
        with data_stores(Path(args.dir).resolve()) as stores:
            try:
                _run(args, stores, processes)
            finally:
                # Children first, while PostgreSQL and Redis still answer; the stores stop after.
                for name, process in reversed(list(processes.items())):
                    stop_process(process)
                    logger.info("stopped %s", name)
    except Stop as stop:
        logger.info("%s received: stopped everything", stop)
    except (RuntimeError, subprocess.CalledProcessError) as error:
        logger.error("%s", error)
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
