"""Whom a reservation's tenant logs in as, and ending everything the tenant ran.

Account mode (the agent runs as root, as on a GPU host): each reservation gets a system account of its
own, ``nc-`` and the first 12 hex digits of its UUID, with its own group, /bin/bash and a home of its own
(0700) under the agent's state directory. Its password is "*": no password opens it, yet it is not
locked ("!", what ``useradd --system`` sets), which sshd without PAM would refuse. Releasing the access
ends every process of the account and removes it.

Own-user mode (the agent runs as a developer's user: the demo on a laptop): sshd running as a user can
log only that user in, so the tenant logs in as the agent's own user, at its home, with all its rights.
For the demo only. Releasing the access ends only what carries the reservation's marker.

The marker: every session gets ``NEOCLOUD_RESERVATION=<id>`` in its environment (the server sets it, and
the server itself runs with it). A session's processes run in sessions of their own (setsid), not in the
server's process group, so they are found through /proc: by account, by marker, and by the reservation's
directory on their command line (sshd writes its process title over its environment, so its own marker
cannot be read back; its command line names its configuration file, in that directory)."""

import asyncio
import hashlib
import os
import pwd
import signal
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.agent.drivers.base import DriverError

PROC = Path("/proc")
SHELL = "/bin/bash"
MARKER = "NEOCLOUD_RESERVATION"
SESSION_PATH = "/usr/local/bin:/usr/bin:/bin"
TOOLS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # useradd and userdel are in sbin
POLL_S = 0.05
KILL_WAIT_S = 5.0
USER_EXISTS = 9  # useradd's status for a name already taken
NO_SUCH_USER = 6  # userdel's


@dataclass(frozen=True)
class Account:
    user: str
    uid: int
    gid: int
    home: Path
    made: bool  # by the agent, for this reservation (account mode): its release removes it

    def identity(self) -> dict[str, Any]:
        """What ``asyncio.create_subprocess_exec`` needs to run a program as the account (and in none of
        root's groups)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []} if self.made else {}


def account_environment(account: Account, reservation: str, visibility: dict[str, str]) -> dict[str, str]:
    """What a program the agent runs as the account sees, as a login would set it: its own names and
    home, the reservation's GPUs and marker, and nothing of the agent's."""
    return {
        "PATH": SESSION_PATH,
        "HOME": str(account.home),
        "USER": account.user,
        "LOGNAME": account.user,
        "SHELL": SHELL,
        "LANG": "C.UTF-8",
        **visibility,
        MARKER: reservation,
    }


def accounts_made_here() -> bool:
    """Whether the agent can make accounts: it runs as root."""
    return os.geteuid() == 0


def account_name(reservation: str) -> str:
    return "nc-" + uuid.UUID(reservation).hex[:12]


def own_account() -> Account:
    entry = pwd.getpwuid(os.getuid())
    return Account(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=Path(entry.pw_dir), made=False)


def account_choose(reservation: str, home: Path) -> str:
    """The name of the reservation's account here: ``account_name``, unless another home has it (several
    simulated nodes of one fleet share a machine, and a reservation of several of them gets an account on
    each), then one named after this home too."""
    base = account_name(reservation)
    taken = _home_of(base)
    if taken is None or taken == str(home):
        return base
    return base[:11] + hashlib.sha256(str(home).encode()).hexdigest()[:4]


async def account_make(reservation: str, home: Path, user: str) -> Account:
    """The reservation's account ``user`` (account_choose), made with its home; one made for it before (a
    provisioning cut off by an agent restart) is taken again, but never an account that is not this
    reservation's."""
    status, output = await _tool(
        ["useradd", "--system", "--user-group", "--shell", SHELL, "--home-dir", str(home), "--no-create-home"]
        + ["--password", "*", user]
    )
    if status == USER_EXISTS and _home_of(user) != str(home):
        raise DriverError(f"the account {user} already exists on this node and is not this reservation's")
    if status not in (0, USER_EXISTS):
        raise DriverError(f"could not make the account {user}: {output}")
    entry = pwd.getpwnam(user)
    home.mkdir(mode=0o700, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    home.chmod(0o700)
    return Account(user=user, uid=entry.pw_uid, gid=entry.pw_gid, home=home, made=True)


async def account_remove(user: str) -> None:
    """Remove the account (its processes must have ended: userdel refuses an account in use)."""
    status, output = await _tool(["userdel", user])
    if status not in (0, NO_SUCH_USER):
        raise DriverError(f"could not remove the account {user}: {output}")


def uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _home_of(user: str) -> str | None:
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return None


# useradd's and userdel's statuses when they could not update /etc/passwd or /etc/group: another one
# held their lock. The simulated nodes of a fleet share a machine and release together; other agents or
# an operator's tools may hold it too. Retried a few times, and this process's own are taken in turn.
FILE_BUSY = (1, 10)
BUSY_RETRIES = 8
BUSY_WAIT_S = 0.1
_tools_locks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = weakref.WeakKeyDictionary()


_naming_locks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = weakref.WeakKeyDictionary()


def accounts_naming() -> asyncio.Lock:
    """Held while an account is named (account_choose) and made, one at a time in this process."""
    return _naming_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


async def _tool(argv: list[str]) -> tuple[int, str]:
    """Run an account tool, one at a time in this process, again while the account files are busy; its
    status and the last line it wrote."""
    lock = _tools_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())  # a lock serves one loop
    async with lock:
        for attempt in range(BUSY_RETRIES):
            status, last = await _tool_once(argv)
            if status not in FILE_BUSY:
                break
            await asyncio.sleep(BUSY_WAIT_S * (attempt + 1))
    return status, last


async def _tool_once(argv: list[str]) -> tuple[int, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": TOOLS_PATH, "LANG": "C"},  # wherever the agent was started from
        )
    except OSError as exc:
        raise DriverError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    output, _ = await process.communicate()
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return process.returncode or 0, lines[-1] if lines else f"{argv[0]} exited with status {process.returncode}"


def reservation_processes(reservation: str, uid: int | None, directory: Path) -> list[int]:
    """Pids of the processes that still run as the account ``uid`` (when given), carry the reservation's
    marker, or were started from its ``directory`` (its server: sshd writes its title over its
    environment, so its marker cannot be read); never the agent itself. Zombies are dead already and
    left out."""
    marker = f"{MARKER}={reservation}".encode()
    started_from = str(directory).encode()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "status").read_text()
            if _state(status) in ("Z", "X"):
                continue
            if (
                (uid is not None and uid in _uids(status))
                or started_from in (entry / "cmdline").read_bytes()
                or marker in (entry / "environ").read_bytes().split(b"\0")
            ):
                found.append(int(entry.name))
        except (OSError, ValueError):  # exited while we looked, or another user's (own-user mode)
            continue
    return found


def _field(status: str, name: str) -> str:
    for line in status.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"no {name} in /proc status")


def _state(status: str) -> str:
    return _field(status, "State")[:1]


def _uids(status: str) -> set[int]:
    """Real, effective, saved and file system uid: a setuid program the tenant ran is the tenant's too."""
    return {int(value) for value in _field(status, "Uid").split()}


async def processes_end(reservation: str, uid: int | None, directory: Path, grace: float) -> bool:
    """End every process of the reservation (``reservation_processes``): SIGTERM, then SIGKILL to what
    is left after ``grace`` (an interactive bash ignores SIGTERM). Looked for again on each round, since
    what runs may fork meanwhile. False when nothing ran."""
    pids = reservation_processes(reservation, uid, directory)
    if not pids:
        return False
    _signal(pids, signal.SIGTERM)
    if await _ended(reservation, uid, directory, grace, signal.SIGTERM):
        return True
    if not await _ended(reservation, uid, directory, KILL_WAIT_S, signal.SIGKILL):
        left = reservation_processes(reservation, uid, directory)
        raise DriverError(f"processes of the reservation survived SIGKILL: {', '.join(map(str, left))}")
    return True


async def _ended(reservation: str, uid: int | None, directory: Path, timeout: float, signum: int) -> bool:
    """Wait up to ``timeout`` for the reservation's processes to be gone, sending ``signum`` to any
    that appear meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pids = reservation_processes(reservation, uid, directory)
        if not pids:
            return True
        if loop.time() >= deadline:
            return False
        _signal(pids, signum)
        await asyncio.sleep(POLL_S)


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            continue
