"""Real GPUs through NVML (nvidia-ml-py, module ``pynvml``), imported only when this backend starts so the
agent runs on hosts without it.

Costs measured on an H100 (MEASURED.md) shape what is read when: utilization, power, temperature and SM
clock cost ~2 µs and memory ~8 µs, so they are read on every sample; the total-energy counter costs
~4 ms and is re-read at most once per energy interval. Readings the card refuses (``NotSupported``, such
as fan speed on an H100, or ``NoPermission``) are None; any other NVML error is raised."""

import functools
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from provisioning.agent.backends.base import (
    ENERGY_INTERVAL_S,
    BackendUnavailable,
    EnergyThrottle,
    GpuBackend,
    GpuHealth,
    GpuInfo,
    GpuReading,
    Inventory,
)

T = TypeVar("T")
MIB = 1024 * 1024
MAX_EVENTS_PER_DRAIN = 1000  # bounds one health check however many XIDs are queued


@functools.cache
def _pynvml() -> ModuleType:
    try:
        import pynvml  # lazy on purpose: hosts without nvidia-ml-py run the simulated backend
    except ImportError as exc:
        raise BackendUnavailable(f"NVML is not available on this host: nvidia-ml-py is not installed ({exc})")
    return pynvml


def _refusals(nvml: ModuleType) -> tuple[type[Exception], ...]:
    """Errors that mean "this card or this process may not have that reading", not "something broke"."""
    return (nvml.NVMLError_NotSupported, nvml.NVMLError_NoPermission)


def read_optional(call: Callable[..., T], *args: Any) -> T | None:
    """``call(*args)``, or None when the card refuses that reading."""
    try:
        return call(*args)
    except _refusals(_pynvml()):
        return None


def measure_call_costs(handle: Any, calls: int) -> dict[str, float | None]:
    """Mean microseconds per call of each reading a sample makes, on one GPU (None: refused)."""
    nvml = _pynvml()
    readings: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "utilization": (nvml.nvmlDeviceGetUtilizationRates, (handle,)),
        "memory": (nvml.nvmlDeviceGetMemoryInfo, (handle,)),
        "power": (nvml.nvmlDeviceGetPowerUsage, (handle,)),
        "temperature": (nvml.nvmlDeviceGetTemperature, (handle, nvml.NVML_TEMPERATURE_GPU)),
        "clock_sm": (nvml.nvmlDeviceGetClockInfo, (handle, nvml.NVML_CLOCK_SM)),
        "energy": (nvml.nvmlDeviceGetTotalEnergyConsumption, (handle,)),
    }
    return {name: _mean_call_us(call, args, calls) for name, (call, args) in readings.items()}


def _mean_call_us(call: Callable[..., Any], args: tuple[Any, ...], calls: int) -> float | None:
    if read_optional(call, *args) is None:
        return None
    started = time.perf_counter()
    for _ in range(calls):
        call(*args)
    return (time.perf_counter() - started) / calls * 1e6


class _XidWatch:
    """Counts critical XID errors per GPU since the agent started. NVML keeps no XID counter; it delivers
    XIDs as events to an event set, which is drained (without waiting) on each health check."""

    def __init__(self, nvml: ModuleType, handles: list[Any]) -> None:
        self._nvml = nvml
        self._counts: dict[int, int] = {}
        self._events = read_optional(nvml.nvmlEventSetCreate)
        if self._events is None:
            return
        for index, handle in enumerate(handles):
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
            except _refusals(nvml):
                continue
            self._counts[index] = 0

    def counts(self) -> dict[int, int]:
        """XIDs per GPU index; a GPU missing from the result cannot report XIDs."""
        if self._events is None:
            return {}
        for _ in range(MAX_EVENTS_PER_DRAIN):
            try:
                event = self._nvml.nvmlEventSetWait_v2(self._events, 0)
            except self._nvml.NVMLError_Timeout:
                break
            index = self._nvml.nvmlDeviceGetIndex(event.device)
            if index in self._counts:
                self._counts[index] += 1
        return dict(self._counts)

    def close(self) -> None:
        if self._events is not None:
            self._nvml.nvmlEventSetFree(self._events)
            self._events = None


class NvmlBackend(GpuBackend):
    name = "nvml"

    def __init__(
        self, *, energy_interval_s: float = ENERGY_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        nvml = self._nvml = _pynvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise BackendUnavailable(f"NVML is not available on this host: {exc}") from exc
        try:
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            if not self._handles:
                raise BackendUnavailable("NVML is available but sees no GPU on this host")
            self._inventory = self._read_inventory()
            self._xids = _XidWatch(nvml, self._handles)
        except BaseException:
            nvml.nvmlShutdown()
            raise
        self._energy = EnergyThrottle(energy_interval_s, clock)

    def _read_inventory(self) -> Inventory:
        nvml = self._nvml
        gpus = []
        for index, handle in enumerate(self._handles):
            limit_mw = read_optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=nvml.nvmlDeviceGetUUID(handle),
                    name=nvml.nvmlDeviceGetName(handle),
                    memory_mib=nvml.nvmlDeviceGetMemoryInfo(handle).total // MIB,
                    power_limit_w=None if limit_mw is None else limit_mw // 1000,
                )
            )
        return Inventory(driver_version=nvml.nvmlSystemGetDriverVersion(), gpus=gpus)

    def inventory(self) -> Inventory:
        return self._inventory

    def sample(self) -> list[GpuReading]:
        return [self._reading(index, handle) for index, handle in enumerate(self._handles)]

    def _reading(self, index: int, handle: Any) -> GpuReading:
        nvml = self._nvml
        utilization = read_optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = read_optional(nvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = read_optional(nvml.nvmlDeviceGetPowerUsage, handle)
        return GpuReading(
            index=index,
            uuid=self._inventory.gpus[index].uuid,
            gpu_util=None if utilization is None else utilization.gpu,
            mem_util=None if utilization is None else utilization.memory,
            mem_used_mib=None if memory is None else memory.used // MIB,
            mem_total_mib=None if memory is None else memory.total // MIB,
            power_w=None if power_mw is None else power_mw / 1000,
            temp_c=read_optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            sm_mhz=read_optional(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
            energy_mj=self._energy.read(index, lambda: read_optional(nvml.nvmlDeviceGetTotalEnergyConsumption, handle)),
        )

    def health(self) -> list[GpuHealth]:
        nvml = self._nvml
        xids = self._xids.counts()
        return [
            GpuHealth(
                index=index,
                uuid=self._inventory.gpus[index].uuid,
                ecc_uncorrected=read_optional(
                    nvml.nvmlDeviceGetTotalEccErrors,
                    handle,
                    nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                    nvml.NVML_VOLATILE_ECC,
                ),
                xid_count=xids.get(index),
            )
            for index, handle in enumerate(self._handles)
        ]

    def call_costs(self, calls: int) -> dict[str, float | None]:
        return measure_call_costs(self._handles[0], calls)

    def close(self) -> None:
        self._xids.close()
        self._nvml.nvmlShutdown()
