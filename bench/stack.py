"""What the benchmarks that run the console's processes share (bench/gateway.py, bench/autoscale.py): a
child process with its log, the machine's facts at the start and the end, and the pieces of their
worlds -- an edge site with nodes and a slice offer, a tenant with credit -- made through the services.

Django must be set up before the world's functions are called (they import the services then)."""

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the project is importable
    sys.path.insert(0, str(ROOT))
from console.devservers import stop_process  # noqa: E402


def environment_configure(database_url: str, redis_url: str, *, log_level: str = "WARNING", **extra: str) -> dict:
    """Settings for this process and every child it starts (the project reads them from the environment):
    the bench's database and Redis, development settings without DEBUG (which would keep every statement
    in memory), this tree first on the path, and ``extra``; returns the environment for the children."""
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DJANGO_SETTINGS_MODULE": "console.settings.development",
            "DEBUG": "false",
            "LOG_LEVEL": log_level,
            "PYTHONPATH": str(ROOT),  # this tree, not whichever one the venv has installed
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return dict(os.environ)


def results_write(results: dict, *, name: str, output: Path | None = None, suffix: str = "") -> Path:
    """The run's JSON at ``output``, or bench/results/<name>-<date><suffix>.json; returns the path."""
    output = output or ROOT / "bench" / "results" / f"{name}-{datetime.now(UTC):%Y-%m-%d}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return output


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- Processes -------------------------------------------------------------------------------------


class Child:
    """A server as a subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path, port: int | None):
        self.name, self.port, self.log_path = name, port, log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.process.pid)
        self.base = f"http://127.0.0.1:{port}"

    def wait_healthy(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as response:  # noqa: S310 - loopback
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not healthy within {timeout:.0f} s: {self.log_tail()}")

    def served(self) -> dict[str, int]:
        """A replica's counters from its health route: requests answered, inputs and encode batches."""
        with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as response:  # noqa: S310 - loopback
            return json.loads(response.read())["served"]

    def cpu_seconds(self, *, with_children: bool = False) -> float:
        """CPU seconds so far; ``with_children``: and those of its descendants (the replicas an agent
        started, the worker's pool), the live ones' own and the ones that exited and were waited for."""
        if not with_children:
            times = self.ps.cpu_times()
            return times.user + times.system
        total = 0.0
        try:
            processes = [self.ps, *self.ps.children(recursive=True)]
        except psutil.Error:
            processes = [self.ps]
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:  # it exited meanwhile: its parent's children_* has it once it is waited for
                continue
            total += times.user + times.system + times.children_user + times.children_system
        return total

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.process, timeout=15)
        self.log.close()


# --- The machine -----------------------------------------------------------------------------------


def uptime() -> str:
    """``uptime``'s line: the load averages, for the reader of a result (was the machine busy?)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def machine_facts(packages: list[str]) -> dict:
    """bench/machine.py's description, the load at the start and the versions of ``packages``."""
    from importlib.metadata import version

    from machine import describe_machine  # bench/machine.py

    return {
        **describe_machine(),
        "load_average_at_start": os.getloadavg(),
        "uptime_at_start": uptime(),
        "packages": {p: version(p) for p in packages},
    }


def machine_facts_end(facts: dict) -> None:
    facts["load_average_at_end"] = os.getloadavg()
    facts["uptime_at_end"] = uptime()


# --- The world (through the services) ------------------------------------------------------------


def edge_site_create(accelerator, *, hostnames: list[str], inventory: bool, slug: str = "bench-edge"):
    """An edge site in eu-central with one rack of ``hostnames`` (8 GPUs each) and a 1-GPU slice offer of
    ``accelerator``; returns (site, nodes, offer). ``inventory``: the nodes get their GPUs and are made
    available here (no agent will report them); else they stay enrolling until their agent says hello."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.services.catalog.offers import offer_create
    from provisioning.choices import NodeState, SiteKind
    from provisioning.services.fleet import GpuSpec, node_enrol, node_set_inventory, node_transition, rack_create
    from provisioning.services.fleet import site_create as _site_create

    site = _site_create(slug=slug, name="Bench edge", region="eu-central", kind=SiteKind.EDGE, location="Frankfurt, DE")
    rack = rack_create(site=site, name="r01", power_budget_kw=Decimal("44"))
    nodes = []
    for hostname in hostnames:
        node = node_enrol(rack=rack, hostname=hostname)
        if inventory:
            gpus = [
                GpuSpec(
                    index=i,
                    uuid=f"GPU-{uuid.uuid4()}",
                    accelerator_type=accelerator,
                    memory_mib=accelerator.memory_gib * 1024,
                )
                for i in range(8)
            ]
            node = node_set_inventory(node=node, gpus=gpus)
            node_transition(node=node, target=NodeState.AVAILABLE)
        nodes.append(node)
    offer = offer_create(
        site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=1
    )
    return site, nodes, offer


def tenant_create(*, name: str, email: str, credit: str = "100000"):
    """An organization with its owner and ``credit`` granted; returns the owner's TenantContext."""
    # Here, not at the top: these need django.setup(), done once the bench has chosen its database.
    from marketplace.choices import Role
    from marketplace.services.billing.credits import credits_grant
    from marketplace.services.tenancy.members import organization_create, user_create
    from marketplace.tenant_context import TenantContext

    owner = user_create(email=email)
    organization = organization_create(name=name, owner=owner)
    credits_grant(organization=organization, amount=credit, memo="benchmark credit")
    return TenantContext(organization=organization, user=owner, role=Role.OWNER)
