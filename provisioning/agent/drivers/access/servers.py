"""The SSH server of one reservation: OpenSSH's sshd where one can run here, else the agent's own small
server (``asyncssh_server``, on the asyncssh library). One server per reservation, listening on a port
the agent chose, with its own configuration, host key and log under the reservation's directory; keys
only, no passwords, no root, no one but the reservation's account, and the reservation's variables
(its GPUs, its marker) in every session.

sshd can run when it is installed and its privilege-separation directory (/run/sshd) exists: the agent
makes it when it runs as root; a user cannot, so a non-root agent takes sshd only where someone did.

A server is up once its port answers with an SSH banner (not merely accepts: another program may have
taken the port since the agent picked it). One that exits first, or is not up within READY_TIMEOUT_S,
fails the provisioning with the last line of its log.

A server is started again (``server_restart``) from the configuration written at its first start, so
it comes back on the same port, with the same host key, keys file and sessions' environment."""

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.agent.drivers.access.accounts import MARKER, Account
from provisioning.agent.drivers.base import DriverError, spawn_logged
from provisioning.agent.state import write_json_atomic, write_text_atomic

Server = Literal["openssh", "asyncssh"]
SERVER_CHOICES = ("auto", "openssh", "asyncssh")
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
ASYNCSSH_MODULE = "provisioning.agent.drivers.access.asyncssh_server"
PACKAGE_ROOT = Path(__file__).resolve().parents[4]  # holds provisioning/: what the server's Python imports
SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY_TIMEOUT_S = 10.0
READY_POLL_S = 0.05
BANNER_TIMEOUT_S = 1.0
LOG_TAIL_BYTES = 4096
UNSAFE_IN_CONFIG = frozenset('"\\%')  # sshd_config quoting and its %-tokens


def usable_sshd() -> tuple[str | None, str]:
    """The sshd to run, or None and why there is none."""
    sshd = SSHD if os.access(SSHD, os.X_OK) else shutil.which("sshd")
    if sshd is None:
        return None, "OpenSSH's sshd is not installed"
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    elif not PRIVSEP_DIR.is_dir():
        return None, f"sshd needs {PRIVSEP_DIR}, which only root can make"
    return sshd, ""


def server_for(choice: str) -> Server:
    """The server to run for ``choice`` (one of SERVER_CHOICES). Forcing OpenSSH where it cannot run is
    refused."""
    if choice == "asyncssh":
        return "asyncssh"
    sshd, why_not = usable_sshd()
    if sshd is not None:
        return "openssh"
    if choice == "openssh":
        raise DriverError(f"this node cannot run OpenSSH for access: {why_not}")
    return "asyncssh"


@dataclass(frozen=True)
class Setup:
    """Where one reservation's server lives and whom it lets in."""

    reservation: str
    directory: Path
    account: Account
    listen: str
    port: int
    environment: dict[str, str]  # every session's, on top of what a login sets (HOME, USER, SHELL)

    @property
    def host_key(self) -> Path:
        return self.directory / "host_key"

    @property
    def authorized_keys(self) -> Path:
        return self.directory / "authorized_keys"


def connect_host(listen: str) -> str:
    """Where the agent reaches a server listening on ``listen``: the loopback when it is every address."""
    every_address = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - read, not bound
    return every_address.get(listen, listen)


def port_unavailable(listen: str, port: int) -> str | None:
    """Why nothing can listen on ``port`` of ``listen`` now (another program does, most likely), or
    None. Connections closed lately (TIME_WAIT) do not count: the servers bind with SO_REUSEADDR too."""
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listen, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def host_key_make(directory: Path) -> str:
    """A new Ed25519 host key for the reservation's server (private 0600, the agent's), and its public
    line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_text_atomic(directory / "host_key", private.decode("ascii"))
    line = public.decode("ascii")
    write_text_atomic(directory / "host_key.pub", f"{line}\n", mode=0o644)
    return line


def _quoted(value: str) -> str:
    if any(char in UNSAFE_IN_CONFIG or not char.isprintable() for char in value):
        raise DriverError(f"cannot write {value!r} into the SSH server's configuration")
    return f'"{value}"'


def sshd_config(setup: Setup) -> str:
    """sshd's configuration. Not under root the files are the agent's user's own and may lie under a
    directory others can write (/tmp), which StrictModes refuses: it is off in that mode (the demo's)."""
    environment = " ".join(_quoted(f"{name}={value}") for name, value in setup.environment.items())
    lines = [
        f"Port {setup.port}",
        f"ListenAddress {_quoted(setup.listen)}",
        f"HostKey {_quoted(str(setup.host_key))}",
        f"PidFile {_quoted(str(setup.directory / 'sshd.pid'))}",  # not /run/sshd.pid, the host's own sshd's
        f"AuthorizedKeysFile {_quoted(str(setup.authorized_keys))}",
        f"AllowUsers {setup.account.user}",
        "PermitRootLogin no",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "PermitUserEnvironment no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",  # scp speaks SFTP since OpenSSH 9
        f"SetEnv {environment}",
    ]
    if not setup.account.made:
        lines.append("StrictModes no")
    return "\n".join(lines) + "\n"


def asyncssh_config(setup: Setup) -> dict[str, object]:
    """What the agent's own server reads at its start (asyncssh_server's docstring)."""
    account = setup.account
    return {
        "listen": setup.listen,
        "port": setup.port,
        "user": account.user,
        "uid": account.uid if account.made else None,  # None: it runs as the agent's user already
        "gid": account.gid if account.made else None,
        "home": str(account.home),
        "shell": "/bin/bash",
        "host_key": str(setup.host_key),
        "authorized_keys": str(setup.authorized_keys),
        "environment": setup.environment,
    }


def _config(server: Server, directory: Path) -> Path:
    return directory / ("sshd_config" if server == "openssh" else "asyncssh.json")


def _log(directory: Path) -> Path:
    return directory / "server.log"


async def server_start(server: Server, setup: Setup) -> asyncio.subprocess.Process:
    """Write the server's configuration and start it (``server_restart``)."""
    if server == "openssh":
        write_text_atomic(_config(server, setup.directory), sshd_config(setup))
    else:
        write_json_atomic(_config(server, setup.directory), asyncssh_config(setup))
    return await server_restart(server, setup.directory, setup.reservation)


async def server_restart(server: Server, directory: Path, reservation: str) -> asyncio.subprocess.Process:
    """Start the server from the configuration in ``directory``, in its own process group, its output
    appended to its log. It runs with the reservation's marker, so ending the reservation's processes
    ends it too."""
    config = _config(server, directory)
    if not config.is_file():
        raise DriverError(f"the SSH server's configuration is missing ({config})")
    if server == "openssh":
        sshd, why_not = usable_sshd()
        if sshd is None:
            raise DriverError(f"this node cannot run OpenSSH for access: {why_not}")
        argv = [sshd, "-D", "-e", "-f", str(config)]  # sshd re-executes itself: an absolute path
    else:
        argv = [sys.executable, "-m", ASYNCSSH_MODULE, str(config)]
    environment = {
        "PATH": SERVER_PATH,
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(PACKAGE_ROOT),
        MARKER: reservation,
    }
    return await spawn_logged(argv, log=_log(directory), cwd=directory, env=environment, what="the SSH server")


async def server_ready(process: asyncio.subprocess.Process, *, listen: str, port: int, directory: Path) -> None:
    """Until the server answers on its port with an SSH banner; DriverError when it exits first or
    does not within READY_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while not await _banner(connect_host(listen), port):
        if process.returncode is not None:
            raise DriverError(
                f"the SSH server exited with status {process.returncode} before it listened{last_log_line(directory)}"
            )
        if loop.time() >= deadline:
            raise DriverError(
                f"the SSH server did not listen on port {port} within {READY_TIMEOUT_S:g} s{last_log_line(directory)}"
            )
        await asyncio.sleep(READY_POLL_S)


async def _banner(host: str, port: int) -> bool:
    writer = None
    try:
        async with asyncio.timeout(BANNER_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            return (await reader.readline()).startswith(b"SSH-")
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(BANNER_TIMEOUT_S):
                    await writer.wait_closed()


def last_log_line(directory: Path) -> str:
    """``; its last output: '...'`` from the log of the server in ``directory``, or nothing."""
    try:
        with open(_log(directory), "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
            lines = log.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return f"; its last output: {lines[-1][-300:]!r}" if lines else ""
