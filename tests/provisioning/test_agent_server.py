"""The console's side of docs/agent-protocol.md, over real WebSockets into the real ASGI application,
with the Redis channel layer and PostgreSQL."""

import asyncio
import json
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from console.asgi import application
from marketplace.choices import ReservationState
from marketplace.models import Reservation
from marketplace.services.reservations.lifecycle import reservation_begin, reservation_cancel, reservation_create
from marketplace.services.reservations.provisioning import reservation_provision_start, reservation_teardown_start
from provisioning.choices import CommandState, NodeState
from provisioning.models import Node, NodeCommand, NodeCredential
from provisioning.services.agents import (
    bootstrap_token_create,
    node_command_issue,
    node_commands_expire,
    node_secret_revoke,
    node_secret_rotate,
    nodes_mark_silent_offline,
)
from tests.factories import OfferFactory, make_node

pytestmark = pytest.mark.django_db(transaction=True)
H100 = "NVIDIA H100 80GB HBM3"


def enrol(node) -> str:
    token = bootstrap_token_create(node=node, actor="test")
    response = Client().post(
        "/agent/v1/enroll",
        {"token": token, "hostname": node.hostname, "agent_version": "9.9"},
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    return response.json()["secret"]


def hello(node, uuids=None) -> dict:
    uuids = uuids or [f"GPU-{node.hostname}-{i}" for i in range(8)]
    return {
        "type": "hello",
        "agent_version": "0.1.0",
        "driver_version": "580.159.04",
        "backend": "simulated",
        "gpus": [
            {"index": i, "uuid": uuid, "name": H100, "memory_mib": 81559, "power_limit_w": 700}
            for i, uuid in enumerate(uuids)
        ],
    }


class Agent:
    """A WebSocket client speaking the agent's side, frame by frame."""

    def __init__(self, secret: str):
        self.ws = WebsocketCommunicator(
            application, "/agent/v1/", headers=[(b"authorization", f"Bearer {secret}".encode())]
        )

    async def connect(self):
        connected, _ = await self.ws.connect(timeout=15)  # generous for busy CI machines
        return connected

    async def send(self, frame: dict):
        await self.ws.send_to(text_data=json.dumps(frame))

    async def receive(self, timeout: float = 15) -> dict:
        return json.loads(await self.ws.receive_from(timeout))

    async def expect(self, kind: str, timeout: float = 15) -> dict:
        while True:
            frame = await self.receive(timeout)
            if frame["type"] == kind:
                return frame

    async def closed_with(self) -> int:
        output = await self.ws.receive_output(15)
        return output.get("code")

    async def start(self, node, **hello_kwargs) -> dict:
        """Connect and send the inventory; returns once the console has taken it in (so a test's next
        step never races the hello, however busy the machine)."""
        assert await self.connect()
        welcome = await self.expect("welcome")
        frame = hello(node, **hello_kwargs)
        await self.send(frame)
        uuids = {gpu["uuid"] for gpu in frame["gpus"]}
        deadline = asyncio.get_running_loop().time() + 15
        while asyncio.get_running_loop().time() < deadline:
            if await db(_inventory_is)(node.pk, uuids):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # the consumer sends unfinished commands right after storing the inventory
        return welcome

    async def close(self):
        await self.ws.disconnect()


def _inventory_is(node_id: int, uuids: set[str]) -> bool:
    node = Node.objects.get(pk=node_id)
    return node.agent_version == "0.1.0" and set(node.gpus.values_list("uuid", flat=True)) == uuids


def run(coroutine_function):
    return async_to_sync(coroutine_function)()


db = database_sync_to_async


class TestEnrolment:
    def test_a_bootstrap_token_is_exchanged_once_for_the_nodes_secret(self):
        node = make_node(state=NodeState.ENROLLING)
        token = bootstrap_token_create(node=node, actor="ops")
        body = {"token": token, "hostname": node.hostname}
        first = Client().post("/agent/v1/enroll", body, content_type="application/json")
        assert first.status_code == 200 and first.json()["secret"].startswith("ncn_")
        assert first.json()["secret"] not in str(NodeCredential.objects.values().first())
        again = Client().post("/agent/v1/enroll", body, content_type="application/json")
        assert again.status_code == 403 and "already used" in again.json()["error"]["message"]

    @pytest.mark.parametrize("problem", ["expired", "other host", "garbage", "no json", "missing"])
    def test_bad_enrolments_are_refused_clearly(self, problem):
        node = make_node()
        token = bootstrap_token_create(node=node, actor="ops", hours=1)
        body = {"token": token, "hostname": node.hostname}
        if problem == "expired":
            node.bootstrap_tokens.update(expires_at=timezone.now() - timedelta(seconds=1))
        elif problem == "other host":
            body["hostname"] = "someone-else"
        elif problem == "garbage":
            body["token"] = "ncb_nope_nope"
        payload = "not json" if problem == "no json" else json.dumps({} if problem == "missing" else body)
        response = Client().post("/agent/v1/enroll", payload, content_type="application/json")
        assert response.status_code in (400, 403) and response.json()["error"]["message"]
        assert not NodeCredential.objects.exists()


class TestConnection:
    def test_a_good_secret_gets_welcome_and_hello_reconciles_inventory(self):
        node = make_node(state=NodeState.ENROLLING)
        secret = enrol(node)

        async def scenario():
            agent = Agent(secret)
            welcome = await agent.start(node)
            await agent.send({"type": "heartbeat", "seq": 1})
            await asyncio.sleep(0.3)
            await agent.close()
            return welcome

        welcome = run(scenario)
        assert welcome["node"] == node.hostname and welcome["heartbeat_seconds"] > 0
        node.refresh_from_db()
        assert node.state == NodeState.AVAILABLE and node.agent_version == "0.1.0"
        assert node.last_seen_at is not None and node.driver_version == "580.159.04"
        assert set(node.gpus.values_list("uuid", flat=True)) == {f"GPU-{node.hostname}-{i}" for i in range(8)}

    @pytest.mark.parametrize("secret", ["", "ncn_deadbeef_nope", "Bearer", "nck_api_key_not_a_node"])
    def test_a_bad_secret_is_closed_with_4401(self, secret):
        async def scenario():
            agent = Agent(secret)
            assert await agent.connect()
            return await agent.closed_with()

        assert run(scenario) == 4401

    def test_a_revoked_secret_is_disconnected_and_then_refused(self):
        node = make_node()
        secret = enrol(node)

        async def scenario():
            agent = Agent(secret)
            await agent.start(node)
            await asyncio.sleep(0.2)
            await db(node_secret_revoke)(node=node, actor="ops")
            code = await agent.closed_with()
            again = Agent(secret)
            assert await again.connect()
            return code, await again.closed_with()

        assert run(scenario) == (4401, 4401)

    def test_an_agent_cannot_speak_for_another_nodes_commands(self):
        mine, theirs = make_node(), make_node()
        secret = enrol(mine)
        their_command = node_command_issue(node_id=theirs.pk, kind="health_check", params={}, timeout_seconds=60)

        async def scenario():
            agent = Agent(secret)
            await agent.start(mine)
            await agent.send({"type": "result", "command": str(their_command.id), "ok": True, "detail": {}})
            error = await agent.expect("error")
            await agent.send({"type": "ack", "command": str(their_command.id)})
            error2 = await agent.expect("error")
            await agent.close()
            return error, error2

        error, error2 = run(scenario)
        assert error["code"] == error2["code"] == "not_found"
        their_command.refresh_from_db()
        assert their_command.state == CommandState.QUEUED

    def test_bad_frames_get_an_error_and_the_connection_stays_up(self, settings):
        settings.AGENT_MAX_FRAME_BYTES = 4000
        node = make_node()
        secret = enrol(node)

        async def scenario():
            agent = Agent(secret)
            await agent.start(node)
            replies = []
            for raw in [
                "{not json",
                "[1, 2]",
                json.dumps({"type": "dance"}),
                "x" * 5000,
                json.dumps({"type": "result", "command": "abc"}),
                json.dumps({"type": "hello", "gpus": "8"}),
            ]:
                await agent.ws.send_to(text_data=raw)
                replies.append((await agent.expect("error"))["code"])
            await agent.send({"type": "heartbeat", "seq": 2})  # still connected and heard
            await asyncio.sleep(0.2)
            await agent.close()
            return replies

        assert run(scenario) == ["bad_frame", "bad_frame", "unknown_type", "frame_too_large", "bad_frame", "bad_frame"]

    def test_a_workload_report_is_taken_and_logged_and_a_malformed_one_refused(self, caplog):
        """The agent reports a replica that stopped answering or exited (docs/agent-protocol.md, the
        workload frame); the console must not answer it with unknown_type."""
        node = make_node()
        secret = enrol(node)
        reservation = "5a0c2a55-8f7e-4d5c-9a51-0d6f0b0e8c11"

        async def scenario():
            agent = Agent(secret)
            await agent.start(node)
            replies = []
            for frame in [
                {"type": "workload", "reservation": reservation, "state": "exited", "detail": "killed by SIGKILL"},
                {"type": "workload", "reservation": reservation, "state": "on fire"},
                {"type": "workload", "state": "unhealthy"},
            ]:
                await agent.send(frame)
                await agent.ws.send_to(text_data="[0]")  # answered bad_frame: marks where each reply ends
                replies.append([(await agent.expect("error"))["message"]])
                if replies[-1][0] != "Frames are JSON objects with a string 'type'.":
                    replies[-1].append((await agent.expect("error"))["message"])
            await agent.close()
            return replies

        with caplog.at_level("WARNING", logger="provisioning.consumers"):
            replies = run(scenario)

        assert replies[0] == ["Frames are JSON objects with a string 'type'."], "taken: no error of its own"
        assert replies[1][0] == "workload: 'state' must be one of healthy, unhealthy, exited."
        assert replies[2][0] == "workload: field 'reservation' is missing or not a str."
        assert f"workload {reservation} is exited: killed by SIGKILL" in caplog.text

    def test_an_unknown_gpu_model_is_refused(self):
        node = make_node()
        secret = enrol(node)

        async def scenario():
            agent = Agent(secret)
            assert await agent.connect()
            await agent.expect("welcome")
            frame = hello(node)
            frame["gpus"][0]["name"] = "Mystery Accelerator 9000"
            await agent.send(frame)
            error = await agent.expect("error")
            await agent.close()
            return error

        assert run(scenario)["code"] == "unknown_gpu_model"


class TestCommands:
    def test_commands_are_pushed_acknowledged_and_finished_once(self):
        node = make_node()
        secret = enrol(node)

        async def scenario():
            agent = Agent(secret)
            await agent.start(node)
            await asyncio.sleep(0.2)
            command = await db(node_command_issue)(node_id=node.pk, kind="health_check", params={}, timeout_seconds=60)
            frame = await agent.expect("command")
            await agent.send({"type": "ack", "command": frame["id"]})
            await agent.send({"type": "progress", "command": frame["id"], "step": "checking", "percent": 50})
            await agent.send({"type": "result", "command": frame["id"], "ok": True, "detail": {"ecc": 0}})
            await agent.send({"type": "result", "command": frame["id"], "ok": False, "error": "late duplicate"})
            await asyncio.sleep(0.3)
            await agent.close()
            return command, frame

        command, frame = run(scenario)
        assert frame["kind"] == "health_check" and frame["id"] == str(command.id) and "deadline" in frame
        command.refresh_from_db()
        assert command.state == CommandState.SUCCEEDED and command.result == {"ecc": 0} and command.send_count == 1

    def test_unfinished_commands_are_pushed_again_on_reconnection(self):
        node = make_node()
        secret = enrol(node)
        queued = node_command_issue(node_id=node.pk, kind="health_check", params={}, timeout_seconds=60)

        async def scenario():
            first = Agent(secret)
            await first.start(node)
            pushed = await first.expect("command")
            await first.close()  # dropped before acknowledging
            second = Agent(secret)
            await second.start(node)
            again = await second.expect("command")
            await second.send({"type": "result", "command": again["id"], "ok": True, "detail": {}})
            await asyncio.sleep(0.3)
            await second.close()
            return pushed, again

        pushed, again = run(scenario)
        assert pushed["id"] == again["id"] == str(queued.id)
        queued.refresh_from_db()
        assert queued.state == CommandState.SUCCEEDED and queued.send_count == 2

    def test_a_missed_deadline_fails_the_command(self):
        node = make_node()
        command = node_command_issue(node_id=node.pk, kind="health_check", params={}, timeout_seconds=60)
        NodeCommand.objects.filter(pk=command.pk).update(deadline=timezone.now() - timedelta(seconds=1))
        assert node_commands_expire() == 1
        command.refresh_from_db()
        assert command.state == CommandState.FAILED and "deadline" in command.error
        assert node_commands_expire() == 0


class TestReservationsThroughAgents:
    def _reservation(self, tenant, nodes):
        offer = OfferFactory(site=nodes[0].rack.site, accelerator_type=nodes[0].accelerator_type)
        reservation = reservation_create(
            tenant=tenant, offer=offer, quantity=len(nodes), start=None, end=timezone.now() + timedelta(hours=1)
        )
        assert reservation_begin(reservation_id=reservation.pk)
        return reservation

    def test_provisioned_on_every_node_it_goes_active_and_release_completes_it(self, tenant):
        rack = make_node().rack
        nodes = [Node.objects.get(rack=rack)] + [make_node(rack=rack) for _ in range(1)]
        secrets = [enrol(n) for n in nodes]
        reservation = self._reservation(tenant, nodes)

        async def scenario():
            agents = [Agent(s) for s in secrets]
            for agent, node in zip(agents, nodes, strict=True):
                await agent.start(node)
            await asyncio.sleep(0.2)
            await db(reservation_provision_start)(reservation_id=reservation.pk)  # what the Celery task does
            for agent in agents:
                frame = await agent.expect("command")
                assert frame["kind"] == "provision" and frame["params"]["reservation"] == str(reservation.pk)
                await agent.send({"type": "ack", "command": frame["id"]})
                await agent.send({"type": "result", "command": frame["id"], "ok": True, "detail": {}})
            await asyncio.sleep(0.4)
            active = (await db(Reservation.objects.get)(pk=reservation.pk)).state
            await db(reservation_cancel)(
                tenant=tenant, reservation=await db(Reservation.objects.get)(pk=reservation.pk)
            )
            await db(reservation_teardown_start)(reservation_id=reservation.pk)  # what the Celery task does
            for agent in agents:
                frame = await agent.expect("command")
                assert frame["kind"] == "release"
                await agent.send({"type": "result", "command": frame["id"], "ok": True, "detail": {}})
            await asyncio.sleep(0.4)
            for agent in agents:
                await agent.close()
            return active

        assert run(scenario) == ReservationState.ACTIVE
        reservation.refresh_from_db()
        assert reservation.state == ReservationState.COMPLETED

    def test_a_failed_node_fails_the_reservation_and_releases_what_was_set_up(self, tenant):
        rack = make_node().rack
        nodes = [Node.objects.get(rack=rack), make_node(rack=rack)]
        secrets = [enrol(n) for n in nodes]
        reservation = self._reservation(tenant, nodes)

        async def scenario():
            agents = [Agent(s) for s in secrets]
            for agent, node in zip(agents, nodes, strict=True):
                await agent.start(node)
            await asyncio.sleep(0.2)
            await db(reservation_provision_start)(reservation_id=reservation.pk)
            good, bad = [await agent.expect("command") for agent in agents]
            await agents[0].send({"type": "result", "command": good["id"], "ok": True, "detail": {}})
            await agents[1].send({"type": "result", "command": bad["id"], "ok": False, "error": "flash image failed"})
            await asyncio.sleep(0.4)
            await db(reservation_teardown_start)(reservation_id=reservation.pk)
            kinds = [(await agent.expect("command"))["kind"] for agent in agents]
            for agent in agents:
                await agent.close()
            return kinds

        assert run(scenario) == ["release", "release"]
        reservation.refresh_from_db()
        assert reservation.state == ReservationState.FAILED and "flash image failed" in reservation.failure_reason
        assert not reservation.allocations.filter(live=True).exists()

    def test_a_node_that_fails_to_release_goes_to_maintenance(self, tenant):
        node = make_node()
        secret = enrol(node)
        reservation = self._reservation(tenant, [node])

        async def scenario():
            agent = Agent(secret)
            await agent.start(node)
            await asyncio.sleep(0.2)
            await db(reservation_provision_start)(reservation_id=reservation.pk)
            frame = await agent.expect("command")
            await agent.send({"type": "result", "command": frame["id"], "ok": True, "detail": {}})
            await asyncio.sleep(0.3)
            await db(reservation_cancel)(
                tenant=tenant, reservation=await db(Reservation.objects.get)(pk=reservation.pk)
            )
            await db(reservation_teardown_start)(reservation_id=reservation.pk)
            frame = await agent.expect("command")
            await agent.send({"type": "result", "command": frame["id"], "ok": False, "error": "disk wipe failed"})
            await asyncio.sleep(0.3)
            await agent.close()

        run(scenario)
        reservation.refresh_from_db()
        node.refresh_from_db()
        assert reservation.state == ReservationState.COMPLETED
        assert node.state == NodeState.MAINTENANCE
        assert "disk wipe failed" in node.state_changes.first().reason


class TestCredentialsAndLiveness:
    def test_rotation_sends_a_new_secret_and_retires_the_old_one_once_confirmed(self):
        node = make_node()
        old = enrol(node)

        async def scenario():
            agent = Agent(old)
            await agent.start(node)
            await asyncio.sleep(0.2)
            await db(node_secret_rotate)(node=node, actor="ops")
            frame = await agent.expect("rotate_secret")
            still_ok = Agent(old)
            assert await still_ok.connect()
            assert (await still_ok.expect("welcome"))["node"] == node.hostname  # old works until confirmed
            await still_ok.close()
            await agent.send({"type": "secret_rotated"})
            await asyncio.sleep(0.3)
            await agent.close()
            refused = Agent(old)
            assert await refused.connect()
            code = await refused.closed_with()
            fresh = Agent(frame["secret"])
            assert await fresh.connect()
            welcome = await fresh.expect("welcome")
            await fresh.close()
            return code, welcome

        code, welcome = run(scenario)
        assert code == 4401 and welcome["node"] == node.hostname

    def test_silent_agents_go_offline_and_come_back_on_hello(self, settings):
        node = make_node()
        secret = enrol(node)
        Node.objects.filter(pk=node.pk).update(
            last_seen_at=timezone.now()
            - timedelta(seconds=settings.AGENT_HEARTBEAT_SECONDS * settings.AGENT_MISSED_BEATS + 1)
        )
        never_seen = make_node()
        assert nodes_mark_silent_offline() == 1
        node.refresh_from_db()
        never_seen.refresh_from_db()
        assert node.state == NodeState.OFFLINE and never_seen.state == NodeState.AVAILABLE

        async def scenario():
            agent = Agent(secret)
            await agent.start(node)
            await asyncio.sleep(0.3)
            await agent.close()

        run(scenario)
        node.refresh_from_db()
        assert node.state == NodeState.AVAILABLE
        assert node.state_changes.first().reason == "agent connected"


def test_create_node_token_command_prints_tokens_for_scripts():
    from io import StringIO

    from django.core.management import call_command

    node = make_node()
    out = StringIO()
    call_command("create_node_token", "--unenrolled", "--json", stdout=out)
    entries = json.loads(out.getvalue())
    assert [e["hostname"] for e in entries] == [node.hostname]
    assert entries[0]["token"].startswith("ncb_") and entries[0]["gpu_name"] == H100
    assert not NodeCredential.objects.exists()
