"""Enrolment over HTTP against a real server, the stored credential, URL derivation, the state lock."""

import json
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from provisioning.agent.credentials import Credentials, NotEnrolled, load_credentials, store_credentials
from provisioning.agent.enrollment import EnrollmentError, enroll, enroll_url, websocket_url
from provisioning.agent.state import StateDirBusy, state_lock


class EnrolmentHandler(BaseHTTPRequestHandler):
    """POST /agent/v1/enroll as the console answers it: one valid token, the project's error shape."""

    requests: list[dict] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "content_type": self.headers["Content-Type"], **body})
        if body.get("token") == "ncb_good":
            self._answer(200, {"node": body["hostname"], "secret": "ncn_abc_s3cret", "heartbeat_seconds": 10})
        else:
            self._answer(400, {"error": {"code": "enrolment_refused", "message": "The token is unknown or used."}})

    def _answer(self, status: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def console() -> Iterator[str]:
    EnrolmentHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), EnrolmentHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_enrolment_stores_the_node_secret_readable_by_the_owner_only(console, tmp_path):
    enrollment = enroll(server=console, token="ncb_good", hostname="n1", state_dir=tmp_path / "state")

    assert (enrollment.node, enrollment.heartbeat_seconds) == ("n1", 10)
    assert load_credentials(tmp_path / "state") == Credentials(node="n1", secret="ncn_abc_s3cret")
    assert stat.S_IMODE((tmp_path / "state" / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert EnrolmentHandler.requests == [
        {
            "path": "/agent/v1/enroll",
            "content_type": "application/json",
            "token": "ncb_good",
            "hostname": "n1",
            "agent_version": "0.1.0",
        }
    ]


def test_a_refused_enrolment_surfaces_the_consoles_error_and_stores_nothing(console, tmp_path):
    with pytest.raises(EnrollmentError) as refused:
        enroll(server=console, token="ncb_used", hostname="n1", state_dir=tmp_path)

    assert (refused.value.code, refused.value.message) == ("enrolment_refused", "The token is unknown or used.")
    with pytest.raises(NotEnrolled):
        load_credentials(tmp_path)


def test_an_unreachable_console_is_a_clean_error(tmp_path):
    with pytest.raises(EnrollmentError) as unreachable:
        enroll(server="http://127.0.0.1:9", token="t", hostname="n1", state_dir=tmp_path, timeout=2)
    assert unreachable.value.code == "unreachable"


def test_urls_are_derived_from_the_server_address():
    assert websocket_url("http://console:8000") == "ws://console:8000/agent/v1/"
    assert websocket_url("https://console.example/prefix/") == "wss://console.example/prefix/agent/v1/"
    assert enroll_url("https://console.example") == "https://console.example/agent/v1/enroll"
    with pytest.raises(ValueError, match="http"):
        websocket_url("ftp://console")


def test_a_rotation_replaces_the_secret_and_never_shows_it(tmp_path):
    store_credentials(tmp_path, Credentials(node="n1", secret="old"))
    store_credentials(tmp_path, Credentials(node="n1", secret="new"))

    credentials = load_credentials(tmp_path)
    assert credentials.secret == "new"
    assert "new" not in repr(credentials)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["credentials.json"]


def test_two_agents_cannot_share_a_state_directory(tmp_path):
    with state_lock(tmp_path):
        with pytest.raises(StateDirBusy), state_lock(tmp_path):
            pass
    with state_lock(tmp_path):
        pass  # released when the first agent stopped
