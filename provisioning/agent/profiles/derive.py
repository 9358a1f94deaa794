"""Derive a simulated-GPU profile from a real NVML recording. Run by a developer, by hand; the agent
only ever reads the JSON this writes (``profiles/<model>.json``), never the recording.

    python provisioning/agent/profiles/derive.py \\
        ../shared/fixtures/nvml/h100-sxm-80gb.json provisioning/agent/profiles/h100-sxm-80gb.json

The recording holds static facts of one card, what each NVML call cost, and a ~0.1 s time series in
four phases: idle, matmul_bf16 (sustained load), copy (memory-bound) and idle_after. The profile keeps:

- the static facts the agent reports (name, memory, power limit, driver version) and the call costs;
- four segments, each the recorded values held onto a regular 0.1 s grid (no invented values):
  ``idle`` (the idle phase once power had settled; replayed in a loop), ``ramp_up`` (the start of the
  matmul phase until power reached its sustained level; played once when a workload starts),
  ``loaded`` (the rest of the matmul phase; replayed in a loop, SM clock throttled ~1,360 MHz at
  ~700 W) and ``ramp_down`` (played once on release: the recorded fall of power when kernels stopped,
  at the start of idle_after, rescaled to run from the loaded level to the idle level; utilisation,
  memory and clocks are idle's because the released workload's process is gone);
- a two-part thermal model fitted to the matmul phase: the temperature approaches
  ``idle_c + rise * (share * (1 - exp(-t / fast_tau)) + (1 - share) * (1 - exp(-t / slow_tau)))``
  after a load starts (and decays the same way after release), with ``rise`` fixed so that the
  sustained load settles at the hottest temperature recorded under it. A replayed temperature could
  not loop (it climbs all phase long), a fitted one can run for hours.

The copy phase is left out: the simulated workload is the matmul the recording sustained.
"""

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

DT_S = 0.1
FIELDS = ("gpu_util", "mem_util", "mem_used_mib", "power_w", "sm_mhz")
SETTLED_WITHIN = 0.005  # idle power within 0.5 % of its median counts as settled
SUSTAINED_WITHIN = 0.03  # matmul power within 3 % of its late median counts as sustained
RAMP_DOWN_WITHIN = 0.05  # the fall of power ends within 5 % of where idle_after settles

Sample = dict[str, Any]


def held_on_grid(samples: list[Sample]) -> dict[str, list[float | int]]:
    """Each field at t0, t0 + DT_S, ...: the latest recorded sample at or before that instant."""
    start, end = samples[0]["t"], samples[-1]["t"]
    ticks = math.ceil((end - start) / DT_S - 1e-6) + 1  # the grid reaches the last sample
    columns: dict[str, list[float | int]] = {field: [] for field in FIELDS}
    cursor = 0
    for tick in range(ticks):
        at = start + tick * DT_S + 1e-9
        while cursor + 1 < len(samples) and samples[cursor + 1]["t"] <= at:
            cursor += 1
        for field in FIELDS:
            value = samples[cursor][field]
            columns[field].append(round(value, 1) if isinstance(value, float) else value)
    return columns


def phase(series: list[Sample], name: str) -> list[Sample]:
    return [sample for sample in series if sample["phase"] == name]


def first_index(samples: list[Sample], predicate) -> int:
    return next(i for i, sample in enumerate(samples) if predicate(sample))


def idle_segment(series: list[Sample]) -> tuple[dict[str, list], list[Sample]]:
    idle = phase(series, "idle")
    median = statistics.median(sample["power_w"] for sample in idle)
    settled = first_index(idle, lambda s: abs(s["power_w"] - median) <= SETTLED_WITHIN * median)
    return held_on_grid(idle[settled:]), idle[settled:]


def matmul_segments(series: list[Sample]) -> tuple[dict[str, list], dict[str, list], list[Sample]]:
    matmul = phase(series, "matmul_bf16")
    late = statistics.median(sample["power_w"] for sample in matmul[len(matmul) // 2 :])
    sustained = first_index(matmul, lambda s: s["power_w"] >= (1 - SUSTAINED_WITHIN) * late)
    return held_on_grid(matmul[:sustained]), held_on_grid(matmul[sustained:]), matmul


def ramp_down_segment(series: list[Sample], idle: dict[str, list], loaded: dict[str, list]) -> dict[str, list]:
    after = phase(series, "idle_after")
    top, settled = after[0]["power_w"], after[-1]["power_w"]
    end = first_index(after, lambda s: s["power_w"] <= settled * (1 + RAMP_DOWN_WITHIN))
    shape = [(power - settled) / (top - settled) for power in held_on_grid(after[: end + 1])["power_w"]]
    idle_power = statistics.mean(idle["power_w"])
    loaded_power = statistics.mean(loaded["power_w"])
    ticks = len(shape)
    return {
        "gpu_util": [0] * ticks,
        "mem_util": [0] * ticks,
        "mem_used_mib": [idle["mem_used_mib"][0]] * ticks,
        "power_w": [round(idle_power + (loaded_power - idle_power) * fraction, 1) for fraction in shape],
        "sm_mhz": [idle["sm_mhz"][0]] * ticks,
    }


def step_response(t: float, rise: float, share: float, fast_tau: float, slow_tau: float) -> float:
    return rise * (share * (1 - math.exp(-t / fast_tau)) + (1 - share) * (1 - math.exp(-t / slow_tau)))


def fit_thermal(matmul: list[Sample], idle_c: int, loaded_c: int) -> dict[str, float]:
    """Least squares over a grid: three numbers, a few thousand candidates, no dependency needed."""
    start = matmul[0]["t"]
    points = [(sample["t"] - start, sample["temp_c"] - idle_c) for sample in matmul]
    rise = loaded_c - idle_c
    candidates = (
        (share_pct / 100, fast_tau, float(slow_tau))
        for share_pct in range(5, 100, 5)
        for fast_tau in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)
        for slow_tau in range(2, 61)
    )

    def squared_error(candidate: tuple[float, float, float]) -> float:
        return sum((step_response(t, rise, *candidate) - y) ** 2 for t, y in points)

    share, fast_tau, slow_tau = min(candidates, key=squared_error)
    return {"idle_c": idle_c, "loaded_c": loaded_c, "fast_share": share, "fast_tau_s": fast_tau, "slow_tau_s": slow_tau}


def derive(recording: dict[str, Any], model: str) -> dict[str, Any]:
    series = recording["series"]
    device = recording["devices"][0]
    idle, idle_samples = idle_segment(series)
    ramp_up, loaded, matmul = matmul_segments(series)
    idle_c = round(statistics.median(sample["temp_c"] for sample in idle_samples))
    loaded_c = max(sample["temp_c"] for sample in matmul)
    return {
        "model": model,
        "source": recording.get("note", ""),
        "name": device["name"],
        "driver_version": recording["driver_version"],
        "memory_total_mib": series[0]["mem_total_mib"],
        "power_limit_w": device["enforced_power_limit_mw"] // 1000,
        "energy_counter_mj": device["total_energy_mj"],
        "unsupported_readings": [error.split(":")[0] for error in recording.get("errors", [])],
        "call_cost_us": {name: round(cost, 2) for name, cost in recording["call_cost_us"].items()},
        "dt_s": DT_S,
        "thermal": fit_thermal(matmul, idle_c, loaded_c),
        "segments": {
            "idle": idle,
            "ramp_up": ramp_up,
            "loaded": loaded,
            "ramp_down": ramp_down_segment(series, idle, loaded),
        },
    }


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with objects indented and lists of numbers on one line, so the profile stays readable."""
    if isinstance(value, dict):
        pad = " " * (indent + 1)
        items = [f"{pad}{json.dumps(key)}: {dumps(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recording", type=Path, help="an NVML recording (fixtures/nvml/<model>.json)")
    parser.add_argument("profile", type=Path, help="where to write the profile (profiles/<model>.json)")
    args = parser.parse_args()
    recording = json.loads(args.recording.read_text(encoding="utf-8"))
    profile = derive(recording, model=args.profile.stem)
    args.profile.write_text(dumps(profile) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
