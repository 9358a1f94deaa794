"""Enrolment: trade a one-time bootstrap token for the node's own secret (``POST /agent/v1/enroll``) and
store it in the state directory. Also where the console's URLs are derived from ``--server``."""

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from provisioning.agent import __version__
from provisioning.agent.credentials import Credentials, store_credentials

TIMEOUT_S = 30.0
WEBSOCKET_SCHEMES = {"http": "ws", "https": "wss"}


class EnrollmentError(Exception):
    """The console refused the enrolment (``code`` from its error shape) or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Enrollment:
    node: str
    heartbeat_seconds: float | None


def _base(server: str) -> tuple[str, str, str]:
    parts = urlsplit(server)
    if parts.scheme not in WEBSOCKET_SCHEMES or not parts.netloc:
        raise ValueError(f"--server must be an http:// or https:// URL, not {server!r}")
    return parts.scheme, parts.netloc, parts.path.rstrip("/")


def enroll_url(server: str) -> str:
    scheme, netloc, path = _base(server)
    return urlunsplit((scheme, netloc, f"{path}/agent/v1/enroll", "", ""))


def websocket_url(server: str) -> str:
    """``http://host:port[/prefix]`` → ``ws://host:port[/prefix]/agent/v1/`` (https → wss)."""
    scheme, netloc, path = _base(server)
    return urlunsplit((WEBSOCKET_SCHEMES[scheme], netloc, f"{path}/agent/v1/", "", ""))


def enroll(*, server: str, token: str, hostname: str, state_dir: Path, timeout: float = TIMEOUT_S) -> Enrollment:
    """Enrol this host and store its secret (0600, atomically). Blocking: call it in a thread from asyncio."""
    body = json.dumps({"token": token, "hostname": hostname, "agent_version": __version__}).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be http(s) by enroll_url
        enroll_url(server),
        data=body,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    payload = _post(request, timeout)
    node, secret = payload.get("node"), payload.get("secret")
    if not isinstance(node, str) or not isinstance(secret, str) or not secret:
        raise EnrollmentError("bad_response", "the console answered the enrolment without a node and a secret")
    store_credentials(state_dir, Credentials(node=node, secret=secret))
    heartbeat = payload.get("heartbeat_seconds")
    return Enrollment(node=node, heartbeat_seconds=heartbeat if isinstance(heartbeat, int | float) else None)


def _post(request: urllib.request.Request, timeout: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - see enroll
            return _json_object(response.read())
    except urllib.error.HTTPError as exc:
        raise _refusal(exc.code, exc.read()) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnrollmentError("unreachable", f"cannot reach the console at {request.full_url}: {reason}") from None


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise EnrollmentError("bad_response", "the console's answer is not a JSON object")
    return data


def _refusal(status: int, raw: bytes) -> EnrollmentError:
    """The console's error shape ``{"error": {"code", "message"}}``, or the bare HTTP status."""
    try:
        error = _json_object(raw).get("error")
    except EnrollmentError:
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return EnrollmentError(str(error.get("code", f"http_{status}")), error["message"])
    return EnrollmentError(f"http_{status}", f"the console refused the enrolment with HTTP {status}")
