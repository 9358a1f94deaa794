"""The autoscaler end to end (issue 14), every part a real process: daphne, a worker and beat, the gateway,
and a process-driver agent starting real model servers (the trivial model: the same server, vectors at once,
so replicas start in a second or two and the test is about scaling). The windows are shortened (stable 10 s,
panic 2 s) so a step and its way back fit in a test."""

import sys
import threading
import time

import openai
import pytest
from django.db.models import F

from marketplace.choices import LIVE_REPLICA_STATES, ReplicaState
from marketplace.models import Endpoint, EndpointScaleEvent, EndpointState, Replica
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.tenancy.api_keys import api_key_create
from tests.e2e.conftest import Api, wait_for
from tests.e2e.test_provisioning import connected, fleet_of
from tests.factories import OfferFactory, make_tenant

pytestmark = [pytest.mark.slow]


class Load:
    """``clients`` threads calling the endpoint back to back with the official client; every failure kept."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url, key
        self.answered, self.failures = 0, []
        self._threads: list[tuple[threading.Thread, threading.Event]] = []
        self._lock = threading.Lock()

    def _run(self, stop: threading.Event) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, timeout=60)
        while not stop.is_set():
            try:
                client.embeddings.create(model="embed", input="load")
                with self._lock:
                    self.answered += 1
            except openai.OpenAIError as error:
                with self._lock:
                    self.failures.append(repr(error))

    def clients(self, count: int) -> None:
        while len(self._threads) < count:
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(stop,), daemon=True)
            thread.start()
            self._threads.append((thread, stop))
        while len(self._threads) > count:
            thread, stop = self._threads.pop()
            stop.set()
            thread.join()


def counts(endpoint_id) -> dict[str, int]:
    states = list(Replica.objects.filter(endpoint_id=endpoint_id).values_list("state", flat=True))
    return {state: states.count(state) for state in set(states)}


def test_a_step_scales_up_in_the_panic_window_back_down_without_a_failure_and_to_zero_and_back(stack, tmp_path):
    stack.env.update(
        {
            "AUTOSCALE_STABLE_SECONDS": "10",
            "AUTOSCALE_PANIC_SECONDS": "2",
            "AUTOSCALE_TICK_SECONDS": "1",
            "ENDPOINT_RECONCILE_SECONDS": "1",
            "ENDPOINT_DRAIN_SECONDS": "3",
        }
    )
    nodes, whole, tokens = fleet_of(1)
    offer = OfferFactory(site=whole.site, accelerator_type=whole.accelerator_type, gpus_per_instance=1)
    served_model_create(
        slug="trivial",
        name="Trivial",
        # 40 ms a batch, as a small model's compute: requests stay in flight long enough to be counted.
        server_program=[
            sys.executable,
            "-m",
            "provisioning.agent.serving",
            "--trivial",
            "8",
            "--trivial-latency-ms",
            "40",
        ],
        weights="none",
        gpus_per_replica=1,
        dimensions=8,
        accelerator_types=[whole.accelerator_type],
    )
    gateway = stack.start_gateway(
        {
            "GATEWAY_ROUTES_CACHE_SECONDS": "0.5",
            "GATEWAY_KEY_REQUESTS_PER_SECOND": "100000",
            "GATEWAY_KEY_BURST": "100000",
        }
    )
    stack.env["GATEWAY_URL"] = gateway
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--driver", "process")
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")

    tenant = make_tenant()
    _row, key = api_key_create(tenant=tenant, name="e2e")
    api = Api(stack.base, key)
    status, body = api.call(
        "POST",
        "/api/v1/endpoints/",
        {
            "name": "embed",
            "model": "trivial",
            "region": offer.site.region,
            "min_replicas": 1,
            "max_replicas": 4,
            "target_concurrency": 2,
        },
    )
    assert status == 201, body
    endpoint_id = body["id"]
    wait_for(
        lambda: Endpoint.objects.get(pk=endpoint_id).state == EndpointState.READY,
        timeout=90,
        what="the first replica",
        every=0.5,
    )

    load = Load(f"{gateway}/v1", key)
    try:
        load.clients(1)
        time.sleep(3)
        # The step: 32 clients. Over twice the capacity: panic, and four replicas (the maximum) soon.
        stepped = time.monotonic()
        load.clients(32)
        wait_for(
            lambda: counts(endpoint_id).get(ReplicaState.READY, 0) == 4,
            timeout=60,
            what="four ready replicas",
            every=0.5,
        )
        scale_up_seconds = time.monotonic() - stepped
        first_up = EndpointScaleEvent.objects.filter(endpoint_id=endpoint_id, to_replicas__gt=1).order_by("at").first()
        assert first_up is not None and first_up.panic, "the step is answered from the panic window"

        # Back to one client: after the stable window, down (by halves, draining) to the one it needs.
        load.clients(1)
        wait_for(
            lambda: (
                counts(endpoint_id).get(ReplicaState.READY, 0) == 1
                and not counts(endpoint_id).get(ReplicaState.DRAINING)
            ),
            timeout=90,
            what="back down to one replica",
            every=0.5,
        )
        time.sleep(2)
        assert load.failures == [], load.failures[:5]
        assert load.answered > 100
        assert EndpointScaleEvent.objects.filter(endpoint_id=endpoint_id, to_replicas__lt=F("from_replicas")).exists()

        # Scale to zero: min 0 and no traffic -- idle after the stable window, billing stopped.
        load.clients(0)
        status, body = api.call("PATCH", f"/api/v1/endpoints/{endpoint_id}/", {"min_replicas": 0})
        assert status == 200, body
        wait_for(
            lambda: Endpoint.objects.get(pk=endpoint_id).state == EndpointState.IDLE,
            timeout=90,
            what="the endpoint to go idle",
            every=0.5,
        )
        assert not Replica.objects.filter(endpoint_id=endpoint_id, state__in=LIVE_REPLICA_STATES).exists()

        # The first request afterwards is held while a replica starts, and succeeds.
        woke = time.monotonic()
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=120)
        answer = client.embeddings.create(model="embed", input=["wake up"])
        cold_start = time.monotonic() - woke
        assert len(answer.data[0].embedding) == 8
        woken = EndpointScaleEvent.objects.filter(endpoint_id=endpoint_id, from_replicas=0, to_replicas=1)
        assert woken.exists()
        print(f"step to 4 replicas in {scale_up_seconds:.1f} s; cold start from zero {cold_start:.1f} s")
    finally:
        load.clients(0)
