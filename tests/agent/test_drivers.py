"""Host drivers: simulated provisioning with progress and injected failures; a real workload process
group started, released (the whole group), released again, or refused cleanly."""

import asyncio
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


PARAMS = {"reservation": "5a0c2a55-8f7e-4d5c-9a51-0d6f0b0e8c11", "gpus": 8}


async def test_simulated_provisioning_walks_its_steps_with_rising_progress():
    progress = Progress()
    detail = await SimulatedDriver(speed=100).provision(PARAMS, progress)

    assert [step for step, _ in progress.reports[:-1]] == [step for step, _ in PROVISION_STEPS]
    percents = [percent for _, percent in progress.reports]
    assert percents == sorted(percents) and (percents[0], percents[-1]) == (0, 100)
    assert detail["reservation"] == PARAMS["reservation"] and detail["gpus"] == 8


async def test_the_speed_factor_divides_the_durations():
    loop = asyncio.get_running_loop()
    started = loop.time()
    await SimulatedDriver(speed=40).provision(PARAMS, Progress())
    assert loop.time() - started < 0.5  # four seconds of steps at speed 1


async def test_a_failure_injected_on_a_named_step_stops_there():
    progress = Progress()
    with pytest.raises(DriverError, match="configure network"):
        await SimulatedDriver(speed=100, fail_step="configure network").provision(PARAMS, progress)
    assert progress.reports[-1][0] == "configure network"
    assert all(percent < 100 for _, percent in progress.reports)


async def test_a_failure_rate_makes_that_share_of_provisionings_fail():
    always, never = SimulatedDriver(speed=1000, fail_rate=1, seed=1), SimulatedDriver(speed=1000, fail_rate=0)
    for _ in range(5):
        with pytest.raises(DriverError, match="injected"):
            await always.provision(PARAMS, Progress())
        await never.provision(PARAMS, Progress())


async def test_simulated_release_is_idempotent():
    driver = SimulatedDriver(speed=100)
    await driver.provision(PARAMS, Progress())

    first = await driver.release(PARAMS, Progress())
    second = await driver.release(PARAMS, Progress())

    assert (first["was_provisioned"], second["was_provisioned"]) == (True, False)


def test_simulated_driver_options_are_checked():
    with pytest.raises(ValueError, match="fail_step"):
        SimulatedDriver(fail_step="pray")
    with pytest.raises(ValueError, match="probability"):
        SimulatedDriver(fail_rate=2)
    with pytest.raises(ValueError, match="unknown host driver"):
        get_driver("ipmi")


def workload(command: list[str]) -> dict:
    return {"reservation": str(uuid.uuid4()), "gpus": 2, "command": command}


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
    driver = ProcessDriver(state_dir=tmp_path, grace_s=2)
    params = workload(["sh", "-c", "sleep 60 & sleep 60 & wait"])

    detail = await driver.provision(params, Progress())
    members = await live_members(detail["pid"], 3)
    released = await driver.release(params, Progress())
    again = await driver.release(params, Progress())

    assert detail["pid"] in members
    assert [pid for pid in members if running(pid)] == []
    assert (released["stopped"], again["stopped"]) == (True, False)


async def test_a_workload_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, grace_s=0.2)
    params = workload(["sh", "-c", "trap '' TERM; sleep 60 & wait"])

    detail = await driver.provision(params, Progress())
    members = await live_members(detail["pid"], 2)
    await driver.release(params, Progress())

    assert [pid for pid in members if running(pid)] == []


async def test_a_restarted_agent_can_still_release_a_workload(tmp_path):
    params = workload(["sleep", "60"])
    detail = await ProcessDriver(state_dir=tmp_path).provision(params, Progress())

    released = await ProcessDriver(state_dir=tmp_path, grace_s=2).release(params, Progress())

    assert released["stopped"] is True and not running(detail["pid"])


async def test_the_workload_gets_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_ONLY_SECRET", "do-not-leak")
    driver = ProcessDriver(state_dir=tmp_path, grace_s=2)
    params = workload(["sh", "-c", "env > env.txt; sleep 60"])
    await driver.provision(params, Progress())
    env_file = tmp_path / "workloads" / params["reservation"] / "env.txt"
    for _ in range(100):
        if env_file.exists() and env_file.read_text():
            break
        await asyncio.sleep(0.02)
    await driver.release(params, Progress())

    variables = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert "AGENT_ONLY_SECRET" not in variables
    assert variables["NEOCLOUD_RESERVATION"] == params["reservation"]
    assert variables["NEOCLOUD_GPUS"] == "2"


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
    driver = ProcessDriver(state_dir=tmp_path)
    with pytest.raises(DriverError, match=message):
        await driver.provision(params, Progress())
    assert not (tmp_path / "workloads.json").exists(), "nothing recorded as running"
