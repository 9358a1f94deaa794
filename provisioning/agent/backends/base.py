"""What every GPU backend offers the agent: the inventory reported in ``hello``, cheap periodic readings,
health for ``health_check``, and what each reading costs. Readings a card does not offer are None,
never an error: one missing sensor must not silence the others."""

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import ClassVar

ENERGY_INTERVAL_S = 10.0


class BackendUnavailable(Exception):
    """The backend cannot run on this host (no GPU, no driver); the message says why."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_mib: int
    power_limit_w: int | None


@dataclass(frozen=True)
class Inventory:
    driver_version: str
    gpus: list[GpuInfo]


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    gpu_util: int | None
    mem_util: int | None
    mem_used_mib: int | None
    mem_total_mib: int | None
    power_w: float | None
    temp_c: int | None
    sm_mhz: int | None
    energy_mj: int | None  # total since the driver loaded; re-read at most every energy interval


@dataclass(frozen=True)
class GpuHealth:
    index: int
    uuid: str
    ecc_uncorrected: int | None  # volatile (since the last driver load) uncorrected ECC errors
    xid_count: int | None  # critical XID errors seen since the agent started


class GpuBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def inventory(self) -> Inventory: ...

    @abstractmethod
    def sample(self) -> list[GpuReading]:
        """One reading per GPU, cheap enough to take every telemetry tick."""

    @abstractmethod
    def health(self) -> list[GpuHealth]: ...

    @abstractmethod
    def call_costs(self, calls: int) -> dict[str, float | None]:
        """Mean microseconds per call of each reading ``sample`` makes (None: not offered)."""

    def set_load(self, busy: Collection[int]) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """The GPUs (indices) tenants' workloads run on from now; the others are idle. Said after every
        provision and release, with every reservation the node still holds. Real GPUs see the real
        workload, so only a simulated backend has anything to do."""

    def close(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Release what the backend holds (NVML handles, event sets)."""


class EnergyThrottle:
    """Reads each GPU's total-energy counter at most once per interval and reuses the last value in
    between: on an H100 one read costs ~4 ms, 2,000 times a utilization read (MEASURED.md), so reading
    it every tick on eight GPUs would cost more than all other readings together."""

    def __init__(self, interval_s: float = ENERGY_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: dict[int, tuple[float, int | None]] = {}

    def read(self, index: int, fetch: Callable[[], int | None]) -> int | None:
        now = self._clock()
        last = self._last.get(index)
        if last is not None and now - last[0] < self._interval:
            return last[1]
        value = fetch()
        self._last[index] = (now, value)
        return value
