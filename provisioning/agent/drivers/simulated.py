"""A simulated host driver: provisioning walks the steps a real bare-metal provisioner takes, with their
relative durations (a few seconds in all at speed 1), so the console's progress bars and lifecycles are
exercised as in production. ``speed`` divides every duration (tests and load runs use a large one).
Failures can be injected at random (``fail_rate``) or on a named step (``fail_step``); they hit
provisioning only, since that is where real failures strand a reservation. It remembers which GPUs each
provisioned reservation holds (in memory: a restarted simulated host holds nothing), so the simulated
backend runs only those under load.

With a state directory, a workload that is a server (``params.serve``: a replica of an inference
endpoint) is not simulated: it is handed to the process driver, which runs it as a real process on a
port of the loopback (``drivers.process``: the same code as on a real host, with its records under the
state directory), so the demo's endpoints can really be called while everything else about the host is
pretend. Its release stops the server. A pretend host's processes do not outlive its agent: ``shutdown``
stops them, keeping their records, so an agent started again reports them exited and the console
replaces them.

Access (``params.access``, drivers.access) is real too, as on a real host: after the pretend steps (the
image's own in place of "flash image"), the reservation gets its account, keys and SSH server, whose
sessions see only its GPUs: their variables, and a stand-in ``nvidia-smi`` that lists them as the real
one would, with the names and UUIDs of the backend's inventory (what the console's telemetry shows).
Its servers stop with the agent, as replicas do, and start again with it: on their ports, with their
host keys, so what the console tells the tenant stays right (``SshAccess.resume``)."""

import asyncio
import hashlib
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provisioning.agent.backends.base import GpuInfo
from provisioning.agent.drivers.access import Keys, access_of
from provisioning.agent.drivers.access.manager import reachable_by_accounts
from provisioning.agent.drivers.base import (
    DriverError,
    Gpus,
    HostDriver,
    Params,
    ProgressCallback,
    WorkloadHealth,
    ensure_free,
    gpu_vendor_of,
    gpus_of,
    no_progress,
    progress_between,
    reservation_of,
    reservation_uuid_of,
)
from provisioning.agent.drivers.image import Image, image_of
from provisioning.agent.drivers.process import ProcessDriver
from provisioning.agent.drivers.visibility import visibility_environment

Step = tuple[str, float]
Steps = tuple[Step, ...]
WIPE_DISKS: Step = ("wipe disks", 1.0)
FLASH_IMAGE: Step = ("flash image", 1.5)
CONFIGURE_NETWORK: Step = ("configure network", 0.5)
START_RUNTIME: Step = ("start runtime", 1.0)
PROVISION_STEPS: Steps = (WIPE_DISKS, FLASH_IMAGE, CONFIGURE_NETWORK, START_RUNTIME)
RELEASE_STEPS: Steps = (("stop runtime", 0.5), WIPE_DISKS)
WALK_SHARE = 80  # of a provisioning with access: the pretend steps, then the real access
# How long a server (params.serve) has to exit on SIGTERM before SIGKILL: short, since the agent's own
# stop waits for it (and whoever stops the agent does not wait long).
SERVER_GRACE_S = 5.0
ACCESS_ADDRESS = "127.0.0.1"  # a pretend host's SSH servers are the fleet host's, for the demo on it


class SimulatedDriver(HostDriver):
    name = "simulated"

    def __init__(
        self,
        *,
        gpu_count: int,
        speed: float = 1.0,
        fail_rate: float = 0.0,
        fail_step: str | None = None,
        seed: int | str | None = None,
        state_dir: Path | None = None,
        server_grace_s: float = SERVER_GRACE_S,
        inventory: Sequence[GpuInfo] = (),
        access_listen: str = ACCESS_ADDRESS,
        access_host: str = ACCESS_ADDRESS,
        ssh_server: str = "auto",
    ) -> None:
        """``inventory``: the backend's GPUs, named as the stand-in nvidia-smi names them. The access
        options are the process driver's; access needs a state directory."""
        if speed <= 0:
            raise ValueError("speed must be positive")
        if not 0 <= fail_rate <= 1:
            raise ValueError("fail_rate is a probability, between 0 and 1")
        known = {step for step, _ in PROVISION_STEPS}
        if fail_step is not None and fail_step not in known:
            raise ValueError(f"fail_step must be one of {', '.join(sorted(known))}")
        self._gpu_count = gpu_count
        self._speed = speed
        self._fail_rate = fail_rate
        self._fail_step = fail_step
        self._rng = random.Random(seed)  # noqa: S311 - failure injection, not security
        self._held: dict[str, Gpus] = {}
        self._gpus = {gpu.index: gpu for gpu in inventory}
        self._servers: ProcessDriver | None = None
        if state_dir is not None:
            self._servers = ProcessDriver(
                state_dir=state_dir,
                gpu_count=gpu_count,
                grace_s=server_grace_s,
                access_listen=access_listen,
                access_host=access_host,
                ssh_server=ssh_server,
                access_dir=simulated_access_dir(state_dir),
            )

    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        reservation = reservation_of(params)
        gpus = gpus_of(params, gpu_count=self._gpu_count)
        vendor = gpu_vendor_of(params)
        if self._servers is not None and params.get("serve") is not None:
            # Against the simulated workloads here; the process driver checks against its servers.
            ensure_free(reservation=reservation, gpus=gpus, holdings=self._held)
            return await self._servers.provision(params, progress)
        image, keys = image_of(params), access_of(params)
        steps = _steps(image, keys)
        if keys is not None:
            return await self._provision_access(reservation_uuid_of(params), gpus, vendor, image, keys, steps, progress)
        ensure_free(reservation=reservation, gpus=gpus, holdings=self.holdings())
        await self._walk(steps, progress, self._failing_step(steps))
        self._held[reservation] = gpus
        return _detail(reservation, gpus, vendor, image, steps)

    async def _provision_access(
        self,
        reservation: str,
        gpus: Gpus,
        vendor: str,
        image: Image | None,
        keys: Keys,
        steps: Steps,
        progress: ProgressCallback,
    ) -> dict[str, Any]:
        """The pretend steps, then the access for real (the process driver's)."""
        if self._servers is None:
            raise DriverError("this simulated node has no state directory, so it cannot set up SSH access")
        access, detail = self._servers.access, _detail(reservation, gpus, vendor, image, steps)
        live = access.live(reservation)
        if live is not None:
            return {**detail, "access": live, "already_running": True}
        ensure_free(reservation=reservation, gpus=gpus, holdings=self.holdings())
        await self._walk(steps, progress_between(progress, 0, WALK_SHARE), self._failing_step(steps))
        try:
            account = await access.prepare(reservation, gpus)
            detail["access"] = await access.open(
                reservation,
                account,
                keys,
                visibility_environment(vendor, gpus),
                progress_between(progress, WALK_SHARE, 100),
                gpu_lines=[self._gpu_line(index) for index in gpus],
            )
        except Exception:
            await access.close(reservation, no_progress)  # nothing of an access that never opened is left
            raise
        return detail

    def _gpu_line(self, index: int) -> str:
        """What ``nvidia-smi -L`` says of the GPU."""
        gpu = self._gpus.get(index)
        name, uuid = ("Simulated GPU", f"GPU-simulated-{index}") if gpu is None else (gpu.name, gpu.uuid)
        return f"GPU {index}: {name} (UUID: {uuid})"

    async def update_access(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        if self._servers is None:
            return await super().update_access(params, progress)
        return await self._servers.update_access(params, progress)

    async def release(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        """Walks the teardown even for a reservation it does not know: after an agent restart nothing
        is known, and tearing down twice leaves the host as tearing down once does. What is real (a
        server, an access) is released as the process driver releases it."""
        reservation = reservation_of(params)
        if self._servers is not None and (
            self._servers.records(reservation) or self._servers.access.records(reservation)
        ):
            return await self._servers.release(params, progress)
        await self._walk(RELEASE_STEPS, progress, failing=None)
        gpus = self._held.pop(reservation, None)
        return {"reservation": reservation, "was_provisioned": gpus is not None, "gpus": list(gpus or ())}

    def holdings(self) -> dict[str, Gpus]:
        return {**self._held, **(self._servers.holdings() if self._servers is not None else {})}

    async def check_workloads(self) -> dict[str, WorkloadHealth]:
        return {} if self._servers is None else await self._servers.check_workloads()

    async def start(self) -> None:
        if self._servers is not None:
            await self._servers.start()

    async def shutdown(self) -> None:
        if self._servers is not None:
            await self._servers.stop_all()
            await self._servers.access.stop_servers()

    def _failing_step(self, steps: Steps) -> str | None:
        if self._fail_step is not None:
            return self._fail_step
        if self._fail_rate and self._rng.random() < self._fail_rate:
            return self._rng.choice(steps)[0]
        return None

    async def _walk(self, steps: Steps, progress: ProgressCallback, failing: str | None) -> None:
        """Reports each step as it starts with the share of the work done so far, then 100 at the end."""
        total = sum(duration for _, duration in steps)
        done = 0.0
        for step, duration in steps:
            await progress(step, round(100 * done / total))
            await asyncio.sleep(duration / self._speed)
            if step == failing:
                raise DriverError(f"step {step!r} failed (injected failure)")
            done += duration
        await progress(steps[-1][0], 100)


def _detail(reservation: str, gpus: Gpus, vendor: str, image: Image | None, steps: Steps) -> dict[str, Any]:
    detail = {"reservation": reservation, "gpus": list(gpus), "gpu_vendor": vendor, "steps": [s for s, _ in steps]}
    return detail if image is None else {**detail, "image": image.slug}


def _steps(image: Image | None, keys: Keys | None) -> Steps:
    """The pretend steps of a provisioning: the image's own steps in place of "flash image", and none
    for the runtime when the access is set up for real instead."""
    flash = (FLASH_IMAGE,) if image is None else tuple((step.progress_step, step.seconds) for step in image.steps)
    return (WIPE_DISKS, *flash, CONFIGURE_NETWORK, *(() if keys is not None else (START_RUNTIME,)))


PRETEND_ACCESS_ROOT = Path("/run/neocloud-agent")


def simulated_access_dir(state_dir: Path) -> Path | None:
    """Where a simulated node's accesses keep their files: under its state directory (None, the
    default) where accounts can reach them, else -- a root agent whose state directory lies under a
    directory sshd would not trust, as a test's temporary one or a demo cloned into a home does -- a
    directory of its own under /run, named after the state directory so a restarted agent finds it. A
    real host's agent is not moved: its tenants' homes must outlive a reboot, so it refuses instead."""
    if os.geteuid() != 0:
        return None
    existing = state_dir.resolve()
    while not existing.exists():
        existing = existing.parent
    if reachable_by_accounts(existing):
        return None
    return PRETEND_ACCESS_ROOT / f"access-{hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]}"
