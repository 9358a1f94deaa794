"""Host drivers: simulated provisioning with progress and injected failures; a real workload process
group started, released (the whole group), released again, or refused cleanly; the GPUs of a
reservation checked against the node, shown to its workload alone (per vendor) and kept apart from
another reservation's on the same node."""

import asyncio
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from provisioning.agent.drivers import DriverError, get_driver
from provisioning.agent.drivers.process import ProcessDriver, group_members
from provisioning.agent.drivers.simulated import PROVISION_STEPS, SimulatedDriver


class Progress:
    def __init__(self) -> None:
        self.reports: list[tuple[str, int]] = []

    async def __call__(self, step: str, percent: int) -> None:
        self.reports.append((step, percent))


NODE_GPUS = 8
PARAMS = {"reservation": "5a0c2a55-8f7e-4d5c-9a51-0d6f0b0e8c11", "gpus": list(range(NODE_GPUS))}


def simulated(**options) -> SimulatedDriver:
    return SimulatedDriver(**{"gpu_count": NODE_GPUS, "speed": 100, **options})


async def test_simulated_provisioning_walks_its_steps_with_rising_progress():
    progress = Progress()
    detail = await simulated().provision(PARAMS, progress)

    assert [step for step, _ in progress.reports[:-1]] == [step for step, _ in PROVISION_STEPS]
    percents = [percent for _, percent in progress.reports]
    assert percents == sorted(percents) and (percents[0], percents[-1]) == (0, 100)
    assert detail["reservation"] == PARAMS["reservation"] and detail["gpus"] == list(range(8))


async def test_the_speed_factor_divides_the_durations():
    loop = asyncio.get_running_loop()
    started = loop.time()
    await simulated(speed=40).provision(PARAMS, Progress())
    assert loop.time() - started < 0.5  # four seconds of steps at speed 1


async def test_a_failure_injected_on_a_named_step_stops_there():
    progress = Progress()
    driver = simulated(fail_step="configure network")
    with pytest.raises(DriverError, match="configure network"):
        await driver.provision(PARAMS, progress)
    assert progress.reports[-1][0] == "configure network"
    assert all(percent < 100 for _, percent in progress.reports)
    assert driver.holdings() == {}, "a failed provisioning holds no GPU"


async def test_a_failure_rate_makes_that_share_of_provisionings_fail():
    always, never = simulated(speed=1000, fail_rate=1, seed=1), simulated(speed=1000, fail_rate=0)
    for _ in range(5):
        with pytest.raises(DriverError, match="injected"):
            await always.provision(PARAMS, Progress())
        await never.provision(PARAMS, Progress())


async def test_simulated_release_is_idempotent():
    driver = simulated()
    await driver.provision(PARAMS, Progress())

    first = await driver.release(PARAMS, Progress())
    second = await driver.release(PARAMS, Progress())

    assert (first["was_provisioned"], second["was_provisioned"]) == (True, False)
    assert (first["gpus"], second["gpus"]) == (list(range(8)), [])


async def test_the_simulated_driver_records_and_reports_the_gpus_each_reservation_holds():
    driver = simulated()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())

    one = await driver.provision({"reservation": first, "gpus": [5, 4]}, Progress())
    two = await driver.provision({"reservation": second, "gpus": [0, 1, 2, 3], "gpu_vendor": "amd"}, Progress())
    held_by_both = (driver.holdings(), driver.gpus_in_use())
    released = await driver.release({"reservation": first}, Progress())

    assert (one["gpus"], one["gpu_vendor"]) == ([4, 5], "nvidia"), "no vendor means NVIDIA"
    assert (two["gpus"], two["gpu_vendor"]) == ([0, 1, 2, 3], "amd")
    assert held_by_both == ({first: (4, 5), second: (0, 1, 2, 3)}, {0, 1, 2, 3, 4, 5})
    assert released["gpus"] == [4, 5]
    assert (driver.holdings(), driver.gpus_in_use()) == ({second: (0, 1, 2, 3)}, {0, 1, 2, 3})


async def test_a_bare_count_from_an_older_console_means_the_first_gpus():
    detail = await simulated().provision({"reservation": "r1", "gpus": 2}, Progress())
    assert detail["gpus"] == [0, 1]


async def test_gpus_another_reservation_holds_are_refused_until_it_is_released():
    driver = simulated()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await driver.provision({"reservation": first, "gpus": [0, 1, 2, 3]}, Progress())

    progress = Progress()
    with pytest.raises(DriverError, match=r"^GPU 2, 3 of this node is held by another reservation$"):
        await driver.provision({"reservation": second, "gpus": [2, 3, 4, 5]}, progress)
    again = await driver.provision({"reservation": first, "gpus": [0, 1, 2, 3]}, Progress())
    await driver.release({"reservation": first}, Progress())
    after = await driver.provision({"reservation": second, "gpus": [2, 3, 4, 5]}, Progress())

    assert progress.reports == [], "refused before any step"
    assert again["gpus"] == [0, 1, 2, 3], "a reservation does not collide with itself"
    assert after["gpus"] == [2, 3, 4, 5] and driver.holdings() == {second: (2, 3, 4, 5)}


def test_simulated_driver_options_are_checked():
    with pytest.raises(ValueError, match="fail_step"):
        simulated(fail_step="pray")
    with pytest.raises(ValueError, match="probability"):
        simulated(fail_rate=2)
    with pytest.raises(ValueError, match="unknown host driver"):
        get_driver("ipmi")


REFUSED = [
    pytest.param({}, "params.gpus must be a non-empty list of GPU indices", id="missing"),
    pytest.param({"gpus": None}, "params.gpus must be a non-empty list", id="null"),
    pytest.param({"gpus": []}, "params.gpus must be a non-empty list", id="empty"),
    pytest.param({"gpus": "0,1"}, "params.gpus must be a non-empty list", id="a string"),
    pytest.param({"gpus": 0}, "params.gpus must be a non-empty list", id="a count of none"),
    pytest.param({"gpus": True}, "params.gpus must be a non-empty list", id="a bool for a count"),
    pytest.param({"gpus": [2, 3, 2]}, "params.gpus names a GPU more than once", id="duplicates"),
    pytest.param(
        {"gpus": [6, 7, 8, 9]},
        r"params.gpus names GPU 8, 9, which this node does not have \(its 8 GPUs are 0 to 7\)",
        id="out of range",
    ),
    pytest.param({"gpus": 9}, "params.gpus asks for 9 GPUs; this node has 8", id="a count beyond the node"),
    pytest.param({"gpus": [-1]}, r"must hold GPU indices \(integers from 0\), not -1", id="negative"),
    pytest.param({"gpus": [0, "1"]}, "not '1'", id="a string index"),
    pytest.param({"gpus": [1.0]}, "not 1.0", id="a float index"),
    pytest.param({"gpus": [0, True]}, "not True", id="a bool index"),
    pytest.param({"gpus": [0], "gpu_vendor": "other"}, "params.gpu_vendor 'other' is not one", id="unknown vendor"),
    pytest.param({"gpus": [0], "gpu_vendor": ["nvidia"]}, "params.gpu_vendor", id="a vendor not a string"),
]


@pytest.mark.parametrize(("params", "message"), REFUSED)
async def test_the_simulated_driver_refuses_gpus_it_cannot_give(params, message):
    driver, progress = simulated(), Progress()
    with pytest.raises(DriverError, match=message):
        await driver.provision({"reservation": str(uuid.uuid4()), **params}, progress)
    assert (progress.reports, driver.holdings()) == ([], {})


@pytest.mark.parametrize(("params", "message"), REFUSED)
async def test_the_process_driver_refuses_gpus_it_cannot_give(tmp_path, params, message):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS)
    with pytest.raises(DriverError, match=message):
        await driver.provision({"reservation": str(uuid.uuid4()), "command": ["sleep", "60"], **params}, Progress())
    assert not (tmp_path / "workloads.json").exists(), "nothing started, nothing recorded"
    assert not (tmp_path / "workloads").exists()


def workload(command: list[str], gpus: list[int] | None = None, **params) -> dict:
    return {"reservation": str(uuid.uuid4()), "gpus": [0, 1] if gpus is None else gpus, "command": command, **params}


async def live_members(group: int, count: int) -> list[int]:
    for _ in range(100):
        members = group_members(group)
        if len(members) >= count:
            return members
        await asyncio.sleep(0.02)
    raise AssertionError(f"the workload's group never had {count} processes")


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


async def test_a_workload_runs_in_its_own_process_group_and_release_ends_all_of_it(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    params = workload(["sh", "-c", "sleep 60 & sleep 60 & wait"])

    detail = await driver.provision(params, Progress())
    members = await live_members(detail["pid"], 3)
    released = await driver.release(params, Progress())
    again = await driver.release(params, Progress())

    assert detail["pid"] in members
    assert [pid for pid in members if running(pid)] == []
    assert (released["stopped"], again["stopped"]) == (True, False)


async def test_a_workload_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=0.2)
    params = workload(["sh", "-c", "trap '' TERM; sleep 60 & wait"])

    detail = await driver.provision(params, Progress())
    members = await live_members(detail["pid"], 2)
    await driver.release(params, Progress())

    assert [pid for pid in members if running(pid)] == []


async def test_a_restarted_agent_can_still_release_a_workload(tmp_path):
    params = workload(["sleep", "60"])
    detail = await ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS).provision(params, Progress())

    released = await ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2).release(params, Progress())

    assert released["stopped"] is True and not running(detail["pid"])


async def written(path: Path) -> str:
    """The file's text once the workload has written it (a line ending in a newline)."""
    for _ in range(250):
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"the workload never wrote {path}")


def environment_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


VISIBILITY_VARIABLES = {
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "HABANA_VISIBLE_MODULES",
    "NEOCLOUD_GPUS",
}
NVIDIA_4_5 = {
    "NEOCLOUD_GPUS": "4,5",
    "CUDA_VISIBLE_DEVICES": "4,5",
    "NVIDIA_VISIBLE_DEVICES": "4,5",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # so CUDA's index 4 is NVML's, the agent's
}


@pytest.mark.parametrize(
    ("vendor", "expected"),
    [
        pytest.param({}, NVIDIA_4_5, id="no vendor"),
        pytest.param({"gpu_vendor": "nvidia"}, NVIDIA_4_5, id="nvidia"),
        # ROCR hides the others and renumbers what is left from 0; HIP selects among those.
        pytest.param(
            {"gpu_vendor": "amd"},
            {"NEOCLOUD_GPUS": "4,5", "ROCR_VISIBLE_DEVICES": "4,5", "HIP_VISIBLE_DEVICES": "0,1"},
            id="amd",
        ),
        pytest.param({"gpu_vendor": "intel"}, {"NEOCLOUD_GPUS": "4,5", "HABANA_VISIBLE_MODULES": "4,5"}, id="intel"),
    ],
)
async def test_the_workload_gets_a_clean_environment_that_shows_its_gpus_only(tmp_path, monkeypatch, vendor, expected):
    monkeypatch.setenv("AGENT_ONLY_SECRET", "do-not-leak")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")  # the agent's own is not inherited
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    params = workload(["sh", "-c", "env > env.tmp && mv env.tmp env.txt; sleep 60"], [5, 4], **vendor)
    await driver.provision(params, Progress())
    try:
        variables = environment_of(await written(tmp_path / "workloads" / params["reservation"] / "env.txt"))
    finally:
        await driver.release(params, Progress())

    assert "AGENT_ONLY_SECRET" not in variables
    assert variables["NEOCLOUD_RESERVATION"] == params["reservation"]
    assert {name: value for name, value in variables.items() if name in VISIBILITY_VARIABLES} == expected


async def test_two_tenants_on_one_node_each_see_their_gpus_and_a_release_stops_only_its_own(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    command = ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES > visible; sleep 600"]
    first, second = workload(command, [4, 5], gpu_vendor="nvidia"), workload(command, [0, 1, 2, 3])
    one = await driver.provision(first, Progress())
    two = await driver.provision(second, Progress())
    try:
        visible = [await written(tmp_path / "workloads" / p["reservation"] / "visible") for p in (first, second)]
        held_by_both = driver.holdings()
        first_group = await live_members(one["pid"], 2)
        second_group = await live_members(two["pid"], 2)
        released = await driver.release({"reservation": first["reservation"]}, Progress())

        assert visible == ["4,5\n", "0,1,2,3\n"]
        assert held_by_both == {first["reservation"]: (4, 5), second["reservation"]: (0, 1, 2, 3)}
        assert (released["stopped"], released["gpus"]) == (True, [4, 5])
        assert [pid for pid in first_group if running(pid)] == []
        assert all(running(pid) for pid in second_group), "the other tenant's workload runs on"
        assert driver.holdings() == {second["reservation"]: (0, 1, 2, 3)}
        assert (tmp_path / "workloads" / second["reservation"] / "visible").read_text() == "0,1,2,3\n"
    finally:
        await driver.release({"reservation": second["reservation"]}, Progress())
    assert not running(two["pid"])


async def test_gpus_a_running_workload_holds_are_refused_to_another_reservation(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    holder = workload(["sleep", "60"], [0, 1])
    finished = workload(["true"], [2, 3])
    await driver.provision(holder, Progress())
    short = await driver.provision(finished, Progress())
    try:
        for _ in range(250):  # ``true`` exits at once; an exited workload holds nothing any more
            if not running(short["pid"]):
                break
            await asyncio.sleep(0.02)
        with pytest.raises(DriverError, match="GPU 1 of this node is held by another reservation"):
            await driver.provision(workload(["sleep", "60"], [1, 2]), Progress())
        taker = workload(["sleep", "60"], [2, 3])
        taken = await driver.provision(taker, Progress())
        assert taken["gpus"] == [2, 3]
        await driver.release(taker, Progress())
    finally:
        await driver.release(holder, Progress())


async def test_a_workload_recorded_by_an_agent_before_gpu_slices_holds_the_whole_node(tmp_path):
    """An agent upgrade leaves workloads running; the old registry held a bare group id per reservation,
    and every reservation then held the whole node."""
    old = subprocess.Popen(["sleep", "60"], start_new_session=True)
    reservation = str(uuid.uuid4())
    (tmp_path / "workloads.json").write_text(json.dumps({reservation: old.pid}))
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    try:
        held = driver.holdings()
        with pytest.raises(DriverError, match="held by another reservation"):
            await driver.provision(workload(["sleep", "60"], [7]), Progress())
        released = await driver.release({"reservation": reservation}, Progress())
    finally:
        old.kill()
        old.wait()

    assert held == {reservation: tuple(range(NODE_GPUS))}
    assert (released["stopped"], released["gpus"]) == (True, list(range(NODE_GPUS)))
    assert driver.holdings() == {}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (workload(["/nonexistent/trainer", "--epochs", "3"]), "cannot start the workload '/nonexistent/trainer'"),
        ({"reservation": str(uuid.uuid4())}, "params.command"),
        ({"reservation": "../../etc", "command": ["true"]}, "not a UUID"),
        ({"command": ["true"]}, "params.reservation is missing"),
    ],
)
async def test_a_workload_that_cannot_start_fails_cleanly(tmp_path, params, message):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS)
    with pytest.raises(DriverError, match=message):
        await driver.provision(params, Progress())
    assert not (tmp_path / "workloads.json").exists(), "nothing recorded as running"
