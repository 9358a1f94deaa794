"""The process driver's replicas (``params.serve``): a server started on a free port with its secret in
its environment, ready before the provisioning succeeds, stopped when it never gets ready or exits;
its health checked after start (hung, killed, back), after an agent restart too; and the agent
reporting a server that died in a ``workload`` frame.

The server here is a small real one (replica_program.py, the standard library only), so these tests
need no model; tests/agent/test_serving.py runs the real model server as a replica."""

import asyncio
import json
import os
import signal
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest

from provisioning.agent.drivers import process
from provisioning.agent.drivers.base import DriverError, WorkloadHealth
from provisioning.agent.drivers.process import ProcessDriver, group_members
from provisioning.agent.drivers.replica import health_status
from tests.agent.harness import NODE_GPUS, FakeConsole, make_agent, running
from tests.agent.test_drivers import Progress

PROGRAM = [sys.executable, str(Path(__file__).with_name("replica_program.py"))]
SECRET = "nrs_0123456789abcdef0123456789abcdef"


def replica(*arguments: str, gpus: list[int] | None = None, **serve) -> dict:
    return {
        "reservation": str(uuid.uuid4()),
        "gpus": [0] if gpus is None else gpus,
        "serve": {"program": [*PROGRAM, *arguments], "secret": SECRET, **serve},
    }


def port_of(detail: dict) -> int:
    host, port = detail["address"].split(":")
    assert host == "127.0.0.1"
    return int(port)


async def started(state_dir: Path, params: dict) -> dict:
    """What the replica program recorded about its start (its pid, arguments, environment)."""
    return json.loads(await written_json(state_dir / "workloads" / params["reservation"] / "started.json"))


async def written_json(path: Path) -> str:
    for _ in range(250):
        if path.exists():
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"the replica never wrote {path}")


async def gone(pid: int) -> bool:
    for _ in range(100):
        if not group_members(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_replica_gets_a_free_port_and_its_secret_and_is_ready_when_the_provisioning_succeeds(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    params, progress = replica("--ready-after", "0.5", gpus=[1]), Progress()

    detail = await driver.provision(params, progress)
    port = port_of(detail)
    status_when_provisioned = await health_status(port, "/healthz", timeout=2)
    start = await started(tmp_path, params)
    command_line = Path(f"/proc/{detail['pid']}/cmdline").read_bytes().decode()
    released = await driver.release(params, Progress())

    assert status_when_provisioned == 200, "ready before the provisioning succeeds"
    assert [step for step, _ in progress.reports] == ["start server", "load model", "load model", "ready"]
    assert [percent for _, percent in progress.reports] == [0, 10, 50, 100]
    assert detail["gpus"] == [1] and detail["command"][-2:] == ["--port", str(port)]
    assert start["argv"][-2:] == ["--port", str(port)]
    assert start["environment"]["NEOCLOUD_REPLICA_SECRET"] == SECRET
    assert start["environment"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert start["environment"]["PATH"].split(":")[0] == sysconfig.get_path("scripts"), "neocloud-serve is found"
    assert SECRET not in command_line and SECRET not in json.dumps(detail), "the secret is never on a command line"
    assert released["stopped"] is True and await gone(detail["pid"])
    assert await health_status(port, "/healthz", timeout=1) is None


async def test_a_replica_never_ready_fails_the_provisioning_at_its_startup_timeout_and_is_stopped(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    params = replica("--never-ready", startup_timeout_s=1)

    with pytest.raises(DriverError, match=r"^the server was not ready within 1 s \(GET /healthz on 127\.0\.0\.1:\d+: "):
        await driver.provision(params, Progress())
    start = await started(tmp_path, params)

    assert await gone(start["pid"]), "nothing of a replica that never served is left running"
    assert driver.holdings() == {} and json.loads((tmp_path / "workloads.json").read_text()) == {}


async def test_the_timeout_error_says_what_the_health_route_last_answered(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    with pytest.raises(DriverError) as refused:
        await driver.provision(replica("--never-ready", startup_timeout_s=1), Progress())
    assert ": HTTP 503)" in str(refused.value) and "its last output: 'listening on 127.0.0.1:" in str(refused.value)


async def test_a_replica_that_exits_while_starting_fails_the_provisioning_with_its_last_output(tmp_path):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    params = {
        "reservation": str(uuid.uuid4()),
        "gpus": [0],
        "serve": {"program": ["sh", "-c", "echo 'no model in /models/x' >&2; exit 3", "server"], "secret": SECRET},
    }

    with pytest.raises(DriverError, match=r"^the server exited with status 3 before it was ready; its last output: "):
        await driver.provision(params, Progress())
    assert driver.holdings() == {}
    with pytest.raises(DriverError, match="'no model in /models/x'"):
        await driver.provision(params, Progress())


@pytest.mark.parametrize(
    ("serve", "message"),
    [
        pytest.param("neocloud-serve", "params.serve must be an object", id="not an object"),
        pytest.param({"secret": SECRET}, "params.serve.program must be a non-empty list", id="no program"),
        pytest.param({"program": [], "secret": SECRET}, "params.serve.program", id="an empty program"),
        pytest.param({"program": ["serve", 8000], "secret": SECRET}, "params.serve.program", id="not strings"),
        pytest.param({"program": PROGRAM}, "params.serve.secret must be a non-empty string", id="no secret"),
        pytest.param({"program": PROGRAM, "secret": ""}, "params.serve.secret", id="an empty secret"),
        pytest.param({"program": PROGRAM, "secret": SECRET, "port_arg": "port"}, "port_arg", id="port_arg"),
        pytest.param({"program": PROGRAM, "secret": SECRET, "health_path": "healthz"}, "health_path", id="path"),
        pytest.param({"program": PROGRAM, "secret": SECRET, "startup_timeout_s": 0}, "startup_timeout_s", id="0 s"),
        pytest.param({"program": PROGRAM, "secret": SECRET, "startup_timeout_s": True}, "startup_timeout_s", id="bool"),
        pytest.param({"program": PROGRAM, "secret": SECRET, "startup_timeout_s": 1e9}, "at most 3600", id="forever"),
    ],
)
async def test_a_malformed_serve_is_refused_before_anything_starts(tmp_path, serve, message):
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS)
    progress = Progress()
    with pytest.raises(DriverError, match=message):
        await driver.provision({"reservation": str(uuid.uuid4()), "gpus": [0], "serve": serve}, progress)
    assert progress.reports == [] and not (tmp_path / "workloads").exists()


async def test_a_command_and_a_serve_together_are_refused(tmp_path):
    params = {**replica(), "command": ["sleep", "60"]}
    with pytest.raises(DriverError, match="params.command or params.serve, not both"):
        await ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS).provision(params, Progress())


async def test_the_health_of_a_running_replica_is_checked_hung_killed_and_back(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "PROBE_TIMEOUT_S", 0.3)
    driver = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    params = replica()
    reservation = params["reservation"]
    detail = await driver.provision(params, Progress())
    plain = await driver.provision(
        {"reservation": str(uuid.uuid4()), "gpus": [1], "command": ["sleep", "60"]}, Progress()
    )
    try:
        healthy = await driver.check_workloads()
        os.killpg(detail["pid"], signal.SIGSTOP)  # it runs, but answers nothing
        once = await driver.check_workloads()
        twice = await driver.check_workloads()
        os.killpg(detail["pid"], signal.SIGCONT)
        back = await driver.check_workloads()
        os.killpg(detail["pid"], signal.SIGKILL)
        assert await gone(detail["pid"])
        exited = await driver.check_workloads()
        held = driver.holdings()
    finally:
        await driver.release(params, Progress())
        await driver.release({"reservation": plain["reservation"]}, Progress())

    assert healthy == {reservation: WorkloadHealth("healthy")}, "a plain workload has no health route to check"
    assert once[reservation].state == "healthy", "one missed check is not yet unhealthy"
    assert twice[reservation].state == "unhealthy"
    assert twice[reservation].detail == (
        f"GET /healthz on {detail['address']} did not answer (2 checks in a row, 0.3 s each at most)"
    )
    assert back == {reservation: WorkloadHealth("healthy")}
    assert exited == {reservation: WorkloadHealth("exited", "the server was killed by SIGKILL")}
    assert reservation not in held, "a replica that exited holds no GPU"
    assert await driver.check_workloads() == {}, "released: nothing to check"


async def test_a_restarted_agent_still_checks_and_releases_a_replica(tmp_path):
    params = replica()
    detail = await ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS).provision(params, Progress())

    restarted = ProcessDriver(state_dir=tmp_path, gpu_count=NODE_GPUS, grace_s=2)
    checked = await restarted.check_workloads()
    again = await restarted.provision(params, Progress())
    released = await restarted.release(params, Progress())

    assert checked == {params["reservation"]: WorkloadHealth("healthy")}
    assert (again["already_running"], again["address"]) == (True, detail["address"])
    assert released["stopped"] is True and await gone(detail["pid"])


async def test_the_agent_reports_a_replica_that_died_and_says_it_again_after_a_reconnect(state_dir):
    driver = ProcessDriver(state_dir=state_dir, gpu_count=NODE_GPUS, grace_s=2)
    reservation = str(uuid.uuid4())
    command = {
        "type": "command",
        "id": str(uuid.uuid4()),
        "kind": "provision",
        "params": {"reservation": reservation, "gpus": [0, 1], "serve": {"program": PROGRAM, "secret": SECRET}},
    }
    async with FakeConsole() as console:
        agent = make_agent(console.url, state_dir, driver=driver, workload_check_s=0.1)
        async with running(agent):
            await console.next_frame()  # hello
            await console.send(command)
            frames = await console.frames_until(lambda frame: frame["type"] == "result")
            await asyncio.sleep(0.3)  # a few checks of a healthy replica: no frame
            os.killpg(frames[-1]["detail"]["pid"], signal.SIGKILL)
            _, report = await console.next_frame(skip=("heartbeat",))
            await console.drop()
            _, hello = await console.next_frame()
            _, again = await console.next_frame()
            await console.send(
                {"type": "command", "id": str(uuid.uuid4()), "kind": "release", "params": {"reservation": reservation}}
            )
            release = await console.frames_until(lambda frame: frame["type"] == "result")
            await asyncio.sleep(0.3)
            after = [frame for _, frame in _drain(console)]

    result = frames[-1]
    assert result["ok"] is True and result["detail"]["address"].startswith("127.0.0.1:")
    assert [frame["step"] for frame in frames if frame["type"] == "progress"][0] == "start server"
    assert report == {
        "type": "workload",
        "reservation": reservation,
        "state": "exited",
        "detail": "the server was killed by SIGKILL",
    }
    assert hello["type"] == "hello" and again == report, "what is still wrong is said again on a new connection"
    assert release[-1]["ok"] is True
    assert [frame for frame in after if frame["type"] == "workload"] == [], "released: no more reports"


def _drain(console: FakeConsole) -> list[tuple[int, dict]]:
    frames = []
    while not console.frames.empty():
        frames.append(console.frames.get_nowait())
    return frames
