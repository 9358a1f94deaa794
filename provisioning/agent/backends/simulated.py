"""A simulated GPU host: N GPUs of a profiled model (default eight H100 SXM 80GB) whose readings replay a
real NVML recording (profiles/derive.py), so the console, its charts and its bills see what a real card
does: ~74 W and 345 MHz at idle, ~700 W and a power-throttled ~1,360 MHz SM clock under a matmul,
temperature climbing towards 63 °C and cooling back after release.

Each GPU replays the recorded segments with its own loop offset, a small power scale and per-sample noise,
and its own thermal time constants, so eight GPUs never move in lockstep. Everything is a function of
the clock (injectable) and the seed: the same seed and the same calls give the same readings. Readings
are computed in closed form at any instant, never stepped, so a host can go unread for hours and a fleet
of thousands of simulated GPUs costs nothing between samples.

Only the GPUs the agent says are busy (``set_load``: those of the reservations provisioned) replay the
loaded recording; the others replay the idle one, so a node that several tenants use, or one partly
rented, reads as a real one would.
"""

import math
import random
import time
import uuid
from array import array
from collections.abc import Callable, Collection

from provisioning.agent.backends.base import (
    ENERGY_INTERVAL_S,
    EnergyThrottle,
    GpuBackend,
    GpuHealth,
    GpuInfo,
    GpuReading,
    Inventory,
)
from provisioning.agent.backends.profile import GpuProfile, Segment, Thermal, load_profile

DEFAULT_MODEL = "h100-sxm-80gb"
POWER_SCALE_RANGE = (0.985, 1.01)  # card-to-card spread of the same model
POWER_NOISE = 0.003  # relative, per sample
THERMAL_SPREAD = 0.1  # ±10 % on time constants: airflow differs across a chassis
SM_STEP_MHZ = 15  # NVML reports clocks in 15 MHz steps
MJ_PER_WS = 1000


def gpu_uuid(hostname: str, index: int) -> str:
    """Stable per (host, index), so re-running a simulated host reports the same GPUs."""
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'gpu{index}.{hostname}')}"


def _rng(seed: str) -> random.Random:
    return random.Random(seed)  # noqa: S311 - simulated readings, nothing secret


class _Track:
    """One GPU's copy of a segment: its own noisy power and clocks, plus the energy prefix sums that let
    the energy counter be read at any instant without stepping through time."""

    def __init__(self, segment: Segment, rng: random.Random, power_scale: float, dt_s: float) -> None:
        self.segment = segment
        self.power_w = array("d", (p * power_scale * (1 + rng.gauss(0, POWER_NOISE)) for p in segment.power_w))
        self.sm_mhz = array(
            "i",
            (
                mhz + (rng.choice((-SM_STEP_MHZ, 0, 0, SM_STEP_MHZ)) if util else 0)
                for mhz, util in zip(segment.sm_mhz, segment.gpu_util, strict=True)
            ),
        )
        self.energy_prefix_mj = array("d", [0.0])
        for power in self.power_w:
            self.energy_prefix_mj.append(self.energy_prefix_mj[-1] + power * dt_s * MJ_PER_WS)

    def __len__(self) -> int:
        return len(self.power_w)

    def cyclic_energy_mj(self, position: int) -> float:
        """Energy of ticks [0, position) when the track repeats forever."""
        loops, rest = divmod(position, len(self))
        return loops * self.energy_prefix_mj[-1] + self.energy_prefix_mj[rest]


class _Replay:
    """From ``start``: ``intro`` (if any) played once, then ``loop`` repeated from tick ``offset``."""

    def __init__(
        self, intro: _Track | None, loop: _Track, *, offset: int, start: float, energy_mj: float, dt_s: float
    ) -> None:
        self.intro, self.loop, self.offset = intro, loop, offset
        self.start, self.energy_at_start, self.dt_s = start, energy_mj, dt_s
        self.intro_ticks = len(intro) if intro is not None else 0

    def _position(self, t: float) -> tuple[int, float]:
        elapsed = max(0.0, t - self.start)
        tick = int(elapsed / self.dt_s)
        return tick, elapsed - tick * self.dt_s

    def locate(self, t: float) -> tuple[_Track, int]:
        """The track and the tick of it playing at ``t``."""
        tick, _ = self._position(t)
        if self.intro is not None and tick < self.intro_ticks:
            return self.intro, tick
        return self.loop, (self.offset + tick - self.intro_ticks) % len(self.loop)

    def energy_mj(self, t: float) -> float:
        """The counter at ``start`` plus the integral of the replayed power since then."""
        tick, into = self._position(t)
        if self.intro is not None and tick < self.intro_ticks:
            done, power = self.intro.energy_prefix_mj[tick], self.intro.power_w[tick]
        else:
            looped = tick - self.intro_ticks
            done = self.loop.cyclic_energy_mj(self.offset + looped) - self.loop.cyclic_energy_mj(self.offset)
            if self.intro is not None:
                done += self.intro.energy_prefix_mj[-1]
            power = self.loop.power_w[(self.offset + looped) % len(self.loop)]
        return self.energy_at_start + done + power * into * MJ_PER_WS


class _ThermalLag:
    """Temperature as two first-order lags (a fast die, a slow heatsink) towards the target of the
    current load; exact at any instant because the target only changes when the load does."""

    def __init__(self, model: Thermal, rng: random.Random, start: float) -> None:
        self.model = model
        spread = 1 + rng.uniform(-THERMAL_SPREAD, THERMAL_SPREAD)
        self.fast_tau, self.slow_tau = model.fast_tau_s * spread, model.slow_tau_s * spread
        self.since = start
        self.fast = self.slow = 0.0  # degrees above idle at ``since``
        self.fast_target = self.slow_target = 0.0

    def parts(self, t: float) -> tuple[float, float]:
        elapsed = max(0.0, t - self.since)
        fast = self.fast_target + (self.fast - self.fast_target) * math.exp(-elapsed / self.fast_tau)
        slow = self.slow_target + (self.slow - self.slow_target) * math.exp(-elapsed / self.slow_tau)
        return fast, slow

    def set_load(self, t: float, active: bool) -> None:
        self.fast, self.slow = self.parts(t)
        self.since = t
        rise = self.model.loaded_c - self.model.idle_c if active else 0.0
        self.fast_target = rise * self.model.fast_share
        self.slow_target = rise * (1 - self.model.fast_share)

    def temp_c(self, t: float) -> int:
        return round(self.model.idle_c + sum(self.parts(t)))


class _SimulatedGpu:
    def __init__(
        self,
        index: int,
        uuid_: str,
        profile: GpuProfile,
        rng: random.Random,
        start: float,
        *,
        memory_total_mib: int,
        power_factor: float = 1.0,
    ) -> None:
        self.index, self.uuid, self.profile, self.rng = index, uuid_, profile, rng
        self.memory_total_mib = memory_total_mib
        scale = rng.uniform(*POWER_SCALE_RANGE) * power_factor
        self.tracks = {name: _Track(segment, rng, scale, profile.dt_s) for name, segment in profile.segments.items()}
        self.thermal = _ThermalLag(profile.thermal, rng, start)
        self.active = False
        counter = profile.energy_counter_mj + rng.uniform(0, profile.energy_counter_mj)
        self.replay = self._replay(None, "idle", start, counter)  # already idle: no ramp to play

    def _replay(self, intro: str | None, loop: str, t: float, energy_mj: float) -> _Replay:
        loop_track = self.tracks[loop]
        return _Replay(
            self.tracks[intro] if intro is not None else None,
            loop_track,
            offset=self.rng.randrange(len(loop_track)),
            start=t,
            energy_mj=energy_mj,
            dt_s=self.profile.dt_s,
        )

    def set_load(self, t: float, active: bool) -> None:
        if active == self.active:
            return  # a GPU already under load does not ramp up again
        self.active = active
        intro, loop = ("ramp_up", "loaded") if active else ("ramp_down", "idle")
        self.replay = self._replay(intro, loop, t, self.replay.energy_mj(t))
        self.thermal.set_load(t, active)

    def reading(self, t: float, energy_mj: int | None) -> GpuReading:
        track, tick = self.replay.locate(t)
        segment = track.segment
        return GpuReading(
            index=self.index,
            uuid=self.uuid,
            gpu_util=segment.gpu_util[tick],
            mem_util=segment.mem_util[tick],
            mem_used_mib=segment.mem_used_mib[tick],
            mem_total_mib=self.memory_total_mib,
            power_w=round(track.power_w[tick], 3),
            temp_c=self.thermal.temp_c(t),
            sm_mhz=track.sm_mhz[tick],
            energy_mj=energy_mj,
        )


class SimulatedBackend(GpuBackend):
    name = "simulated"

    def __init__(
        self,
        *,
        hostname: str,
        gpus: int = 8,
        model: str = DEFAULT_MODEL,
        seed: int | str | None = None,
        gpu_name: str | None = None,
        memory_mib: int | None = None,
        power_limit_w: int | None = None,
        energy_interval_s: float = ENERGY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``seed`` defaults to the hostname: each simulated host differs, and is the same on every run.
        ``gpu_name`` and ``memory_mib`` make the GPUs report another model (the console's fleet has models
        with no recording yet) while their readings still follow the profile's; ``power_limit_w`` scales the
        recorded power to that model's limit (an L40S under load draws about 350 W, not an H100's 700 W)."""
        self._profile = load_profile(model)
        self._power_limit_w = power_limit_w or self._profile.power_limit_w
        power_factor = self._power_limit_w / self._profile.power_limit_w
        self._gpu_name = gpu_name or self._profile.name
        self._clock = clock
        self._energy = EnergyThrottle(energy_interval_s, clock)
        start = clock()
        seed = hostname if seed is None else seed
        self._gpus = [
            _SimulatedGpu(
                index,
                gpu_uuid(hostname, index),
                self._profile,
                _rng(f"{seed}/{index}"),
                start,
                memory_total_mib=memory_mib or self._profile.memory_total_mib,
                power_factor=power_factor,
            )
            for index in range(gpus)
        ]

    def inventory(self) -> Inventory:
        return Inventory(
            driver_version=self._profile.driver_version,
            gpus=[
                GpuInfo(
                    index=gpu.index,
                    uuid=gpu.uuid,
                    name=self._gpu_name,
                    memory_mib=gpu.memory_total_mib,
                    power_limit_w=self._power_limit_w,
                )
                for gpu in self._gpus
            ],
        )

    def sample(self) -> list[GpuReading]:
        t = self._clock()
        return [
            gpu.reading(t, self._energy.read(gpu.index, lambda gpu=gpu: int(gpu.replay.energy_mj(t))))
            for gpu in self._gpus
        ]

    def health(self) -> list[GpuHealth]:
        return [GpuHealth(index=gpu.index, uuid=gpu.uuid, ecc_uncorrected=0, xid_count=0) for gpu in self._gpus]

    def call_costs(self, calls: int) -> dict[str, float | None]:
        """The recorded costs of the real card, not of this simulation (which are meaningless)."""
        return dict(self._profile.call_cost_us)

    def set_load(self, busy: Collection[int]) -> None:
        busy = set(busy)
        unknown = busy.difference(gpu.index for gpu in self._gpus)
        if unknown:
            raise ValueError(f"no simulated GPU {', '.join(map(str, sorted(unknown)))} on this host")
        t = self._clock()
        for gpu in self._gpus:
            gpu.set_load(t, gpu.index in busy)
