"""The node's own credential: the node name and secret the console gave at enrolment (or sent in
``rotate_secret``), kept in ``credentials.json`` in the state directory, mode 0600, replaced atomically
so a crash during a rotation leaves the old secret or the new one, never neither."""

from dataclasses import dataclass
from pathlib import Path

from provisioning.agent.state import ensure_state_dir, read_json, write_json_atomic

FILENAME = "credentials.json"


class NotEnrolled(Exception):
    """The state directory holds no credential: run ``neocloud-agent enroll`` first."""


@dataclass(frozen=True)
class Credentials:
    node: str
    secret: str

    def __repr__(self) -> str:  # keeps the secret out of logs and tracebacks
        return f"Credentials(node={self.node!r}, secret=<hidden>)"


def store_credentials(state_dir: Path, credentials: Credentials) -> None:
    ensure_state_dir(state_dir)
    write_json_atomic(state_dir / FILENAME, {"node": credentials.node, "secret": credentials.secret})


def load_credentials(state_dir: Path) -> Credentials:
    data = read_json(state_dir / FILENAME)
    if not isinstance(data, dict) or not data.get("secret") or not data.get("node"):
        raise NotEnrolled(f"no node credential in {state_dir}; enrol this host first")
    return Credentials(node=str(data["node"]), secret=str(data["secret"]))


def has_credentials(state_dir: Path) -> bool:
    try:
        load_credentials(state_dir)
    except NotEnrolled:
        return False
    return True
