"""The agent against a real WebSocket server playing the console: authentication, hello, heartbeats,
commands applied once across duplicates, reconnects and restarts, refusal, rotation, bad frames; several
reservations on one node, each on its GPUs."""

import asyncio
import random
import stat
import uuid
from pathlib import Path

import pytest

from provisioning.agent.backends.base import GpuReading
from provisioning.agent.backends.simulated import SimulatedBackend
from provisioning.agent.client import AgentRefused, Backoff, backoff_delay
from provisioning.agent.credentials import load_credentials
from provisioning.agent.drivers.process import ProcessDriver, group_members
from provisioning.agent.journal import INTERRUPTED
from tests.agent.harness import NODE, NODE_GPUS, SECRET, CountingDriver, FakeConsole, make_agent, running

RESERVATION = "5a0c2a55-8f7e-4d5c-9a51-0d6f0b0e8c11"


def provision(
    command_id: str = "c0ffee00-0000-4000-8000-000000000001",
    *,
    reservation: str = RESERVATION,
    gpus: list[int] | int | None = None,
    **params,
) -> dict:
    return {
        "type": "command",
        "id": command_id,
        "kind": "provision",
        "params": {
            "reservation": reservation,
            "gpus": list(range(NODE_GPUS)) if gpus is None else gpus,
            "gpu_vendor": "nvidia",
            **params,
        },
        "deadline": "2030-01-01T00:00:00Z",
    }


def release(command_id: str, reservation: str) -> dict:
    return {"type": "command", "id": command_id, "kind": "release", "params": {"reservation": reservation}}


def is_result(frame: dict) -> bool:
    return frame["type"] == "result"


async def hello(console: FakeConsole) -> dict:
    """The next hello (progress of an apply from before a reconnect or restart may come first)."""
    _, frame = await console.next_frame(skip=("heartbeat", "progress"))
    assert frame["type"] == "hello"
    return frame


async def test_it_authenticates_with_its_secret_and_says_hello_with_its_inventory(state_dir):
    async with FakeConsole() as console, running(make_agent(console.url, state_dir)):
        frame = await hello(console)
        beats = [await console.next_frame(skip=()) for _ in range(2)]

    assert console.authorizations == [f"Bearer {SECRET}"]
    assert frame["agent_version"] == "0.1.0"
    assert frame["backend"] == "simulated"
    assert frame["driver_version"] == "580.159.04"
    assert [gpu["index"] for gpu in frame["gpus"]] == [0, 1]
    assert set(frame["gpus"][0]) == {"index", "uuid", "name", "memory_mib", "power_limit_w"}
    assert frame["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert [beat for _, beat in beats] == [{"type": "heartbeat", "seq": 1}, {"type": "heartbeat", "seq": 2}]


async def test_a_command_is_acknowledged_then_progresses_then_reports_its_result(state_dir):
    clock = [0.0]
    backend = SimulatedBackend(hostname=NODE, gpus=2, seed=1, clock=lambda: clock[0])
    async with FakeConsole() as console, running(make_agent(console.url, state_dir, backend=backend)):
        await hello(console)
        await console.send(provision())
        frames = await console.frames_until(is_result)
        clock[0] += 30
        loaded = backend.sample()

    command_id = provision()["id"]
    assert frames[0] == {"type": "ack", "command": command_id}
    progress = frames[1:-1]
    assert progress and all(frame["type"] == "progress" and frame["command"] == command_id for frame in progress)
    percents = [frame["percent"] for frame in progress]
    assert percents == sorted(percents) and percents[-1] == 100
    assert [frame["step"] for frame in progress][:2] == ["wipe disks", "flash image"]
    assert frames[-1]["ok"] is True and frames[-1]["detail"]["reservation"] == RESERVATION
    assert all(reading.power_w > 600 for reading in loaded), "the GPUs run under load once provisioned"


async def test_a_command_sent_twice_while_applying_is_applied_once(state_dir):
    driver = CountingDriver(speed=10)
    async with FakeConsole() as console, running(make_agent(console.url, state_dir, driver=driver)):
        await hello(console)
        await console.send(provision())
        await console.send(provision())
        frames = await console.frames_until(is_result)
        await console.send(provision())
        _, again_ack = await console.next_frame()
        _, again_result = await console.next_frame()

    assert [frame["type"] for frame in frames].count("ack") == 2
    assert [frame["type"] for frame in frames].count("result") == 1
    assert again_ack == {"type": "ack", "command": provision()["id"]}
    assert again_result == frames[-1], "a finished command is answered with its stored result"
    assert driver.provisions == 1


async def test_an_apply_outlives_a_dropped_connection_and_its_result_arrives_on_the_next(state_dir):
    driver = CountingDriver(speed=8)  # ~0.5 s of provisioning
    async with FakeConsole() as console, running(make_agent(console.url, state_dir, driver=driver)):
        await hello(console)
        await console.send(provision())
        assert (await console.next_frame())[1]["type"] == "ack"
        await console.drop()
        await hello(console)
        await console.send(provision())  # the console re-pushes unfinished commands on reconnect
        frames = []
        while not frames or frames[-1][1]["type"] != "result":
            frames.append(await console.next_frame(skip=("heartbeat", "progress")))
        await console.drop()
        await hello(console)
        await console.send(provision())
        _, again_ack = await console.next_frame()
        _, again_result = await console.next_frame()

    ack = {"type": "ack", "command": provision()["id"]}
    assert frames[:-1] == [(1, ack)], "still applying: the re-push is only acknowledged"
    number, result = frames[-1]
    assert number == 1 and result["ok"] is True, "the result goes out on the connection that is up"
    assert (again_ack, again_result) == (ack, result)
    assert driver.provisions == 1


async def test_a_finished_command_is_not_applied_again_by_a_restarted_agent(state_dir):
    first_driver = CountingDriver()
    async with FakeConsole() as console:
        async with running(make_agent(console.url, state_dir, driver=first_driver)):
            await hello(console)
            await console.send(provision())
            first = (await console.frames_until(is_result))[-1]
        second_driver = CountingDriver()
        async with running(make_agent(console.url, state_dir, driver=second_driver)):
            await hello(console)
            await console.send(provision())
            frames = [(await console.next_frame())[1] for _ in range(2)]

    assert frames == [{"type": "ack", "command": provision()["id"]}, first]
    assert (first_driver.provisions, second_driver.provisions) == (1, 0)


async def test_a_command_cut_off_by_a_restart_is_reported_interrupted_not_applied_again(state_dir):
    first_driver = CountingDriver(speed=0.5)  # provisioning would take ~8 s
    async with FakeConsole() as console:
        async with running(make_agent(console.url, state_dir, driver=first_driver)):
            await hello(console)
            await console.send(provision())
            assert (await console.next_frame())[1]["type"] == "ack"
        second_driver = CountingDriver()
        async with running(make_agent(console.url, state_dir, driver=second_driver)):
            await hello(console)
            await console.send(provision())
            frames = await console.frames_until(is_result)

    assert frames[0]["type"] == "ack"
    assert frames[-1] == {
        "type": "result",
        "command": provision()["id"],
        "ok": False,
        "detail": {},
        "error": INTERRUPTED,
    }
    assert (first_driver.provisions, second_driver.provisions) == (1, 0)


async def test_a_failed_provisioning_is_reported_and_leaves_the_gpus_idle(state_dir):
    clock = [0.0]
    backend = SimulatedBackend(hostname=NODE, gpus=2, seed=1, clock=lambda: clock[0])
    driver = CountingDriver(fail_step="flash image")
    async with FakeConsole() as console, running(make_agent(console.url, state_dir, driver=driver, backend=backend)):
        await hello(console)
        await console.send(provision())
        result = (await console.frames_until(is_result))[-1]
        clock[0] += 30

    assert result["ok"] is False and "flash image" in result["error"]
    assert all(reading.power_w < 80 for reading in backend.sample())


async def test_a_refused_provisioning_is_journaled_and_its_refusal_re_sent_not_applied_again(state_dir):
    driver = CountingDriver()
    command = provision(gpus=[1, 2])  # this node has GPUs 0 and 1
    async with FakeConsole() as console, running(make_agent(console.url, state_dir, driver=driver)):
        await hello(console)
        await console.send(command)
        refused = (await console.frames_until(is_result))[-1]
        await console.send(command)
        again = [(await console.next_frame())[1] for _ in range(2)]

    assert refused["ok"] is False
    assert refused["error"] == "params.gpus names GPU 2, which this node does not have (its 2 GPUs are 0 to 1)"
    assert again == [{"type": "ack", "command": command["id"]}, refused]
    assert driver.provisions == 1


def gpu_power(samples: list[list[GpuReading]], index: int) -> list[float]:
    return [sample[index].power_w for sample in samples]


async def test_only_the_rented_gpus_run_under_load_and_a_release_idles_only_its_own(state_dir):
    clock = [0.0]
    backend = SimulatedBackend(hostname=NODE, gpus=4, seed=1, clock=lambda: clock[0])
    driver = CountingDriver(gpu_count=4)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    async with FakeConsole() as console, running(make_agent(console.url, state_dir, driver=driver, backend=backend)):
        await hello(console)
        await console.send(provision("p1", reservation=first, gpus=[0, 1]))
        provisioned = (await console.frames_until(is_result))[-1]
        clock[0] += 30
        one_tenant = [backend.sample() for _ in range(5)]
        await console.send(provision("p2", reservation=second, gpus=[2, 3]))
        await console.frames_until(is_result)
        clock[0] += 30
        two_tenants = [backend.sample() for _ in range(5)]
        await console.send(release("r1", first))
        await console.frames_until(is_result)
        clock[0] += 60
        after_release = [backend.sample() for _ in range(5)]

    assert provisioned["ok"] is True and provisioned["detail"]["gpus"] == [0, 1]
    assert [min(gpu_power(one_tenant, gpu)) > 600 for gpu in range(4)] == [True, True, False, False]
    assert [max(gpu_power(one_tenant, gpu)) < 80 for gpu in range(4)] == [False, False, True, True]
    assert all(min(gpu_power(two_tenants, gpu)) > 600 for gpu in range(4))
    assert [max(gpu_power(after_release, gpu)) < 80 for gpu in range(4)] == [True, True, False, False]
    assert all(min(gpu_power(after_release, gpu)) > 600 for gpu in (2, 3)), "the other tenant's GPUs stay loaded"


async def no_progress(step: str, percent: int) -> None:
    """Where the progress of a release the test makes itself goes."""


async def written(path: Path) -> str:
    for _ in range(250):
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"the workload never wrote {path}")


async def test_two_tenants_workloads_on_one_agent_run_apart_and_outlive_its_restart(state_dir):
    clock = [0.0]
    backend = SimulatedBackend(hostname=NODE, gpus=4, seed=1, clock=lambda: clock[0])
    driver = ProcessDriver(state_dir=state_dir, gpu_count=4, grace_s=2)
    workload = ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES > visible; sleep 600"]
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        async with FakeConsole() as console:
            async with running(make_agent(console.url, state_dir, driver=driver, backend=backend)):
                await hello(console)
                await console.send(provision("p1", reservation=first, gpus=[0, 1], command=workload))
                one = (await console.frames_until(is_result))[-1]["detail"]
                await console.send(provision("p2", reservation=second, gpus=[2, 3], command=workload))
                two = (await console.frames_until(is_result))[-1]["detail"]
                visible = [await written(state_dir / "workloads" / r / "visible") for r in (first, second)]
                await console.send(release("r1", first))
                released = (await console.frames_until(is_result))[-1]
            # The agent stops (an upgrade, say) and leaves the workload running; the next one finds it.
            driver = ProcessDriver(state_dir=state_dir, gpu_count=4, grace_s=2)
            restarted = SimulatedBackend(hostname=NODE, gpus=4, seed=1, clock=lambda: clock[0])
            async with running(make_agent(console.url, state_dir, driver=driver, backend=restarted)):
                await hello(console)
                clock[0] += 30
                after_restart = [restarted.sample() for _ in range(5)]

        assert visible == ["0,1\n", "2,3\n"]
        assert released["ok"] is True and released["detail"]["gpus"] == [0, 1]
        assert group_members(one["pid"]) == []
        assert group_members(two["pid"]), "the other tenant's workload was left running"
        assert [max(gpu_power(after_restart, gpu)) < 80 for gpu in range(4)] == [True, True, False, False]
        assert all(min(gpu_power(after_restart, gpu)) > 600 for gpu in (2, 3)), "its GPUs are busy again"
    finally:
        await driver.release({"reservation": second}, no_progress)


async def test_health_check_and_unknown_kinds_get_results(state_dir):
    async with FakeConsole() as console, running(make_agent(console.url, state_dir)):
        await hello(console)
        await console.send({"type": "command", "id": "h1", "kind": "health_check", "params": {}})
        health = (await console.frames_until(is_result))[-1]
        await console.send({"type": "command", "id": "x1", "kind": "reboot_into_bios", "params": {}})
        unknown = (await console.frames_until(is_result))[-1]

    assert health["ok"] is True
    assert health["detail"]["gpus"][0] | {"uuid": None} == {
        "index": 0,
        "uuid": None,
        "ecc_uncorrected": 0,
        "xid_count": 0,
    }
    assert unknown["ok"] is False and "reboot_into_bios" in unknown["error"]


async def test_unknown_and_malformed_frames_are_answered_with_errors_and_the_connection_stays(state_dir):
    async with FakeConsole() as console, running(make_agent(console.url, state_dir)):
        await hello(console)
        await console.send({"type": "surprise"})
        _, unknown = await console.next_frame()
        await console.send("not json")
        _, malformed = await console.next_frame()
        await console.send({"type": "command", "kind": "provision"})
        _, no_id = await console.next_frame()
        await console.send({"type": "error", "code": "bad_frame", "message": "refused"})  # logged, not answered
        number, beat = await console.next_frame(skip=())

    assert unknown["type"] == "error" and unknown["code"] == "unknown_type" and "surprise" in unknown["message"]
    assert malformed["code"] == "bad_frame" and no_id["code"] == "bad_frame"
    assert (number, beat["type"]) == (0, "heartbeat")
    assert len(console.connections) == 1


@pytest.mark.parametrize("refusal", [{"secrets": {"ncn_someone_else"}}, {"refuse_http": 403}])
async def test_a_refused_secret_stops_the_agent_without_retrying(state_dir, refusal):
    async with FakeConsole(**refusal) as console:
        agent = make_agent(console.url, state_dir)
        with pytest.raises(AgentRefused) as refused:
            await agent.run()
        await asyncio.sleep(0.1)

    assert refused.value.code == (4401 if "secrets" in refusal else 4403)
    assert len(console.authorizations) == 1
    assert agent.state == "stopped"


async def test_a_rotated_secret_is_stored_and_used_from_the_next_connection(state_dir):
    async with FakeConsole() as console, running(make_agent(console.url, state_dir)):
        await hello(console)
        await console.send({"type": "rotate_secret", "secret": "ncn_new_fedcba9876543210"})
        _, rotated = await console.next_frame()
        stored = load_credentials(state_dir)
        mode = stat.S_IMODE((state_dir / "credentials.json").stat().st_mode)
        await console.drop()
        await hello(console)

    assert rotated == {"type": "secret_rotated"}
    assert (stored.node, stored.secret) == (NODE, "ncn_new_fedcba9876543210")
    assert mode == 0o600
    assert console.authorizations == [f"Bearer {SECRET}", "Bearer ncn_new_fedcba9876543210"]


async def test_it_reconnects_after_the_console_goes_away(state_dir):
    async with FakeConsole() as console, running(make_agent(console.url, state_dir)):
        await hello(console)
        await console.drop()
        number, _ = await console.next_frame(skip=("heartbeat",))
    assert number == 1


def test_backoff_doubles_from_one_second_to_sixty_with_half_jitter():
    rng = random.Random(7)
    for attempt, nominal in enumerate([1, 2, 4, 8, 16, 32, 60, 60, 60]):
        delays = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0.5 * nominal <= delay <= 1.5 * nominal for delay in delays)
        assert max(delays) - min(delays) > 0.5 * nominal, "jittered over most of ±50 %"
    assert backoff_delay(10_000, rng=rng) <= 90


def test_backoff_resets_only_after_a_connection_that_lasted_thirty_seconds():
    backoff = Backoff(jitter=0, rng=random.Random(1))
    assert [backoff.next_delay() for _ in range(4)] == [1, 2, 4, 8]
    backoff.connection_lasted(29.9)
    assert backoff.next_delay() == 16
    backoff.connection_lasted(30)
    assert backoff.next_delay() == 1
