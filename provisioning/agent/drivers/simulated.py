"""A simulated host driver: provisioning walks the steps a real bare-metal provisioner takes, with their
relative durations (a few seconds in all at speed 1), so the console's progress bars and lifecycles are
exercised as in production. ``speed`` divides every duration (tests and load runs use a large one).
Failures can be injected at random (``fail_rate``) or on a named step (``fail_step``); they hit
provisioning only, since that is where real failures strand a reservation. It remembers which GPUs each
provisioned reservation holds (in memory: a restarted simulated host holds nothing), so the simulated
backend runs only those under load."""

import asyncio
import random
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

Steps = tuple[tuple[str, float], ...]
PROVISION_STEPS: Steps = (
    ("wipe disks", 1.0),
    ("flash image", 1.5),
    ("configure network", 0.5),
    ("start runtime", 1.0),
)
RELEASE_STEPS: Steps = (("stop runtime", 0.5), ("wipe disks", 1.0))


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

    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        reservation = reservation_of(params)
        gpus = gpus_of(params, gpu_count=self._gpu_count)
        vendor = gpu_vendor_of(params)
        ensure_free(reservation=reservation, gpus=gpus, holdings=self._held)
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
        await self._walk(RELEASE_STEPS, progress, failing=None)
        gpus = self._held.pop(reservation, None)
        return {"reservation": reservation, "was_provisioned": gpus is not None, "gpus": list(gpus or ())}

    def holdings(self) -> dict[str, Gpus]:
        return dict(self._held)

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
