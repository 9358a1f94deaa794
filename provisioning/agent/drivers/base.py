"""What a host driver does for the agent: prepare the host for a tenant (``provision``) and tear that down
(``release``, idempotent), reporting progress through a callback and returning a detail object for the
command's ``result``. A refusal or failure is a DriverError whose message the console shows as the
result's ``error``.

A node may hold several reservations at once, each on some of its GPUs (``params.gpus``); a driver
knows how many GPUs its host has (``gpu_count``, from the backend's inventory, which numbers them from
0) so it refuses indices the host does not have, and says which GPUs each live reservation holds
(``holdings``) so the agent can tell the backend which GPUs are busy.

A driver that runs servers (the process driver, with ``params.serve``) also says how each of them does
(``check_workloads``), which the agent polls and reports to the console as ``workload`` frames; the
agent calls ``start`` before it first connects and ``shutdown`` as it stops. A driver that sets up SSH
access to a reservation (``params.access``, drivers.access) replaces its keys on the ``access`` command
(``update_access``)."""

import asyncio
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from provisioning.agent.drivers.visibility import DEFAULT_VENDOR, VISIBILITY

ProgressCallback = Callable[[str, int], Awaitable[None]]
Params = Mapping[str, Any]
Gpus = tuple[int, ...]


class DriverError(Exception):
    """The command failed; the message is what the console records as the result's error."""


WorkloadState = Literal["healthy", "unhealthy", "exited"]


@dataclass(frozen=True)
class WorkloadHealth:
    """How a reservation's server does: ``healthy`` (its health route answers ready), ``unhealthy``
    (it runs but has stopped answering so), ``exited`` (its processes are gone), with a sentence."""

    state: WorkloadState
    detail: str = ""


class HostDriver(ABC):
    name: ClassVar[str]

    @abstractmethod
    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]: ...

    @abstractmethod
    async def release(self, params: Params, progress: ProgressCallback) -> dict[str, Any]: ...

    @abstractmethod
    def holdings(self) -> dict[str, Gpus]:
        """The GPUs of each reservation provisioned here and not released (by reservation id)."""

    def gpus_in_use(self) -> set[int]:
        return {index for gpus in self.holdings().values() for index in gpus}

    async def update_access(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        """The ``access`` command: replace the authorized keys of a reservation's SSH access."""
        raise DriverError("this node's driver sets up no access")

    async def check_workloads(self) -> dict[str, WorkloadHealth]:
        """The health of each server provisioned here and not released, by reservation id; one being
        started or stopped right now is left out (it is neither up nor down yet). A driver that runs no
        servers has none."""
        return {}

    async def start(self) -> None:
        """The agent is starting (holding the state directory), before it connects: a driver starts
        again here what should run and does not (a pretend host's SSH servers, which its ``shutdown``
        stopped; a real host's that died). Nothing by default."""
        return None

    async def shutdown(self) -> None:
        """The agent is stopping. A real host's workloads outlive their agent (an upgrade of the agent
        must not stop tenants): nothing by default. A driver whose host is pretend but whose processes
        are real (the simulated driver's servers) stops them here, so nothing is left running."""
        return None


async def no_progress(step: str, percent: int) -> None:
    """The progress of work nobody follows, such as the teardown of a provisioning that failed."""


def progress_between(progress: ProgressCallback, start: int, end: int) -> ProgressCallback:
    """``progress`` for one part of a command's work, which reports 0 to 100 of its own: as the share
    ``start`` to ``end`` of the whole."""

    async def report(step: str, percent: int) -> None:
        await progress(step, start + round((end - start) * percent / 100))

    return report


def progress_parts(progress: ProgressCallback, count: int) -> list[ProgressCallback]:
    """``progress`` for ``count`` parts of a command's work done one after the other, each reporting 0 to
    100 of its own: each as its equal share of the whole."""
    return [progress_between(progress, 100 * n // count, 100 * (n + 1) // count) for n in range(count)]


def reservation_of(params: Params) -> str:
    reservation = params.get("reservation")
    if not isinstance(reservation, str) or not reservation:
        raise DriverError("params.reservation is missing")
    return reservation


def reservation_uuid_of(params: Params) -> str:
    """The reservation, where it names a directory: a UUID, and nothing that could climb out of it."""
    reservation = reservation_of(params)
    try:
        return str(uuid.UUID(reservation))
    except ValueError:
        raise DriverError(f"params.reservation is not a UUID: {reservation!r}") from None


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0  # True is an int to Python


def gpus_of(params: Params, *, gpu_count: int) -> Gpus:
    """The GPUs the reservation may use, ascending: ``params.gpus``, a non-empty list of distinct indices
    of GPUs this host has. A bare count N (what consoles before GPU slices sent, when a reservation
    held whole nodes; a command queued before an upgrade may still carry one) means GPUs 0..N-1."""
    gpus = params.get("gpus")
    if _is_index(gpus):
        if gpus > gpu_count:
            raise DriverError(f"params.gpus asks for {gpus} GPUs; this node has {gpu_count}")
        gpus = list(range(gpus))
    if not isinstance(gpus, list) or not gpus:
        raise DriverError("params.gpus must be a non-empty list of GPU indices")
    wrong = [value for value in gpus if not _is_index(value)]
    if wrong:
        raise DriverError(f"params.gpus must hold GPU indices (integers from 0), not {wrong[0]!r}")
    if len(set(gpus)) != len(gpus):
        raise DriverError("params.gpus names a GPU more than once")
    missing = sorted(index for index in gpus if index >= gpu_count)
    if missing:
        raise DriverError(
            f"params.gpus names GPU {', '.join(map(str, missing))}, which this node does not have "
            f"(its {gpu_count} GPUs are 0 to {gpu_count - 1})"
        )
    return tuple(sorted(gpus))


def gpu_vendor_of(params: Params) -> str:
    """``params.gpu_vendor``, one the agent can confine a workload for (drivers.visibility); absent
    means NVIDIA."""
    vendor = params.get("gpu_vendor")
    if vendor is None:
        return DEFAULT_VENDOR
    if not isinstance(vendor, str) or vendor not in VISIBILITY:
        raise DriverError(
            f"params.gpu_vendor {vendor!r} is not one the agent can confine a workload to its GPUs for "
            f"(it knows {', '.join(sorted(VISIBILITY))})"
        )
    return vendor


def ensure_free(*, reservation: str, gpus: Sequence[int], holdings: Mapping[str, Gpus]) -> None:
    """Refuse GPUs another live reservation holds: two tenants on one GPU would see each other's memory.
    The console's placement never does that; a release that did not happen (a workload still running)
    would. The other reservation is not named: the error may be shown to this reservation's tenant."""
    held_by_others = {index for other, held in holdings.items() if other != reservation for index in held}
    taken = sorted(held_by_others.intersection(gpus))
    if taken:
        raise DriverError(f"GPU {', '.join(map(str, taken))} of this node is held by another reservation")


async def spawn_logged(
    argv: Sequence[str], *, log: Path, cwd: Path, env: Mapping[str, str], what: str
) -> asyncio.subprocess.Process:
    """Start ``argv`` reading nothing, its output and errors appended to ``log`` (the owner's only), in
    its own session and so its own process group (stopped as one, whatever it forks); DriverError
    naming ``what`` (``the workload``, ``the SSH server``) when it cannot start."""
    with open(log, "ab") as output:
        os.fchmod(output.fileno(), 0o600)
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            raise DriverError(f"cannot start {what} {argv[0]!r}: {exc.strerror or exc}") from exc
