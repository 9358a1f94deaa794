"""GPU backends, chosen by name (like MAAS power drivers): ``nvml`` reads real GPUs through nvidia-ml-py,
``simulated`` replays a real H100 recording for hosts without GPUs (development, demos, load tests)."""

from typing import Any

from provisioning.agent.backends.base import BackendUnavailable, GpuBackend
from provisioning.agent.backends.nvml import NvmlBackend
from provisioning.agent.backends.simulated import SimulatedBackend

BACKENDS: dict[str, type[GpuBackend]] = {backend.name: backend for backend in (NvmlBackend, SimulatedBackend)}

__all__ = ["BACKENDS", "BackendUnavailable", "GpuBackend", "get_backend"]


def get_backend(name: str, **options: Any) -> GpuBackend:
    """A started backend; raises BackendUnavailable when it cannot run here, ValueError for a bad name."""
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown GPU backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}") from None
    return backend(**options)
