"""Runs a tenant's workload (``params.command``, a list of arguments) as a local process.

The workload gets a clean environment (none of the agent's variables, which may hold secrets) in which
only its reservation's GPUs (``params.gpus``) are visible, through its vendor's variables
(``drivers.visibility``); its own working directory under the state directory (output in
``output.log``) and its own session, hence its own process group: ``release`` stops the whole group,
SIGTERM first and SIGKILL after a grace period, so whatever the workload forked goes with it, and
nothing of another reservation's workload on the same node. Process groups and their GPUs are recorded
in ``workloads.json`` so an agent restarted in between (which leaves workloads running: an agent upgrade
must not kill tenants) can still release them and knows which GPUs are taken. A recorded group whose
processes have all exited counts as released. Process groups are found through /proc (Linux, like the
GPU hosts).
"""

import asyncio
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.agent.drivers.base import (
    DriverError,
    Gpus,
    HostDriver,
    Params,
    ProgressCallback,
    ensure_free,
    gpu_vendor_of,
    gpus_of,
    reservation_of,
)
from provisioning.agent.drivers.visibility import visibility_environment
from provisioning.agent.state import ensure_state_dir, read_json, write_json_atomic

REGISTRY = "workloads.json"
WORKLOAD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GRACE_S = 10.0
KILL_WAIT_S = 5.0
POLL_S = 0.05
PROC = Path("/proc")
STEP = "start workload"


@dataclass(frozen=True)
class Workload:
    group: int  # the leader's pid, which is the process group's id
    gpus: Gpus


class ProcessDriver(HostDriver):
    name = "process"

    def __init__(self, *, state_dir: Path, gpu_count: int, grace_s: float = GRACE_S) -> None:
        self._state_dir = state_dir
        self._gpu_count = gpu_count
        self._grace = grace_s
        self._children: dict[str, asyncio.subprocess.Process] = {}  # reaped by asyncio's child watcher

    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        reservation = _reservation_id(params)
        command = _command_of(params)
        gpus = gpus_of(params, gpu_count=self._gpu_count)
        visibility = visibility_environment(gpu_vendor_of(params), gpus)
        registry = self._registry()
        running = registry.get(reservation)
        if running is not None and _group_alive(running.group):
            return {
                "reservation": reservation,
                "pid": running.group,
                "gpus": list(running.gpus),
                "already_running": True,
            }
        ensure_free(reservation=reservation, gpus=gpus, holdings=self._live(registry))
        await progress(STEP, 0)
        process = await self._start(reservation, command, visibility)
        self._children[reservation] = process
        self._save({**registry, reservation: Workload(group=process.pid, gpus=gpus)})
        await progress(STEP, 100)
        return {"reservation": reservation, "pid": process.pid, "gpus": list(gpus), "command": command}

    async def release(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        reservation = _reservation_id(params)
        registry = self._registry()
        workload = registry.pop(reservation, None)
        if workload is None:
            return {"reservation": reservation, "stopped": False, "gpus": []}
        await progress("stop workload", 0)
        stopped = await _stop_group(workload.group, self._grace)
        self._save(registry)
        process = self._children.pop(reservation, None)
        if process is not None:
            await process.wait()
        await progress("stop workload", 100)
        return {"reservation": reservation, "stopped": stopped, "gpus": list(workload.gpus)}

    def holdings(self) -> dict[str, Gpus]:
        return self._live(self._registry())

    @staticmethod
    def _live(registry: dict[str, Workload]) -> dict[str, Gpus]:
        """A workload whose processes have all exited holds no GPU any more, released or not."""
        return {reservation: held.gpus for reservation, held in registry.items() if _group_alive(held.group)}

    async def _start(
        self, reservation: str, command: list[str], visibility: dict[str, str]
    ) -> asyncio.subprocess.Process:
        workdir = ensure_state_dir(self._state_dir / "workloads" / reservation)
        environment = {"PATH": WORKLOAD_PATH, "HOME": str(workdir), "LANG": "C.UTF-8", **visibility}
        environment["NEOCLOUD_RESERVATION"] = reservation
        with open(workdir / "output.log", "ab") as output:
            try:
                return await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=workdir,
                    env=environment,
                    start_new_session=True,
                )
            except OSError as exc:
                raise DriverError(f"cannot start the workload {command[0]!r}: {exc.strerror or exc}") from exc

    def _registry(self) -> dict[str, Workload]:
        """The recorded workloads. One recorded by an agent before GPU slices is a bare group id: its
        reservation held the whole node."""
        recorded = read_json(self._state_dir / REGISTRY) or {}
        whole_node = tuple(range(self._gpu_count))
        return {
            reservation: Workload(group=entry, gpus=whole_node)
            if isinstance(entry, int)
            else Workload(group=entry["group"], gpus=tuple(entry["gpus"]))
            for reservation, entry in recorded.items()
        }

    def _save(self, registry: dict[str, Workload]) -> None:
        ensure_state_dir(self._state_dir)
        recorded = {
            reservation: {"group": workload.group, "gpus": list(workload.gpus)}
            for reservation, workload in registry.items()
        }
        write_json_atomic(self._state_dir / REGISTRY, recorded)


def _reservation_id(params: Params) -> str:
    """The reservation names a directory, so it must be a UUID and nothing that could climb out of it."""
    reservation = reservation_of(params)
    try:
        return str(uuid.UUID(reservation))
    except ValueError:
        raise DriverError(f"params.reservation is not a UUID: {reservation!r}") from None


def _command_of(params: Params) -> list[str]:
    command = params.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(arg, str) for arg in command):
        raise DriverError("params.command must be a non-empty list of strings")
    return command


def _signal_group(group: int, signum: int) -> bool:
    """Signal every process of the group; False when none is left."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


def group_members(group: int) -> list[int]:
    """Pids of the group's processes that still run. Not ``killpg(group, 0)``: that counts zombies too,
    and zombies linger wherever PID 1 does not reap orphans (many containers), yet they are dead."""
    if not PROC.is_dir():  # not Linux: fall back to the signal probe, zombies included
        return [group] if _signal_group(group, 0) else []
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        state, _parent, process_group = stat[stat.rindex(")") + 2 :].split()[:3]  # the name may hold ") "
        if int(process_group) == group and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _group_alive(group: int) -> bool:
    return bool(group_members(group))


async def _wait_gone(group: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _group_alive(group):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def _stop_group(group: int, grace: float) -> bool:
    """SIGTERM to the whole group, SIGKILL to what is left after ``grace``; False if it had already gone."""
    if not _group_alive(group):
        return False
    _signal_group(group, signal.SIGTERM)
    if await _wait_gone(group, grace):
        return True
    _signal_group(group, signal.SIGKILL)
    if not await _wait_gone(group, KILL_WAIT_S):
        raise DriverError(f"the workload's process group {group} survived SIGKILL")
    return True
