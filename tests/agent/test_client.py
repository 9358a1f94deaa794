"""The agent against a real WebSocket server playing the console: authentication, hello, heartbeats,
commands applied once across duplicates, reconnects and restarts, refusal, rotation, bad frames."""

import asyncio
import random
import stat

import pytest

from provisioning.agent.backends.simulated import SimulatedBackend
from provisioning.agent.client import AgentRefused, Backoff, backoff_delay
from provisioning.agent.credentials import load_credentials
from provisioning.agent.journal import INTERRUPTED
from tests.agent.harness import NODE, SECRET, CountingDriver, FakeConsole, make_agent, running

RESERVATION = "5a0c2a55-8f7e-4d5c-9a51-0d6f0b0e8c11"


def provision(command_id: str = "c0ffee00-0000-4000-8000-000000000001") -> dict:
    return {
        "type": "command",
        "id": command_id,
        "kind": "provision",
        "params": {"reservation": RESERVATION, "gpus": 8},
        "deadline": "2030-01-01T00:00:00Z",
    }


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
