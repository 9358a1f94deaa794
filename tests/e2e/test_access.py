"""A way into what was rented, end to end with real processes (issue 15): a tenant adds a key and
reserves a 2-GPU slice through the API; daphne, a Celery worker and beat bring it up through a simulated
node agent, which starts a real SSH server for it; OpenSSH's `ssh` logs in with the tenant's private key
and the session sees the reservation's GPUs only; another tenant's key is refused; a key let in while it
runs works within seconds; after release the login is refused, the account is gone and no process of the
reservation is left on the host."""

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from marketplace.choices import Role
from marketplace.services.tenancy.api_keys import api_key_create
from provisioning.services.agents import bootstrap_token_create
from tests.e2e.conftest import Api, wait_for
from tests.e2e.test_provisioning import connected, state_of
from tests.factories import OfferFactory, RackFactory, make_node, make_tenant

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("ssh") is None or shutil.which("ssh-keygen") is None, reason="needs OpenSSH's client"
    ),
]


def key_pair(directory: Path, name: str) -> Path:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path


def ssh(key: Path, node: dict, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "ssh", "-i", str(key), "-p", str(node["port"]),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
            f"{node['user']}@{node['host']}", command,
        ],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def tenant_api(stack) -> Api:
    tenant = make_tenant(role=Role.MEMBER)
    _key, plaintext = api_key_create(tenant=tenant, name="e2e")
    return Api(stack.base, plaintext)


def add_key(api: Api, key: Path) -> str:
    status, body = api.call("POST", "/api/v1/ssh-keys/", {"public_key": key.with_suffix(".pub").read_text()})
    assert status == 201, body
    return body["id"]


def processes_of(reservation: str) -> list[int]:
    """Pids on this host whose environment says they belong to the reservation."""
    marker = f"NEOCLOUD_RESERVATION={reservation}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_tenant_logs_into_its_slice_with_its_key_and_nothing_is_left_after_release(stack, tmp_path):
    rack = RackFactory()
    node = make_node(rack=rack)
    offer = OfferFactory(site=rack.site, accelerator_type=node.accelerator_type, gpus_per_instance=2)
    tokens = [
        {
            "hostname": node.hostname,
            "token": bootstrap_token_create(node=node, actor="e2e"),
            "gpus": 8,
            "gpu_name": node.accelerator_type.device_name,
            "gpu_memory_mib": node.accelerator_type.memory_gib * 1024,
        }
    ]
    # The reservation's account must reach its home under the agent's state directory, through parents
    # only root may write (as sshd insists): not pytest's tmp_path (0700) nor /tmp (1777).
    state = Path(tempfile.mkdtemp(prefix="neocloud-e2e-access-", dir="/run" if os.geteuid() == 0 else None))
    os.chmod(state, 0o711)  # noqa: S103 - traverse only, as the agent makes its own state directory
    keys = tmp_path / "keys"
    keys.mkdir()
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, state / "agents", "--speed", "8")
    try:
        wait_for(lambda: connected([node]), timeout=60, what="the agent to connect")
        alice, mallory = tenant_api(stack), tenant_api(stack)
        alice_key, alice_laptop, mallory_key = (key_pair(keys, n) for n in ("alice", "alice-laptop", "mallory"))
        alice_key_id = add_key(alice, alice_key)
        add_key(mallory, mallory_key)

        status, body = alice.call(
            "POST", "/api/v1/reservations/", {"offer": offer.id, "duration_hours": 1, "ssh_keys": [alice_key_id]}
        )
        assert status == 201, body
        reservation = body["id"]
        wait_for(lambda: state_of(alice, reservation) in ("active", "failed"), timeout=90, what="it to go active")
        _, detail = alice.call("GET", f"/api/v1/reservations/{reservation}/")
        assert detail["state"] == "active", detail["failure_reason"]
        access = detail["access"]
        assert access["status"] == "ready", access
        (served,) = access["nodes"]
        assert served["command"] == f"ssh -p {served['port']} {served['user']}@{served['host']}"
        assert served["host_key"].startswith("SHA256:")
        gpus = detail["allocations"][0]["gpus"]
        assert len(gpus) == 2

        session = ssh(alice_key, served, "id -un; echo $CUDA_VISIBLE_DEVICES; nvidia-smi -L")
        assert session.returncode == 0, session.stderr
        user, visible, *listed = session.stdout.strip().splitlines()
        assert user == served["user"] and user != "root"
        assert visible == ",".join(map(str, gpus))
        assert [line.split(":")[0] for line in listed] == [f"GPU {index}" for index in gpus]  # its GPUs only

        assert ssh(mallory_key, served, "true").returncode == 255  # another tenant's key is refused
        assert ssh(alice_laptop, served, "true").returncode == 255  # not let in (yet)

        laptop_id = add_key(alice, alice_laptop)
        status, body = alice.call("POST", f"/api/v1/reservations/{reservation}/ssh-keys/", {"key": laptop_id})
        assert status == 200, body
        wait_for(lambda: ssh(alice_laptop, served, "true").returncode == 0, timeout=30, what="the new key to work")
        status, body = alice.call("DELETE", f"/api/v1/reservations/{reservation}/ssh-keys/{alice_key_id}/")
        assert status == 200, body
        wait_for(lambda: ssh(alice_key, served, "true").returncode == 255, timeout=30, what="the key to be refused")

        # A session left running, as a tenant's training job would be: release must end it.
        background = ssh(alice_laptop, served, "nohup sleep 600 >/dev/null 2>&1 & echo started")
        assert background.stdout.strip() == "started"
        assert processes_of(reservation)

        status, body = alice.call("POST", f"/api/v1/reservations/{reservation}/cancel/")
        assert status == 200, body
        wait_for(lambda: state_of(alice, reservation) == "completed", timeout=90, what="the release to complete")
        assert ssh(alice_laptop, served, "true").returncode == 255  # no server any more
        wait_for(lambda: not processes_of(reservation), timeout=10, what="the reservation's processes to end")
        if os.geteuid() == 0:  # a dedicated account (an agent not run as root lets its own user in)
            with pytest.raises(KeyError):
                pwd.getpwnam(served["user"])
        _, detail = alice.call("GET", f"/api/v1/reservations/{reservation}/")
        assert detail["access"]["status"] == "ended"
    finally:
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)
