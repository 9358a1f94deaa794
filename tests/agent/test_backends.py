"""GPU backends: the simulated one reads like the recorded H100 (idle, under load, cooling back), with
GPUs out of lockstep and an energy counter that integrates power; NVML fails cleanly without a GPU and
turns readings a card refuses into None."""

import statistics

import pynvml
import pytest

from provisioning.agent.backends import BackendUnavailable, get_backend
from provisioning.agent.backends.base import GpuReading
from provisioning.agent.backends.nvml import NvmlBackend, read_optional
from provisioning.agent.backends.simulated import SimulatedBackend, gpu_uuid
from tests.agent.harness import nvml_present


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulated(clock: Clock, seed: int = 1, **options) -> SimulatedBackend:
    return SimulatedBackend(hostname="n1", seed=seed, clock=clock, **{"energy_interval_s": 0, **options})


def run(backend: SimulatedBackend, clock: Clock, seconds: float, step: float = 0.5) -> list[list[GpuReading]]:
    samples = []
    for _ in range(round(seconds / step)):
        clock.now += step
        samples.append(backend.sample())
    return samples


def flat(samples: list[list[GpuReading]]) -> list[GpuReading]:
    return [reading for sample in samples for reading in sample]


def test_idle_gpus_read_like_the_recorded_idle_card():
    clock = Clock()
    readings = flat(run(simulated(clock), clock, 10))

    assert all(72 <= r.power_w <= 76 for r in readings)
    assert {(r.gpu_util, r.sm_mhz, r.mem_used_mib, r.mem_total_mib) for r in readings} == {(0, 345, 480, 81559)}
    assert all(35 <= r.temp_c <= 36 for r in readings)


def test_loaded_gpus_draw_about_700_w_with_a_throttled_clock_and_warm_towards_63_c():
    clock = Clock()
    backend = simulated(clock)
    backend.set_load(range(8))
    ramp = run(backend, clock, 3)
    sustained = flat(run(backend, clock, 60))

    assert ramp[0][0].power_w < 300, "power ramps up as the recorded matmul did"
    assert 650 <= statistics.mean(r.power_w for r in sustained) <= 710
    assert 1300 <= statistics.mean(r.sm_mhz for r in sustained) <= 1420
    assert all(r.gpu_util >= 99 and r.mem_used_mib > 480 for r in sustained)
    temperatures = [r.temp_c for r in sustained]
    assert 35 <= min(temperatures) and max(temperatures) == 63


def test_another_models_power_limit_scales_the_recorded_power():
    clock = Clock()
    backend = simulated(clock, power_limit_w=350)  # an L40S-class card
    backend.set_load(range(8))
    run(backend, clock, 3)
    sustained = flat(run(backend, clock, 30))

    assert 325 <= statistics.mean(r.power_w for r in sustained) <= 355
    assert backend.inventory().gpus[0].power_limit_w == 350


def test_released_gpus_cool_back_to_idle():
    clock = Clock()
    backend = simulated(clock)
    backend.set_load(range(8))
    run(backend, clock, 60)
    backend.set_load(())
    cooling = run(backend, clock, 60)

    first_gpu = [sample[0].temp_c for sample in cooling]
    assert first_gpu == sorted(first_gpu, reverse=True)
    assert all(r.power_w < 80 and r.gpu_util == 0 and r.temp_c <= 36 for r in cooling[-1])


def test_only_the_busy_gpus_run_under_load_and_the_others_read_idle():
    clock = Clock()
    backend = simulated(clock, gpus=4)
    backend.set_load({1, 2})
    run(backend, clock, 30)
    sustained = run(backend, clock, 30)
    backend.set_load({2})  # the reservation on GPU 1 was released, the one on GPU 2 goes on
    run(backend, clock, 60)
    after_release = run(backend, clock, 10)

    def by_gpu(samples: list[list[GpuReading]], index: int) -> list[GpuReading]:
        return [sample[index] for sample in samples]

    for index in (1, 2):
        assert 650 <= statistics.mean(r.power_w for r in by_gpu(sustained, index)) <= 710
        assert all(r.gpu_util >= 99 for r in by_gpu(sustained, index))
    for index in (0, 3):
        assert all(72 <= r.power_w <= 76 and r.gpu_util == 0 and r.sm_mhz == 345 for r in by_gpu(sustained, index))
    assert all(r.power_w < 80 and r.gpu_util == 0 for r in by_gpu(after_release, 1))
    assert all(r.gpu_util >= 99 for r in by_gpu(after_release, 2)), "its neighbour's release left it loaded"
    assert statistics.mean(r.power_w for r in by_gpu(after_release, 2)) > 600


def test_a_gpu_already_busy_does_not_ramp_up_again_when_another_becomes_busy():
    clock = Clock()
    backend = simulated(clock, gpus=2)
    backend.set_load({0})
    run(backend, clock, 30)
    backend.set_load({0, 1})
    first = run(backend, clock, 3)

    assert all(sample[0].power_w > 600 for sample in first)
    assert first[0][1].power_w < 300, "the newly busy GPU ramps up"


def test_a_busy_gpu_the_host_does_not_have_is_refused():
    with pytest.raises(ValueError, match="no simulated GPU 8"):
        simulated(Clock()).set_load({7, 8})


def test_the_energy_counter_is_monotonic_and_integrates_the_reported_power():
    clock = Clock()
    backend = simulated(clock)
    samples = run(backend, clock, 5, step=0.1)
    backend.set_load(range(8))
    samples += run(backend, clock, 20, step=0.1)

    for gpu in range(8):
        series = [sample[gpu] for sample in samples]
        energy = [r.energy_mj for r in series]
        assert energy == sorted(energy)
        joules = (energy[-1] - energy[0]) / 1000
        integrated = sum(r.power_w * 0.1 for r in series[:-1])
        assert joules == pytest.approx(integrated, rel=0.01)


def test_the_energy_counter_is_read_at_most_once_per_interval():
    clock = Clock()
    backend = simulated(clock, energy_interval_s=10)
    energy = [sample[0].energy_mj for sample in run(backend, clock, 25, step=1)]

    assert len(set(energy[:9])) == 1, "reused for 10 s"
    assert len(set(energy)) == 3


def test_gpus_do_not_move_in_lockstep():
    clock = Clock()
    backend = simulated(clock)
    backend.set_load(range(8))
    samples = run(backend, clock, 20)[4:]

    powers = [[sample[gpu].power_w for sample in samples] for gpu in range(8)]
    clocks = [[sample[gpu].sm_mhz for sample in samples] for gpu in range(8)]
    assert len({tuple(series) for series in powers}) == 8
    assert len({tuple(series) for series in clocks}) == 8
    # Noise alone gives at most three clocks at one instant (one 15 MHz step either way); phase offsets more.
    assert statistics.mean(len({sample[g].sm_mhz for g in range(8)}) for sample in samples) >= 4


def test_readings_are_deterministic_given_a_seed():
    def readings(seed: int) -> list[list[GpuReading]]:
        clock = Clock()
        backend = simulated(clock, seed=seed)
        samples = run(backend, clock, 2)
        backend.set_load(range(8))
        return samples + run(backend, clock, 10)

    assert readings(3) == readings(3)
    assert readings(3) != readings(4)


def test_inventory_uuids_are_stable_per_host_and_index():
    inventory = get_backend("simulated", hostname="n1", gpus=8).inventory()

    assert [gpu.uuid for gpu in inventory.gpus] == [gpu_uuid("n1", index) for index in range(8)]
    assert len({gpu.uuid for gpu in inventory.gpus}) == 8
    assert gpu_uuid("n1", 0) != gpu_uuid("n2", 0)
    assert (inventory.gpus[0].memory_mib, inventory.gpus[0].power_limit_w) == (81559, 700)


def test_a_simulated_node_can_report_the_gpu_model_the_console_expects_of_it():
    backend = get_backend("simulated", hostname="n1", gpus=4, gpu_name="NVIDIA H200", memory_mib=144384)

    assert {(gpu.name, gpu.memory_mib) for gpu in backend.inventory().gpus} == {("NVIDIA H200", 144384)}
    assert {reading.mem_total_mib for reading in backend.sample()} == {144384}


def test_an_unknown_backend_or_model_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown GPU backend"):
        get_backend("cuda-magic")
    with pytest.raises(ValueError, match="no simulated GPU profile"):
        get_backend("simulated", hostname="n1", model="b200")


@pytest.mark.skipif(nvml_present(), reason="a test of hosts without NVML; this one has a GPU driver")
def test_without_a_gpu_the_nvml_backend_is_cleanly_unavailable():
    with pytest.raises(BackendUnavailable, match="NVML is not available on this host: .*Not Found"):
        NvmlBackend()


def test_a_reading_the_card_refuses_is_none_and_other_nvml_errors_are_raised():
    def refuse(error: type[pynvml.NVMLError]):
        def reading(handle):
            raise error()

        return reading

    assert read_optional(refuse(pynvml.NVMLError_NotSupported), "handle") is None
    assert read_optional(refuse(pynvml.NVMLError_NoPermission), "handle") is None
    assert read_optional(lambda handle: 42, "handle") == 42
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        read_optional(refuse(pynvml.NVMLError_GpuIsLost), "handle")
