"""The agent's state directory: files written atomically (temp file, fsync, ``os.replace``, fsync of the
directory) so a crash leaves the old or the new version and never half of one, created 0600 so the
secret is never readable by others even for an instant, and one lock so that two agents never share a
journal (which would break "applied at most once")."""

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK = "agent.lock"


class StateDirBusy(Exception):
    """Another agent process already runs on this state directory."""


def ensure_state_dir(path: Path) -> Path:
    """Create the directory (0700: it holds the node secret) if needed and return it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, all or nothing, readable by the owner only."""
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))


def write_text_atomic(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text``, all or nothing; readable by the owner only unless ``mode`` says
    otherwise (set before the text is written, so no reader ever sees it under other permissions)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when the file does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _fsync_directory(path: Path) -> None:
    """Make the rename itself durable: without this a power cut can bring the old file back."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the state directory for the life of one agent."""
    ensure_state_dir(state_dir)
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirBusy(f"another agent is running on {state_dir}") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
