"""Reservations brought up and down by real processes: daphne, a Celery worker, Celery beat and a
node agent subprocess on the simulated backend, against PostgreSQL and Redis."""

import json
import signal
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from marketplace.choices import Role
from marketplace.services.tenancy.api_keys import api_key_create
from provisioning.choices import CommandKind, CommandState
from provisioning.models import Node, NodeCommand
from provisioning.selectors.telemetry import latest_frames_by_node
from provisioning.services.agents import bootstrap_token_create
from tests.e2e.conftest import Api, purge_celery_queues, wait_for
from tests.factories import OfferFactory, RackFactory, make_node, make_tenant

pytestmark = [pytest.mark.slow]


def fleet_of(count: int):
    rack = RackFactory()
    nodes = [make_node(rack=rack) for _ in range(count)]
    offer = OfferFactory(site=rack.site, accelerator_type=nodes[0].accelerator_type)
    tokens = [
        {
            "hostname": n.hostname,
            "token": bootstrap_token_create(node=n, actor="e2e"),
            "gpus": 8,
            "gpu_name": n.accelerator_type.device_name,
            "gpu_memory_mib": n.accelerator_type.memory_gib * 1024,
        }
        for n in nodes
    ]
    return nodes, offer, tokens


def api_for_new_tenant(stack) -> Api:
    tenant = make_tenant(role=Role.MEMBER)
    _key, plaintext = api_key_create(tenant=tenant, name="e2e")
    return Api(stack.base, plaintext)


def connected(nodes) -> bool:
    return Node.objects.filter(pk__in=[n.pk for n in nodes], last_seen_at__isnull=False).count() == len(nodes)


def state_of(api: Api, reservation_id: str) -> str:
    status, body = api.call("GET", f"/api/v1/reservations/{reservation_id}/")
    assert status == 200, body
    return body["state"]


def journal_entries(state_dir: Path) -> dict[str, dict]:
    """Every command each agent journalled, by command id (the agent's own record of what it applied)."""
    entries = {}
    for path in state_dir.glob("*/journal.json"):
        entries.update(json.loads(path.read_text()).get("commands", {}))
    return entries


def commands_of(reservation_id: str) -> list[NodeCommand]:
    return list(NodeCommand.objects.filter(correlation_id=reservation_id).order_by("kind", "node_id"))


def test_a_reservation_goes_live_through_the_agents_and_comes_down_on_cancel(stack, tmp_path):
    nodes, offer, tokens = fleet_of(2)
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "4")
    wait_for(lambda: connected(nodes), timeout=60, what="both agents to connect")

    api = api_for_new_tenant(stack)
    status, body = api.call("POST", "/api/v1/reservations/", {"offer": offer.id, "quantity": 2, "duration_hours": 1})
    assert status == 201, body
    reservation = body["id"]
    wait_for(lambda: state_of(api, reservation) == "active", timeout=90, what="the reservation to become active")
    _, detail = api.call("GET", f"/api/v1/reservations/{reservation}/")
    assert {p["state"] for p in detail["progress"]} == {"succeeded"} and len(detail["progress"]) == 2

    status, body = api.call("POST", f"/api/v1/reservations/{reservation}/cancel/")
    assert status == 200 and body["state"] == "releasing"
    wait_for(lambda: state_of(api, reservation) == "completed", timeout=90, what="the release to complete")

    commands = commands_of(reservation)
    assert [(c.kind, c.state) for c in commands] == [(CommandKind.PROVISION, CommandState.SUCCEEDED)] * 2 + [
        (CommandKind.RELEASE, CommandState.SUCCEEDED)
    ] * 2
    journal = journal_entries(tmp_path / "agents")
    for command in commands:  # each applied exactly once: one journal entry, done, with the result sent
        assert journal[str(command.id)]["state"] == "done"
    assert len([c for c in journal if c in {str(x.id) for x in commands}]) == len(commands)


def test_a_worker_killed_mid_provisioning_does_not_leave_the_reservation_stuck(stack, tmp_path):
    nodes, offer, tokens = fleet_of(1)
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "0.5")  # provisioning takes several seconds
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")

    api = api_for_new_tenant(stack)
    status, body = api.call("POST", "/api/v1/reservations/", {"offer": offer.id, "duration_hours": 1})
    assert status == 201, body
    reservation = body["id"]
    wait_for(lambda: state_of(api, reservation) == "provisioning", timeout=30, what="provisioning to start")
    stack.kill("worker", signal.SIGKILL)  # kill -9, mid-provisioning
    purge_celery_queues()  # and whatever task it held or had queued is gone with it
    stack.start_worker()
    final = wait_for(
        lambda: state_of(api, reservation) in ("active", "failed") and state_of(api, reservation),
        timeout=120,
        what="the reservation to reach active or failed",
    )
    assert final in ("active", "failed")
    provisions = [c for c in commands_of(reservation) if c.kind == CommandKind.PROVISION]
    assert len(provisions) == 1  # made once, however many times the task ran


def test_a_dropped_agent_connection_mid_command_resends_it_and_it_is_applied_once(stack, tmp_path):
    nodes, offer, tokens = fleet_of(1)
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "0.3")  # a long provisioning
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")

    api = api_for_new_tenant(stack)
    status, body = api.call("POST", "/api/v1/reservations/", {"offer": offer.id, "duration_hours": 1})
    assert status == 201, body
    reservation = body["id"]
    wait_for(
        lambda: NodeCommand.objects.filter(correlation_id=reservation, state=CommandState.ACKNOWLEDGED).exists(),
        timeout=60,
        what="the agent to acknowledge the provision command",
    )
    stack.kill("daphne", signal.SIGTERM)  # every agent connection drops mid-command
    stack.start_daphne()
    wait_for(lambda: state_of(api, reservation) == "active", timeout=120, what="the reservation to become active")

    (command,) = commands_of(reservation)
    assert command.send_count >= 2  # pushed again on the new connection
    entry = journal_entries(tmp_path / "agents")[str(command.id)]
    assert entry["state"] == "done" and entry["result"]["ok"] is True
    assert "interrupted" not in json.dumps(entry)
    assert stack.log("agents").count(f"command {command.id} (provision) succeeded") == 1


def test_reservations_whose_start_comes_later_begin_on_beat(stack, tmp_path):
    nodes, offer, tokens = fleet_of(1)
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "4")
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")
    api = api_for_new_tenant(stack)
    start = timezone.now() + timedelta(seconds=4)
    status, body = api.call(
        "POST", "/api/v1/reservations/", {"offer": offer.id, "start": start.isoformat(), "duration_hours": 1}
    )
    assert status == 201 and body["state"] == "pending", body
    wait_for(lambda: state_of(api, body["id"]) == "active", timeout=90, what="beat to start it and agents to run it")


def test_flushing_redis_before_provisioning_loses_nothing(stack, tmp_path):
    """ARCHITECTURE invariant 2: Redis holds nothing that matters."""
    nodes, offer, tokens = fleet_of(1)
    stack.start_daphne()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "4")
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")
    api = api_for_new_tenant(stack)
    status, body = api.call("POST", "/api/v1/reservations/", {"offer": offer.id, "duration_hours": 1})
    assert status == 201, body
    purge_celery_queues()  # the begin task, and every tick so far, vanish before any worker saw them
    stack.start_worker()
    wait_for(lambda: state_of(api, body["id"]) == "active", timeout=90, what="the reservation to become active")


def test_two_tenants_slices_of_one_node_run_side_by_side_and_one_release_leaves_the_other(stack, tmp_path):
    """Issue 12 with real processes: two tenants rent the two 4-GPU halves of one node through the API;
    each provision command names its GPUs, the agent loads only rented GPUs, and releasing one tenant's
    half leaves the other active, its GPUs still under load, and the released GPUs idle."""
    nodes, whole, tokens = fleet_of(1)
    half = OfferFactory(site=whole.site, accelerator_type=whole.accelerator_type, gpus_per_instance=4)
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "4")
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")

    apis = [api_for_new_tenant(stack), api_for_new_tenant(stack)]
    ids = []
    for api in apis:
        status, body = api.call("POST", "/api/v1/reservations/", {"offer": half.id, "duration_hours": 1})
        assert status == 201, body
        ids.append(body["id"])
    wait_for(
        lambda: [state_of(api, r) for api, r in zip(apis, ids, strict=True)] == ["active", "active"],
        timeout=90,
        what="both halves to become active",
    )
    status, body = apis[0].call("POST", "/api/v1/reservations/", {"offer": whole.id, "duration_hours": 1})
    assert status == 409, body  # the node is wholly rented, in two halves

    given = {}
    for reservation in ids:
        (provision,) = commands_of(reservation)
        assert provision.params["gpu_vendor"] == "nvidia"
        given[reservation] = provision.params["gpus"]
    assert sorted(given.values()) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    kept = ids[1]

    def utilization() -> dict[int, float]:
        frame = latest_frames_by_node().get(nodes[0].pk) or {"gpus": []}
        return {gpu["index"]: gpu.get("DCGM_FI_DEV_GPU_UTIL", 0) for gpu in frame["gpus"]}

    def loaded_only(indices) -> bool:
        util = utilization()
        return len(util) == 8 and all((util[i] > 20) == (i in indices) for i in util)

    wait_for(lambda: loaded_only(range(8)), timeout=60, what="all eight rented GPUs under load")

    status, body = apis[0].call("POST", f"/api/v1/reservations/{ids[0]}/cancel/")
    assert status == 200, body
    wait_for(lambda: state_of(apis[0], ids[0]) == "completed", timeout=90, what="the released half to complete")
    assert state_of(apis[1], kept) == "active"
    assert [c.kind for c in commands_of(kept)] == [CommandKind.PROVISION]  # nothing sent to the kept half
    wait_for(lambda: loaded_only(given[kept]), timeout=60, what="the released GPUs to go idle, the kept ones not")
