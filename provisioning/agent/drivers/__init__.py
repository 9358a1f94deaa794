"""Host drivers, chosen by name (like MAAS power drivers): ``simulated`` walks timed provisioning steps
with optional failure injection; ``process`` runs the tenant's workload as a local process group."""

from typing import Any

from provisioning.agent.drivers.base import DriverError, HostDriver
from provisioning.agent.drivers.process import ProcessDriver
from provisioning.agent.drivers.simulated import SimulatedDriver

DRIVERS: dict[str, type[HostDriver]] = {driver.name: driver for driver in (ProcessDriver, SimulatedDriver)}

__all__ = ["DRIVERS", "DriverError", "HostDriver", "get_driver"]


def get_driver(name: str, **options: Any) -> HostDriver:
    try:
        driver = DRIVERS[name]
    except KeyError:
        raise ValueError(f"unknown host driver {name!r}; choose one of {', '.join(sorted(DRIVERS))}") from None
    return driver(**options)
