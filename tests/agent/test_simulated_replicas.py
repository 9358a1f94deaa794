"""The simulated driver's replicas: on a pretend host (the demo's fleet), a workload that is a server
(``params.serve``) runs for real through the process driver's code -- a real process on a free port,
released by stopping it -- while every other workload stays simulated; and the servers do not outlive
the agent: it stops them as it stops, and reports them exited when it starts again.

The server is the small real one of tests/agent/replica_program.py, so these tests need no model;
tests/e2e/test_demo_endpoint.py runs the demo's real model server on a simulated host."""

import asyncio
import contextlib
import uuid

import pytest

from provisioning.agent import cli
from provisioning.agent.backends.simulated import SimulatedBackend
from provisioning.agent.drivers import DriverError
from provisioning.agent.drivers.process import group_members
from provisioning.agent.drivers.replica import health_status
from provisioning.agent.drivers.simulated import PROVISION_STEPS, RELEASE_STEPS, SimulatedDriver
from provisioning.agent.fleet import FleetMember, run_fleet
from tests.agent.harness import NODE_GPUS, FakeConsole, enrolled, make_agent, running
from tests.agent.test_drivers import Progress
from tests.agent.test_replicas import PROGRAM, SECRET, gone, port_of, replica


def simulated_host(state_dir, **options) -> SimulatedDriver:
    return SimulatedDriver(gpu_count=NODE_GPUS, speed=100, state_dir=state_dir, server_grace_s=2, **options)


# The replica program, deaf to SIGTERM (an ignored signal stays ignored through exec): stopping it takes
# the grace period and a SIGKILL, as a server busy loading its model may.
DEAF_TO_SIGTERM = ["sh", "-c", 'trap "" TERM; exec "$@"', "sh", *PROGRAM]


def provision_command(reservation: str, program: list[str] = PROGRAM) -> dict:
    return {
        "type": "command",
        "id": str(uuid.uuid4()),
        "kind": "provision",
        "params": {"reservation": reservation, "gpus": [0], "serve": {"program": program, "secret": SECRET}},
    }


def plain(gpus: list[int]) -> dict:
    return {"reservation": str(uuid.uuid4()), "gpus": gpus}


async def test_a_replica_on_a_simulated_host_is_a_real_server_and_its_release_stops_it(tmp_path):
    driver = simulated_host(tmp_path)
    params, progress = replica("--ready-after", "0.3", gpus=[1]), Progress()

    detail = await driver.provision(params, progress)
    port = port_of(detail)
    answered = await health_status(port, "/healthz", timeout=2)
    ran = group_members(detail["pid"])
    held = driver.holdings()
    checked = await driver.check_workloads()
    released = await driver.release(params, Progress())

    assert answered == 200, "a real process answers on the address the provisioning reported"
    assert [step for step, _ in progress.reports] == ["start server", "load model", "load model", "ready"]
    assert detail["gpus"] == [1] and ran, "its process ran"
    assert held == {params["reservation"]: (1,)}
    assert checked[params["reservation"]].state == "healthy"
    assert released["stopped"] is True and released["gpus"] == [1]
    assert await gone(detail["pid"]), "no process of the replica is left"
    assert await health_status(port, "/healthz", timeout=1) is None
    assert driver.holdings() == {} and await driver.check_workloads() == {}


async def test_other_workloads_stay_simulated_and_the_two_kinds_keep_to_their_own_gpus(tmp_path):
    driver = simulated_host(tmp_path)
    server = replica(gpus=[0])
    tenant, progress = plain([1]), Progress()

    await driver.provision(server, Progress())
    try:
        detail = await driver.provision(tenant, progress)
        with pytest.raises(DriverError, match="GPU 0 of this node is held by another reservation"):
            await driver.provision(plain([0]), Progress())
        with pytest.raises(DriverError, match="GPU 1 of this node is held by another reservation"):
            await driver.provision(replica(gpus=[1]), Progress())
        held = driver.holdings()
        release = Progress()
        released = await driver.release({"reservation": tenant["reservation"]}, release)
    finally:
        await driver.release({"reservation": server["reservation"]}, Progress())

    assert detail["steps"] == [step for step, _ in PROVISION_STEPS] and "address" not in detail
    assert [step for step, _ in progress.reports[:-1]] == [step for step, _ in PROVISION_STEPS]
    assert held == {server["reservation"]: (0,), tenant["reservation"]: (1,)}
    assert [step for step, _ in release.reports[:-1]] == [step for step, _ in RELEASE_STEPS]
    assert released == {"reservation": tenant["reservation"], "was_provisioned": True, "gpus": [1]}
    assert sorted(path.name for path in (tmp_path / "workloads").iterdir()) == [server["reservation"]], (
        "only the server ran as a process"
    )


async def test_a_replica_that_never_gets_ready_fails_as_on_a_real_host(tmp_path):
    driver = simulated_host(tmp_path)
    with pytest.raises(DriverError, match=r"^the server was not ready within 1 s"):
        await driver.provision(replica("--never-ready", startup_timeout_s=1), Progress())
    assert driver.holdings() == {}


async def test_without_a_state_directory_a_replica_is_simulated_too():
    driver = SimulatedDriver(gpu_count=NODE_GPUS, speed=100)
    detail = await driver.provision(replica(gpus=[0]), Progress())
    assert "address" not in detail and detail["steps"] == [step for step, _ in PROVISION_STEPS]
    assert await driver.check_workloads() == {}


async def test_the_fleet_of_the_demo_gets_simulated_drivers_that_run_servers(tmp_path):
    """What `neocloud-agent fleet --driver simulated` (the demo's agents) builds for a node."""
    args = cli._parser().parse_args(
        ["fleet", "--server", "http://127.0.0.1:9", "--tokens", "t.json", "--state-dir", str(tmp_path)]
    )
    backend = SimulatedBackend(hostname="n1", gpus=NODE_GPUS, seed=1)
    driver = cli._driver(args, tmp_path / "n1", "n1", backend)  # noqa: SLF001 - the CLI's own wiring
    params = replica(gpus=[0])

    detail = await driver.provision(params, Progress())
    try:
        answered = await health_status(port_of(detail), "/healthz", timeout=2)
    finally:
        await driver.release(params, Progress())

    assert (args.driver, driver.name) == ("simulated", "simulated")
    assert answered == 200 and (tmp_path / "n1" / "workloads.json").exists()


async def test_the_agent_stops_its_servers_as_it_stops_and_reports_them_exited_when_it_starts_again(state_dir):
    reservation = str(uuid.uuid4())
    provision = provision_command(reservation)
    async with FakeConsole() as console:
        agent = make_agent(console.url, state_dir, driver=simulated_host(state_dir), workload_check_s=0.1)
        async with running(agent):
            await console.next_frame()  # hello
            await console.send(provision)
            frames = await console.frames_until(lambda frame: frame["type"] == "result")
            pid = frames[-1]["detail"]["pid"]
            running_before_stop = bool(group_members(pid))
        # stopped as SIGTERM stops it: the server went with it
        stopped_with_the_agent = await gone(pid)

        again = make_agent(console.url, state_dir, driver=simulated_host(state_dir), workload_check_s=0.1)
        async with running(again):
            _, hello = await console.next_frame()
            _, report = await console.next_frame()
            await console.send(
                {"type": "command", "id": str(uuid.uuid4()), "kind": "release", "params": {"reservation": reservation}}
            )
            release = await console.frames_until(lambda frame: frame["type"] == "result")
            await asyncio.sleep(0.3)
            workload_frames = []
            while not console.frames.empty():
                _, frame = console.frames.get_nowait()
                workload_frames += [frame] if frame["type"] == "workload" else []

    assert frames[-1]["ok"] is True and frames[-1]["detail"]["address"].startswith("127.0.0.1:")
    assert running_before_stop and stopped_with_the_agent, "a pretend host's server does not outlive its agent"
    assert hello["type"] == "hello"
    assert report == {"type": "workload", "reservation": reservation, "state": "exited", "detail": "the server exited"}
    assert release[-1]["ok"] is True and release[-1]["detail"]["stopped"] is False, "already gone: forgotten"
    assert workload_frames == [], "released: no more reports"


async def test_a_fleet_that_is_stopped_returns_only_once_every_agent_has_stopped_its_servers(tmp_path):
    """One node with a server that takes its time to stop, one without: the one without stops at once,
    and the fleet must still wait for the other to stop its server (else asyncio.run cancels that agent
    again, mid-stop, and the server is left running)."""
    members = [FleetMember(hostname="with-server", token=None), FleetMember(hostname="without", token=None)]
    for member in members:
        enrolled(tmp_path / member.hostname, node=member.hostname)
    reservation = str(uuid.uuid4())
    async with FakeConsole() as hosting, FakeConsole() as idle:

        def build_agent(member: FleetMember, state_dir):
            if member.hostname == "with-server":
                return make_agent(hosting.url, state_dir, driver=simulated_host(state_dir))
            return make_agent(idle.url, state_dir)

        fleet = asyncio.create_task(
            run_fleet(members, server="http://127.0.0.1:9", state_dir=tmp_path, build_agent=build_agent)
        )
        await hosting.next_frame()  # hello
        await idle.next_frame()
        await hosting.send(provision_command(reservation, DEAF_TO_SIGTERM))
        frames = await hosting.frames_until(lambda frame: frame["type"] == "result")
        pid = frames[-1]["detail"]["pid"]
        fleet.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fleet
        left = group_members(pid)  # at once: the fleet has returned

    assert frames[-1]["ok"] is True
    assert left == [], "the fleet returned before its agent had stopped the server"
