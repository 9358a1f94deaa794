"""``neocloud-agent`` as a user runs it, and the fleet host."""

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.agent.cli import main
from provisioning.agent.client import NodeAgent
from provisioning.agent.fleet import FleetMember, load_members, run_fleet
from tests.agent.harness import FakeConsole, enrolled, make_agent, nvml_present


@pytest.mark.skipif(nvml_present(), reason="a test of hosts without NVML; this one has a GPU driver")
def test_gpu_check_without_nvml_exits_2_with_a_clear_message():
    completed = subprocess.run(
        [sys.executable, "-m", "provisioning.agent.cli", "gpu-check"], capture_output=True, text=True, check=False
    )

    assert completed.returncode == 2
    assert (
        completed.stderr.strip() == "neocloud-agent: NVML is not available on this host: NVML Shared Library Not Found"
    )
    assert "Traceback" not in completed.stderr and completed.stdout == ""


def test_gpu_check_prints_inventory_sample_and_call_costs(capsys):
    assert main(["gpu-check", "--backend", "simulated", "--gpus", "2"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "simulated" and len(report["gpus"]) == 2 and len(report["sample"]) == 2
    assert report["call_cost_us"]["energy"] > 1000 * report["call_cost_us"]["utilization"]


def test_run_before_enrolment_says_so(tmp_path, capsys):
    assert main(["run", "--server", "http://127.0.0.1:9", "--state-dir", str(tmp_path), "--backend", "simulated"]) == 1
    assert "enrol this host first" in capsys.readouterr().err


def test_a_bad_server_address_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--server", "console:8000", "--state-dir", str(tmp_path)])
    assert exited.value.code == 2


def test_the_tokens_file_is_validated(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            [
                {"hostname": "n1", "token": "ncb_1", "gpu_name": "NVIDIA H200", "gpu_memory_mib": 144384, "gpus": 8},
                {"hostname": "n2", "token": None},
            ]
        )
    )
    assert load_members(tokens) == [
        FleetMember("n1", "ncb_1", gpus=8, gpu_name="NVIDIA H200", gpu_memory_mib=144384),
        FleetMember("n2", None),
    ]

    tokens.write_text(json.dumps([{"hostname": "../n1", "token": "t"}]))
    with pytest.raises(ValueError, match="hostname"):
        load_members(tokens)
    tokens.write_text(json.dumps([{"hostname": "n1", "token": None}, {"hostname": "n1", "token": None}]))
    with pytest.raises(ValueError, match="twice"):
        load_members(tokens)
    tokens.write_text(json.dumps([{"hostname": "n1", "token": None, "gpus": "eight"}]))
    with pytest.raises(ValueError, match="gpus"):
        load_members(tokens)


async def test_a_fleet_runs_each_node_with_its_own_connection_and_secret(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    enrolled(tmp_path / "n1", secret="ncn_one", node="n1")
    enrolled(tmp_path / "n2", secret="ncn_two", node="n2")
    enrolled(tmp_path / "n3", secret="ncn_revoked", node="n3")
    members = [FleetMember(name, None) for name in ("n1", "n2", "n3", "n4")]

    async with FakeConsole(secrets={"ncn_one", "ncn_two"}) as console:

        def build_agent(member: FleetMember, member_dir: Path) -> NodeAgent:
            return make_agent(console.url, member_dir)

        fleet = asyncio.create_task(run_fleet(members, server=console.url, state_dir=tmp_path, build_agent=build_agent))
        hellos = {(await console.next_frame())[0] for _ in range(2)}
        await asyncio.sleep(0.1)
        fleet.cancel()
        await asyncio.wait([fleet])

    assert len(hellos) == 2, "two connections said hello"
    assert sorted(console.authorizations) == ["Bearer ncn_one", "Bearer ncn_revoked", "Bearer ncn_two"]
    assert "n3: refused (close code 4401)" in caplog.text, "a refused node stops alone"
    assert "n4: stopped (no stored secret and no token to enrol with)" in caplog.text


async def agent_process(server: str, state_dir) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provisioning.agent.cli",
        "run",
        "--server",
        server,
        "--state-dir",
        str(state_dir),
        "--backend",
        "simulated",
        "--driver",
        "simulated",
        stderr=asyncio.subprocess.PIPE,
    )


async def test_a_single_node_agent_exits_3_when_its_secret_is_refused(state_dir):
    async with FakeConsole(secrets={"ncn_another"}) as console:
        process = await agent_process(console.url, state_dir)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)

    assert process.returncode == 3
    assert "refused this node's secret (close code 4401" in stderr.decode()


async def test_a_single_node_agent_stops_cleanly_on_sigterm(state_dir):
    async with FakeConsole() as console:
        process = await agent_process(console.url, state_dir)
        _, frame = await console.next_frame()
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 10)

    assert frame["type"] == "hello"
    assert process.returncode == 0
    assert "stopped by signal" in stderr.decode()
