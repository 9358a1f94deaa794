"""The command journal: what makes each command applied at most once while the console hears its outcome
at least once (docs/agent-protocol.md, "Commands are applied once").

One JSON file in the state directory, rewritten atomically on every change. A command id is written as
``applying`` before its ``ack`` is sent, then ``done`` with its result before the ``result`` is sent. An
entry still ``applying`` when the journal is opened was cut off by a restart of the agent (the state
lock guarantees that no other process owns it): it becomes ``done`` with the failure "interrupted by
an agent restart", so a re-pushed command reports that instead of being applied a second time."""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from provisioning.agent.state import read_json, write_json_atomic

FILENAME = "journal.json"
INTERRUPTED = "interrupted by an agent restart"
RETENTION_SECONDS = 7 * 24 * 3600  # far longer than any command deadline, so a pruned id is never re-pushed
FORMAT_VERSION = 1

State = Literal["applying", "done"]


class JournalCorrupt(Exception):
    """The journal cannot be read. The agent refuses to start rather than risk applying a command twice."""


@dataclass(frozen=True)
class Entry:
    kind: str
    state: State
    updated_at: float
    result: dict[str, Any] | None = None


def interrupted_result() -> dict[str, Any]:
    return {"ok": False, "detail": {}, "error": INTERRUPTED}


class Journal:
    """Every change is written to disk before it is made in memory, so a failed write (disk full) leaves
    both saying the same thing, and the caller's error means "nothing recorded"."""

    def __init__(
        self, path: Path, *, retention_seconds: float = RETENTION_SECONDS, clock: Callable[[], float] = time.time
    ) -> None:
        self._path = path
        self._retention = retention_seconds
        self._clock = clock
        self._entries = self._load()
        recovered = self._pruned(self._recovered(self._entries))
        if recovered != self._entries:
            self._commit(recovered)

    def get(self, command_id: str) -> Entry | None:
        return self._entries.get(command_id)

    def begin(self, command_id: str, kind: str) -> None:
        """Record that the command is about to be applied; durable before this returns."""
        if command_id in self._entries:
            raise ValueError(f"command {command_id} is already in the journal")
        entry = Entry(kind=kind, state="applying", updated_at=self._clock())
        self._commit({**self._entries, command_id: entry})

    def finish(self, command_id: str, result: dict[str, Any]) -> None:
        """Record the outcome; durable before this returns, so it can be re-sent after any drop."""
        entry = replace(self._entries[command_id], state="done", updated_at=self._clock(), result=result)
        self._commit(self._pruned({**self._entries, command_id: entry}))

    def _recovered(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        """Entries still ``applying`` when the journal opens were cut off by a restart."""
        return {
            command_id: replace(entry, state="done", updated_at=self._clock(), result=interrupted_result())
            if entry.state == "applying"
            else entry
            for command_id, entry in entries.items()
        }

    def _pruned(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        horizon = self._clock() - self._retention
        return {
            command_id: entry
            for command_id, entry in entries.items()
            if entry.state == "applying" or entry.updated_at >= horizon
        }

    def _load(self) -> dict[str, Entry]:
        try:
            data = read_json(self._path)
        except (OSError, ValueError) as exc:
            raise JournalCorrupt(f"cannot read the command journal {self._path}: {exc}") from exc
        if data is None:
            return {}
        try:
            return {command_id: Entry(**fields) for command_id, fields in data["commands"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise JournalCorrupt(f"the command journal {self._path} is not in the expected shape: {exc}") from exc

    def _commit(self, entries: dict[str, Entry]) -> None:
        commands = {command_id: asdict(entry) for command_id, entry in entries.items()}
        write_json_atomic(self._path, {"version": FORMAT_VERSION, "commands": commands})
        self._entries = entries
