"""The gateway (console.gateway) as its own process in front of real replica processes: the model server
with its trivial model (``--trivial``: the same HTTP side, vectors at once), so these tests are about the
gateway -- keys, routing, retries, limits, streaming, counting -- not the model. tests/e2e/test_endpoints.py
has the whole path with the real model, the agents and the official client."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.utils import timezone

from console.devservers import free_port, stop_process
from marketplace.choices import ReplicaState
from marketplace.models import Endpoint, EndpointState, EndpointTraffic, Replica
from marketplace.services.endpoints.lifecycle import endpoint_create
from marketplace.services.endpoints.replicas import replica_secret
from marketplace.services.endpoints.traffic import traffic_collect
from marketplace.services.tenancy.api_keys import api_key_create, api_key_revoke
from provisioning.agent.serving import SECRET_ENV
from tests.e2e.conftest import ROOT, http_ok, wait_for
from tests.factories import make_served_model, make_tenant

pytestmark = [pytest.mark.slow]


def call(base: str, key: str | None, path: str, body: dict | None = None, *, method: str | None = None):
    """(status, headers, decoded JSON body) of one request."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(  # noqa: S310 - loopback only
        f"{base}{path}",
        method=method or ("POST" if body is not None else "GET"),
        data=json.dumps(body).encode() if body is not None else None,
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


class Replicas:
    """Model-server processes with the trivial model, one per Replica row, made ready as the agent
    would report them (address, READY)."""

    def __init__(self, logs):
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, replica: Replica, *, dims: int = 8) -> None:
        self.ready(replica, self.launch(replica, dims=dims))

    def ready(self, replica: Replica, address: str) -> None:
        Replica.objects.filter(pk=replica.pk).update(state=ReplicaState.READY, address=address, ready_at=timezone.now())

    def launch(self, replica: Replica, *, dims: int = 8) -> str:
        """Start the process (no database: it may run in a thread); returns its address once healthy."""
        port = free_port()
        log = open(self.logs / f"replica-{replica.pk}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "provisioning.agent.serving", "--trivial", str(dims)]
            + ["--served-name", replica.endpoint.name, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, SECRET_ENV: replica_secret(replica.pk)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[str(replica.pk)] = process
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="a trivial replica")
        return f"127.0.0.1:{port}"

    def kill(self, replica_id: str) -> None:
        process = self.processes.pop(str(replica_id))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process, timeout=10)


@pytest.fixture
def world(stack, tmp_path):
    """A tenant with an endpoint of two ready replicas, a key, and the gateway in front (fast caches)."""
    model = make_served_model(nodes=1)
    tenant = make_tenant()
    endpoint = endpoint_create(
        tenant=tenant, name="embed", model=model, region="eu-central", min_replicas=2, max_replicas=2
    )
    _key, plaintext = api_key_create(tenant=tenant, name="gateway test")
    replicas = Replicas(tmp_path)
    try:
        rows = list(endpoint.replicas.select_related("endpoint"))
        with ThreadPoolExecutor(len(rows)) as pool:
            addresses = list(pool.map(replicas.launch, rows))
        for row, address in zip(rows, addresses, strict=True):
            replicas.ready(row, address)
        gateway = stack.start_gateway(
            {
                "GATEWAY_AUTH_CACHE_SECONDS": "1",
                "GATEWAY_ROUTES_CACHE_SECONDS": "0.5",
                "GATEWAY_KEY_REQUESTS_PER_SECOND": "1000",
                "GATEWAY_KEY_BURST": "1000",
            }
        )
        yield {
            "tenant": tenant,
            "endpoint": endpoint,
            "key": plaintext,
            "gateway": gateway,
            "replicas": replicas,
            "model": model,
        }
    finally:
        replicas.stop()


def embed(world, key=None, model="embed", **fields):
    return call(
        world["gateway"],
        world["key"] if key is None else key,
        "/v1/embeddings",
        {"model": model, "input": fields.pop("input", ["hello world"]), **fields},
    )


def test_a_key_reaches_its_endpoint_and_its_answer_is_the_replicas(world):
    status, headers, body = embed(world, input=["one two three", "four"])
    assert status == 200, body
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 8
    assert body["usage"]["prompt_tokens"] == 5 + 3
    assert headers["x-neocloud-replica"] in {str(r.pk) for r in world["endpoint"].replicas.all()}
    assert "x-neocloud-input-tokens" not in {name.lower() for name in headers}
    status, _headers, models = call(world["gateway"], world["key"], "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["embed"]
    assert models["data"][0]["owned_by"] == world["tenant"].organization.slug


def test_requests_spread_over_the_ready_replicas(world):
    served = {embed(world)[1]["x-neocloud-replica"] for _ in range(40)}
    assert served == {str(r.pk) for r in world["endpoint"].replicas.all()}


@pytest.mark.parametrize(
    ("key", "path", "body", "status", "code"),
    [
        (None, "/v1/embeddings", {"model": "embed", "input": "x"}, 401, "invalid_api_key"),
        ("nck_abcd1234_not-a-key", "/v1/embeddings", {"model": "embed", "input": "x"}, 401, "invalid_api_key"),
        ("garbage", "/v1/models", None, 401, "invalid_api_key"),
        ("KEY", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found"),
        ("KEY", "/v1/embeddings", {"input": "x"}, 400, None),
        ("KEY", "/v1/embeddings", {"model": "embed", "input": 7}, 400, None),
        ("KEY", "/v1/models/nope", None, 404, "model_not_found"),
        ("KEY", "/v2/embeddings", {"model": "embed"}, 404, None),
    ],
)
def test_refusals_are_openai_errors(world, key, path, body, status, code):
    got, headers, answer = call(world["gateway"], world["key"] if key == "KEY" else key, path, body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    if code:
        assert answer["error"]["code"] == code
    if status == 401:
        assert headers.get("www-authenticate", "").startswith("Bearer")


def test_a_body_that_is_not_json_or_too_large_is_refused(world):
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{world['gateway']}/v1/embeddings",
        data=b"{not json",
        method="POST",
        headers={"Authorization": f"Bearer {world['key']}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
    assert refused.value.code == 400
    # Refused from its declared length, before the body is read.
    host, port = world["gateway"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {world['key']}\r\ncontent-length: {5 * 1024 * 1024}\r\n\r\n".encode()
            + b'{"model": "embed", "input": "'
        )
        answer = ""
        while '"request_too_large"' not in answer and (chunk := raw.recv(65536)):
            answer += chunk.decode()
    assert answer.startswith("HTTP/1.1 413") and '"code":"request_too_large"' in answer


def test_another_tenants_model_is_not_found_and_a_revoked_key_is_refused_within_seconds(world):
    other = make_tenant()
    _key, other_key = api_key_create(tenant=other, name="other")
    status, _headers, body = embed(world, key=other_key)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert call(world["gateway"], other_key, "/v1/models")[2]["data"] == []

    key_row, key = api_key_create(tenant=world["tenant"], name="to revoke")
    assert embed(world, key=key)[0] == 200
    api_key_revoke(tenant=world["tenant"], key=key_row)
    revoked_at = time.monotonic()
    wait_for(lambda: embed(world, key=key)[0] == 401, timeout=10, what="the revoked key to be refused", every=0.1)
    assert time.monotonic() - revoked_at < 5  # the cache's 1 s, and its refresh


def test_a_dead_replica_is_passed_over_and_a_killed_one_under_load_fails_no_request(world):
    replica_ids = [str(r.pk) for r in world["endpoint"].replicas.all()]
    failures, answered, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            status, headers, body = embed(world)
            (answered if status == 200 else failures).append((status, body))

    clients = [threading.Thread(target=load) for _ in range(8)]
    for client in clients:
        client.start()
    wait_for(lambda: len(answered) > 50, timeout=30, what="load to run")
    world["replicas"].kill(replica_ids[0])
    killed_at = len(answered)
    wait_for(lambda: len(answered) > killed_at + 200, timeout=60, what="load to go on after the kill")
    stop.set()
    for client in clients:
        client.join()
    assert failures == []


def test_an_endpoint_with_no_ready_replica_answers_503_with_retry_after(world):
    Replica.objects.filter(endpoint=world["endpoint"]).update(state=ReplicaState.STARTING)
    wait_for(lambda: embed(world)[0] == 503, timeout=10, what="the routes to see no ready replica")
    status, headers, body = embed(world)
    assert status == 503 and body["error"]["code"] == "endpoint_not_ready"
    assert int(headers["retry-after"]) > 0
    assert call(world["gateway"], world["key"], "/v1/models")[2]["data"] == []


def test_the_rate_limit_per_key_answers_429_with_retry_after(stack, world):
    stack.kill("gateway")
    gateway = stack.start_gateway({"GATEWAY_KEY_REQUESTS_PER_SECOND": "2", "GATEWAY_KEY_BURST": "3"})
    statuses = [call(gateway, world["key"], "/v1/models")[0] for _ in range(6)]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    status, headers, body = call(gateway, world["key"], "/v1/models")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    _row, fresh = api_key_create(tenant=world["tenant"], name="another key")
    assert call(gateway, fresh, "/v1/models")[0] == 200  # per key


def test_every_answer_is_counted_for_its_endpoint_and_replica_without_a_write_per_request(world):
    for _ in range(5):
        assert embed(world, input=["a b c"])[0] == 200
    assert embed(world, input=7)[0] == 400
    assert EndpointTraffic.objects.count() == 0  # nothing written by the requests themselves

    def collected():
        traffic_collect()
        return sum(EndpointTraffic.objects.values_list("requests", flat=True)) == 6

    wait_for(collected, timeout=15, what="the gateway's counts to be collected")
    rows = EndpointTraffic.objects.filter(endpoint=world["endpoint"])
    assert sum(r.requests for r in rows if r.outcome == "ok") == 5
    assert sum(r.input_tokens for r in rows) == 5 * 5
    assert sum(r.requests for r in rows if r.outcome == "client_error") == 1
    assert all(r.replica_id is not None for r in rows)
    assert all(sum(r.latency_buckets) == r.requests for r in rows)


def test_a_streamed_answer_comes_through_as_it_is_sent(world, stack):
    """Each event reaches the client when the replica sends it, not when the answer ends."""
    port = free_port()
    stack.start(
        "streaming replica", [sys.executable, "-m", "uvicorn", "tests.e2e.streaming_replica:app", "--port", str(port)]
    )
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30, what="the streaming replica")
    Replica.objects.filter(endpoint=world["endpoint"]).update(address=f"127.0.0.1:{port}")
    time.sleep(1)  # the gateway's routes (0.5 s) see the new address
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{world['gateway']}/v1/chat/completions",
        data=json.dumps({"model": "embed", "stream": True, "messages": []}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {world['key']}", "Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        assert response.headers["content-type"] == "text/event-stream"
        for line in response:
            if line.startswith(b"data: {"):
                events.append((time.time(), json.loads(line[6:])))
    assert [event["index"] for _at, event in events] == [0, 1, 2]
    for received, event in events:
        assert received - event["sent"] < 0.2  # not held until the last event, 0.5 s later


def test_a_request_for_an_idle_endpoint_is_held_until_a_replica_answers_or_answers_503_in_time(stack, world):
    stack.kill("gateway")
    gateway = stack.start_gateway({"GATEWAY_ROUTES_CACHE_SECONDS": "0.5", "GATEWAY_COLD_START_TIMEOUT_SECONDS": "3"})
    world = {**world, "gateway": gateway}
    ready = {r.pk: r.address for r in world["endpoint"].replicas.all()}
    Replica.objects.filter(endpoint=world["endpoint"]).update(state=ReplicaState.STOPPED)
    Endpoint.objects.filter(pk=world["endpoint"].pk).update(state=EndpointState.IDLE, min_replicas=0)
    time.sleep(1)
    status, headers, body = embed(world)  # nothing starts it here: held 3 s, then told when to come back
    assert status == 503 and body["error"]["code"] == "endpoint_waking" and int(headers["retry-after"]) > 0

    answered = {}
    caller = threading.Thread(
        target=lambda: answered.update(zip(("status", "headers", "body"), embed(world), strict=True))
    )
    caller.start()
    time.sleep(1)
    replica_id, address = next(iter(ready.items()))  # "a replica started": as the agent reports it
    Replica.objects.filter(pk=replica_id).update(state=ReplicaState.READY, address=address)
    caller.join(10)
    assert answered["status"] == 200 and answered["headers"]["x-neocloud-replica"] == str(replica_id)


def test_a_keys_requests_in_flight_are_bounded_before_their_bodies_are_read(stack, world):
    """Requests held (here: an idle endpoint's cold start that never comes) keep their bodies; past the
    key's bound the next is refused at once, so no tenant fills the gateway's memory."""
    stack.kill("gateway")
    gateway = stack.start_gateway({"GATEWAY_KEY_MAX_IN_FLIGHT": "2", "GATEWAY_COLD_START_TIMEOUT_SECONDS": "4"})
    world = {**world, "gateway": gateway}
    Replica.objects.filter(endpoint=world["endpoint"]).update(state=ReplicaState.STOPPED)
    Endpoint.objects.filter(pk=world["endpoint"].pk).update(state=EndpointState.IDLE, min_replicas=0)
    time.sleep(1)
    held = [threading.Thread(target=embed, args=(world,)) for _ in range(2)]
    for thread in held:
        thread.start()
    time.sleep(1)
    status, headers, body = embed(world)
    assert status == 429 and body["error"]["code"] == "too_many_requests_in_flight" and headers["retry-after"] == "1"
    _row, other_key = api_key_create(tenant=world["tenant"], name="another key")
    assert call(gateway, other_key, "/v1/models")[0] == 200  # per key, and reads are not held
    for thread in held:
        thread.join(10)
    assert embed(world)[0] == 503  # the held ones finished (no replica came): the key may send again
