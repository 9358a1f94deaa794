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
replaces them."""

import asyncio
import random
from pathlib import Path
from typing import Any

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
    reservation_of,
)
from provisioning.agent.drivers.process import ProcessDriver

Steps = tuple[tuple[str, float], ...]
PROVISION_STEPS: Steps = (
    ("wipe disks", 1.0),
    ("flash image", 1.5),
    ("configure network", 0.5),
    ("start runtime", 1.0),
)
RELEASE_STEPS: Steps = (("stop runtime", 0.5), ("wipe disks", 1.0))
# How long a server (params.serve) has to exit on SIGTERM before SIGKILL: short, since the agent's own
# stop waits for it (and whoever stops the agent does not wait long).
SERVER_GRACE_S = 5.0


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
    ) -> None:
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
        self._servers: ProcessDriver | None = None
        if state_dir is not None:
            self._servers = ProcessDriver(state_dir=state_dir, gpu_count=gpu_count, grace_s=server_grace_s)

    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        reservation = reservation_of(params)
        gpus = gpus_of(params, gpu_count=self._gpu_count)
        vendor = gpu_vendor_of(params)
        if self._servers is not None and params.get("serve") is not None:
            # Against the simulated workloads here; the process driver checks against its servers.
            ensure_free(reservation=reservation, gpus=gpus, holdings=self._held)
            return await self._servers.provision(params, progress)
        ensure_free(reservation=reservation, gpus=gpus, holdings=self.holdings())
        failing = self._failing_step()
        await self._walk(PROVISION_STEPS, progress, failing)
        self._held[reservation] = gpus
        return {
            "reservation": reservation,
            "gpus": list(gpus),
            "gpu_vendor": vendor,
            "steps": [step for step, _ in PROVISION_STEPS],
        }

    async def release(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        """Walks the teardown even for a reservation it does not know: after an agent restart nothing
        is known, and tearing down twice leaves the host as tearing down once does."""
        reservation = reservation_of(params)
        if self._servers is not None and self._servers.records(reservation):
            return await self._servers.release(params, progress)
        await self._walk(RELEASE_STEPS, progress, failing=None)
        gpus = self._held.pop(reservation, None)
        return {"reservation": reservation, "was_provisioned": gpus is not None, "gpus": list(gpus or ())}

    def holdings(self) -> dict[str, Gpus]:
        return {**self._held, **(self._servers.holdings() if self._servers is not None else {})}

    async def check_workloads(self) -> dict[str, WorkloadHealth]:
        return {} if self._servers is None else await self._servers.check_workloads()

    async def shutdown(self) -> None:
        if self._servers is not None:
            await self._servers.stop_all()

    def _failing_step(self) -> str | None:
        if self._fail_step is not None:
            return self._fail_step
        if self._fail_rate and self._rng.random() < self._fail_rate:
            return self._rng.choice(PROVISION_STEPS)[0]
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
