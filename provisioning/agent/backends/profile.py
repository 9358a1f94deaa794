"""Profiles of simulated GPU models, shipped as JSON next to this package (``profiles/<model>.json``) and
derived from real NVML recordings by ``profiles/derive.py``, which documents what each field means."""

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

SEGMENTS = ("idle", "ramp_up", "loaded", "ramp_down")


@dataclass(frozen=True)
class Segment:
    """Recorded readings on a regular grid of ``GpuProfile.dt_s`` seconds."""

    gpu_util: tuple[int, ...]
    mem_util: tuple[int, ...]
    mem_used_mib: tuple[int, ...]
    power_w: tuple[float, ...]
    sm_mhz: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.power_w)


@dataclass(frozen=True)
class Thermal:
    """Temperature = idle_c + a fast and a slow first-order lag towards the loaded rise (derive.py)."""

    idle_c: float
    loaded_c: float
    fast_share: float
    fast_tau_s: float
    slow_tau_s: float


@dataclass(frozen=True)
class GpuProfile:
    model: str
    name: str
    driver_version: str
    memory_total_mib: int
    power_limit_w: int
    energy_counter_mj: int
    call_cost_us: dict[str, float]
    dt_s: float
    thermal: Thermal
    segments: dict[str, Segment]


def available_models() -> list[str]:
    folder = resources.files("provisioning.agent") / "profiles"
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


@functools.cache
def load_profile(model: str) -> GpuProfile:
    """The profile of ``model``; read once per process however many simulated nodes share it."""
    if model not in available_models():
        raise ValueError(f"no simulated GPU profile {model!r}; available: {', '.join(available_models())}")
    data: dict[str, Any] = json.loads(
        (resources.files("provisioning.agent") / "profiles" / f"{model}.json").read_text(encoding="utf-8")
    )
    return GpuProfile(
        model=data["model"],
        name=data["name"],
        driver_version=data["driver_version"],
        memory_total_mib=data["memory_total_mib"],
        power_limit_w=data["power_limit_w"],
        energy_counter_mj=data["energy_counter_mj"],
        call_cost_us=data["call_cost_us"],
        dt_s=data["dt_s"],
        thermal=Thermal(**data["thermal"]),
        segments={
            name: Segment(**{field: tuple(values) for field, values in data["segments"][name].items()})
            for name in SEGMENTS
        },
    )
