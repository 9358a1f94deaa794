"""The SSH access of a node's reservations, for both host drivers: the account a tenant logs in as
(accounts.py), the keys it logs in with (keys.py), the server that lets it in (servers.py), and their
records, so that an agent restarted in between still updates and releases them.

A reservation's access is set up in two parts, around the image's steps (which the process driver runs
as the account): ``prepare`` makes the account and its directory, ``open`` installs the keys and starts
the server. It is recorded (``access.json`` in the state directory) before anything of it exists, and
``close`` removes whatever exists, so a provisioning that failed halfway is torn down like a released
one. The record holds the reservation's GPUs until it is released: a tenant logged in may use them at
any moment.

When an agent starts, ``resume`` starts again every recorded server that does not run (a simulated
host's agent stopped them; on a real host one may have died), as it was: the console still tells the
tenant that port and that host key. ``teardown`` releases every access, for a host given up for good.

Files, under ``<state-dir>/access/<reservation>/``: the server's configuration, host key, log and pid
file, ``authorized_keys`` (root's, 0644: the server reads it as the account at each login, and the
tenant cannot change it: the console owns the key list), ``home/`` (the account's, 0700) and, on a
simulated node, ``bin/nvidia-smi`` (root's), a stand-in that lists the reservation's GPUs.
"""

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from provisioning.agent.drivers.access.accounts import (
    MARKER,
    SESSION_PATH,
    Account,
    account_choose,
    account_make,
    account_remove,
    accounts_made_here,
    accounts_naming,
    own_account,
    processes_end,
    reservation_processes,
    uid_of,
)
from provisioning.agent.drivers.access.keys import Keys, fingerprint, keys_of
from provisioning.agent.drivers.access.servers import (
    SERVER_CHOICES,
    Server,
    Setup,
    host_key_make,
    port_unavailable,
    server_for,
    server_ready,
    server_restart,
    server_start,
)
from provisioning.agent.drivers.base import (
    DriverError,
    Gpus,
    Params,
    ProgressCallback,
    no_progress,
    reservation_uuid_of,
)
from provisioning.agent.drivers.replica import free_port
from provisioning.agent.state import ensure_state_dir, read_json, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

REGISTRY = "access.json"
GRACE_S = 5.0
PROFILE = (
    "# Written by the node agent when it made this account: /etc/profile sets PATH anew for a login\n"
    "# shell, so this puts the node's own tools first again.\n"
    'PATH="{tools}:$PATH"\n'
)


@dataclass(frozen=True)
class AccessRecord:
    user: str
    home: str
    made: bool  # the account was made for the reservation (and is removed with it)
    gpus: Gpus
    server: Server
    version: int = -1  # of the keys installed; -1 before the first
    keys: int = 0
    pid: int | None = None
    port: int | None = None
    host: str | None = None
    host_key: str | None = None
    directory: str | None = None  # its files; None (recorded before there was a choice): <state-dir>/access/<id>

    def detail(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "server": self.server,
            "host_key": self.host_key,
        }


class SshAccess:
    """The access of one node's reservations. ``listen`` is the address its servers listen on, ``host``
    the one the provisioning's result tells tenants to connect to (None: this host's FQDN)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        listen: str,
        host: str | None,
        ssh_server: str = "auto",
        grace_s: float = GRACE_S,
        access_dir: Path | None = None,
    ) -> None:
        """``access_dir``: where new accesses keep their files (default ``<state-dir>/access``); each
        access records its own, so one made under another default is still found."""
        if ssh_server not in SERVER_CHOICES:
            raise ValueError(f"ssh_server must be one of {', '.join(SERVER_CHOICES)}")
        self._state_dir = state_dir
        self._access_dir = access_dir or state_dir / "access"
        self._listen = listen
        self._host = host
        self._ssh_server = ssh_server
        self._grace = grace_s
        self._processes: dict[str, asyncio.subprocess.Process] = {}  # servers this agent started, to reap

    def holdings(self) -> dict[str, Gpus]:
        return {reservation: record.gpus for reservation, record in self._registry().items()}

    def records(self, reservation: str) -> bool:
        return reservation in self._registry()

    def live(self, reservation: str) -> dict[str, Any] | None:
        """The access of ``reservation`` as its provisioning reported it, while its server runs."""
        record = self._registry().get(reservation)
        if record is None or record.host_key is None or not self._running(reservation, record):
            return None
        return record.detail()

    async def prepare(self, reservation: str, gpus: Gpus) -> Account:
        """The reservation's account and directory (a former access of it that no longer runs, say after
        a simulated host restarted, is removed first)."""
        server = server_for(self._ssh_server)
        made = accounts_made_here()
        await self.close(reservation, no_progress)
        directory = self._access_dir / reservation
        own = None if made else own_account()
        # Named and made in one go: the simulated nodes of a fleet, in this process, make accounts of one
        # reservation at the same moment, and must not both pick the free name.
        async with accounts_naming():
            record = AccessRecord(
                user=account_choose(reservation, directory / "home") if own is None else own.user,
                home=str(directory / "home" if own is None else own.home),
                made=made,
                gpus=gpus,
                server=server,
                directory=str(directory),
            )
            self._save({**self._registry(), reservation: record})  # before it exists: a release finds it
            self._directories(directory, made)
            if own is not None:
                return own
            _check_reachable(directory)
            return await account_make(reservation, directory / "home", record.user)

    async def open(
        self,
        reservation: str,
        account: Account,
        keys: Keys,
        environment: dict[str, str],
        progress: ProgressCallback,
        *,
        gpu_lines: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Install the keys and start the server; the access to report. ``environment`` (the GPUs'
        visibility) goes into every session; ``gpu_lines``, when given, are what the stand-in
        nvidia-smi of a simulated node prints."""
        directory = self._directory(reservation)
        await progress("install keys", 0)
        self._install(directory, keys)
        path = SESSION_PATH
        if gpu_lines is not None:
            path = f"{self._stand_in(directory, reservation, gpu_lines)}:{SESSION_PATH}"
            if account.made:
                _profile(account, directory / "bin")
        record = replace(self._registry()[reservation], version=keys.version, keys=len(keys.lines))
        self._save({**self._registry(), reservation: record})
        await progress("start access", 50)
        setup = Setup(
            reservation=reservation,
            directory=directory,
            account=account,
            listen=self._listen,
            port=self._port(),
            environment={**environment, MARKER: reservation, "PATH": path},
        )
        host_key = host_key_make(directory)
        process = await server_start(record.server, setup)
        self._processes[reservation] = process
        record = replace(record, pid=process.pid, port=setup.port)
        self._save({**self._registry(), reservation: record})
        await server_ready(process, listen=self._listen, port=setup.port, directory=directory)
        record = replace(record, host=self._host or socket.getfqdn(), host_key=fingerprint(host_key))
        self._save({**self._registry(), reservation: record})
        await progress("start access", 100)
        return record.detail()

    async def update(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        """The ``access`` command: replace the reservation's keys when ``version`` is newer than the
        keys installed (commands may arrive out of order). The server reads the file at each login."""
        reservation = reservation_uuid_of(params)
        keys = keys_of(params)
        record = self._registry().get(reservation)
        if record is None:
            raise DriverError("this reservation has no SSH access on this node")
        if keys.version <= record.version:
            return {"reservation": reservation, "version": record.version, "keys": record.keys, "applied": False}
        await progress("install keys", 0)
        self._install(self._directory(reservation), keys)
        self._save({**self._registry(), reservation: replace(record, version=keys.version, keys=len(keys.lines))})
        await progress("install keys", 100)
        return {"reservation": reservation, "version": keys.version, "keys": len(keys.lines), "applied": True}

    async def close(self, reservation: str, progress: ProgressCallback) -> bool:
        """Stop the server, end every process of the reservation, remove its account and directory, and
        forget it; whether anything of it still ran. Nothing to do for a reservation not recorded."""
        record = self._registry().get(reservation)
        if record is None:
            return False
        await progress("stop access", 0)
        ran = await self._end(reservation, record)
        await progress("remove account", 50)
        if record.made:
            await account_remove(record.user)
        directory = self._directory(reservation)
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DriverError(f"could not remove the reservation's files: {exc.strerror or exc}") from exc
        registry = self._registry()
        registry.pop(reservation, None)
        self._save(registry)
        await progress("remove account", 100)
        return ran

    async def resume(self) -> None:
        """Start again, all at once, the server of every access that was opened (it has a host key)
        and whose server does not run now: on its recorded port, from the configuration of its first
        start (host key, keys file, sessions' environment), so the connect command and host key the
        console shows stay right. One that cannot come back is left down, with a warning."""
        await asyncio.gather(
            *(
                self._resume(reservation, record, record.port)
                for reservation, record in self._registry().items()
                if record.host_key is not None and record.port is not None and not self._running(reservation, record)
            )
        )

    async def _resume(self, reservation: str, record: AccessRecord, port: int) -> None:
        why_not = port_unavailable(self._listen, port)
        if why_not is not None:
            # Another port would do, but the console cannot be told of it yet: the tenant would be sent
            # to the program that holds this one. Left down until its port is free and the agent restarts.
            logger.warning(
                "the SSH server of reservation %s cannot start again: its port %s on %s is not free (%s)",
                reservation,
                port,
                self._listen,
                why_not,
            )
            return
        directory = self._directory(reservation)
        try:
            process = await server_restart(record.server, directory, reservation)
        except DriverError as exc:
            logger.warning("the SSH server of reservation %s cannot start again: %s", reservation, exc)
            return
        self._processes[reservation] = process
        self._save({**self._registry(), reservation: replace(record, pid=process.pid)})
        try:
            await server_ready(process, listen=self._listen, port=port, directory=directory)
        except DriverError as exc:
            with contextlib.suppress(ProcessLookupError):  # hung: a server that lets no one in is not kept
                process.kill()
            await process.wait()
            logger.warning("the SSH server of reservation %s did not start again: %s", reservation, exc)
            return
        logger.info("the SSH server of reservation %s listens again on port %s", reservation, port)

    async def teardown(self) -> AsyncIterator[str]:
        """Release every access (``close``); a line for each, saying what it was."""
        for reservation, record in self._registry().items():
            ran = await self.close(reservation, no_progress)
            what = [f"the account {record.user} removed" if record.made else f"as {record.user}"]
            what += [] if record.port is None else [f"port {record.port}"]
            what += ["what still ran ended"] if ran else []
            yield f"released the SSH access of reservation {reservation} ({', '.join(what)})"

    async def stop_servers(self) -> None:
        """End every reservation's server and sessions now, keeping accounts and records: for a host
        whose processes must not outlive its agent (a simulated one)."""
        for reservation, record in self._registry().items():
            await self._end(reservation, record)

    async def _end(self, reservation: str, record: AccessRecord) -> bool:
        uid = uid_of(record.user) if record.made else None  # never the agent's own user's processes
        ran = await processes_end(reservation, uid, self._directory(reservation), self._grace)
        process = self._processes.pop(reservation, None)
        if process is not None:
            await process.wait()
        return ran

    def _running(self, reservation: str, record: AccessRecord) -> bool:
        """Whether the recorded server runs (its pid is one of the reservation's processes: a pid the
        host gave to another program since is not)."""
        return record.pid is not None and record.pid in reservation_processes(
            reservation, None, self._directory(reservation)
        )

    def _port(self) -> int:
        try:
            return free_port(self._listen)
        except OSError as exc:
            raise DriverError(f"the SSH server cannot listen on {self._listen}: {exc.strerror or exc}") from exc

    def _directory(self, reservation: str) -> Path:
        record = self._registry().get(reservation)
        if record is not None and record.directory is not None:
            return Path(record.directory)
        return self._state_dir / "access" / reservation

    def _directories(self, directory: Path, made: bool) -> None:
        """The reservation's directory. For an account the directories down to it (the state directory
        and ``access/``, by default) become 0711, so the account can pass through to its home and its
        keys: the files in them stay 0600, the node secret among them, so it can read none of them."""
        chain = [self._state_dir] if self._access_dir.is_relative_to(self._state_dir) else []
        for path in (*chain, self._access_dir, directory):
            ensure_state_dir(path)
            if made:
                path.chmod(0o711)

    @staticmethod
    def _install(directory: Path, keys: Keys) -> None:
        write_text_atomic(directory / "authorized_keys", keys.authorized_keys(), mode=0o644)

    @staticmethod
    def _stand_in(directory: Path, reservation: str, gpu_lines: Sequence[str]) -> Path:
        """``bin/nvidia-smi``: the reservation's GPUs as ``nvidia-smi -L`` lists them. Root's, outside the
        tenant's home, so the tenant cannot change what it says."""
        tools = directory / "bin"
        tools.mkdir(mode=0o755, exist_ok=True)
        tools.chmod(0o755)
        script = (
            "#!/bin/sh\n"
            f"# A stand-in for nvidia-smi on a simulated node: the GPUs of reservation {reservation}.\n"
            "cat <<'GPUS'\n" + "".join(f"{line}\n" for line in gpu_lines) + "GPUS\n"
        )
        write_text_atomic(tools / "nvidia-smi", script, mode=0o755)
        return tools

    def _registry(self) -> dict[str, AccessRecord]:
        recorded = read_json(self._state_dir / REGISTRY) or {}
        return {
            reservation: AccessRecord(**{**entry, "gpus": tuple(entry["gpus"])})
            for reservation, entry in recorded.items()
        }

    def _save(self, registry: dict[str, AccessRecord]) -> None:
        ensure_state_dir(self._state_dir)
        write_json_atomic(
            self._state_dir / REGISTRY,
            {reservation: {**asdict(record), "gpus": list(record.gpus)} for reservation, record in registry.items()},
        )


def reachable_by_accounts(directory: Path) -> bool:
    """Whether accounts could be made under ``directory`` (see _check_reachable)."""
    try:
        _check_reachable(directory)
    except DriverError:
        return False
    return True


def _check_reachable(directory: Path) -> None:
    """An account reaches its home and its keys through the state directory's parents, and sshd trusts
    its keys file only when no one but root (or the account) can change the directories above it: each
    must be root's, writable by root only, and open to all to pass through."""
    for path in (directory, *directory.parents):
        mode = path.stat()
        if mode.st_uid != 0 or mode.st_mode & 0o022 or not mode.st_mode & 0o001:
            raise DriverError(
                f"accounts cannot be made under this node's state directory: {path} must be root's, writable "
                f"by root only and open to all to pass through (it is uid {mode.st_uid}'s, mode "
                f"{mode.st_mode & 0o7777:o})"
            )


def _profile(account: Account, tools: Path) -> None:
    """The account's ``.profile``, unless it has one: written once, as the account's own, so a tenant may
    change it; never through a link the tenant put there."""
    try:
        fd = os.open(account.home / ".profile", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as profile:
        os.fchown(profile.fileno(), account.uid, account.gid)
        profile.write(PROFILE.format(tools=tools))
