"""The command journal: each command applied at most once, its outcome kept to be re-sent, even across
restarts; writes are all-or-nothing."""

import json
import os
import stat

import pytest

from provisioning.agent.journal import INTERRUPTED, Journal, JournalCorrupt

RESULT = {"ok": True, "detail": {"reservation": "r1"}}


def test_a_command_goes_from_applying_to_done_with_its_result(tmp_path):
    journal = Journal(tmp_path / "journal.json")
    assert journal.get("c1") is None

    journal.begin("c1", "provision")
    assert journal.get("c1").state == "applying"
    journal.finish("c1", RESULT)

    entry = journal.get("c1")
    assert (entry.state, entry.kind, entry.result) == ("done", "provision", RESULT)


def test_a_command_cannot_begin_twice(tmp_path):
    journal = Journal(tmp_path / "journal.json")
    journal.begin("c1", "provision")
    with pytest.raises(ValueError, match="already"):
        journal.begin("c1", "provision")


def test_a_restarted_agent_finds_done_commands_with_their_results(tmp_path):
    Journal(tmp_path / "journal.json").begin("c1", "release")
    first = Journal(tmp_path / "journal.json")
    first.finish("c1", RESULT)

    entry = Journal(tmp_path / "journal.json").get("c1")

    assert (entry.state, entry.result) == ("done", RESULT)


def test_a_command_still_applying_at_a_restart_is_done_as_interrupted(tmp_path):
    Journal(tmp_path / "journal.json").begin("c1", "provision")

    restarted = Journal(tmp_path / "journal.json")

    entry = restarted.get("c1")
    assert entry.state == "done"
    assert entry.result == {"ok": False, "detail": {}, "error": INTERRUPTED}
    assert Journal(tmp_path / "journal.json").get("c1").result == entry.result, "recorded, not recomputed"


def test_old_finished_commands_are_pruned(tmp_path):
    now = [1_000_000.0]
    journal = Journal(tmp_path / "journal.json", retention_seconds=3600, clock=lambda: now[0])
    journal.begin("old", "provision")
    journal.finish("old", RESULT)
    now[0] += 3000
    journal.begin("new", "provision")
    journal.finish("new", RESULT)
    now[0] += 1000

    reopened = Journal(tmp_path / "journal.json", retention_seconds=3600, clock=lambda: now[0])

    assert reopened.get("old") is None
    assert reopened.get("new") is not None


def test_a_write_that_fails_leaves_the_previous_journal_whole_and_no_stray_file(tmp_path, monkeypatch):
    path = tmp_path / "journal.json"
    journal = Journal(path)
    journal.begin("c1", "provision")
    before = path.read_bytes()

    def power_cut(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        journal.finish("c1", RESULT)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert journal.get("c1").state == "applying", "memory and disk agree after a failed write"
    assert json.loads(before)["commands"]["c1"]["state"] == "applying"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_unreadable_journal_stops_the_agent_rather_than_risk_a_second_apply(tmp_path):
    (tmp_path / "journal.json").write_text("{not json")
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path / "journal.json")
