"""The pure rules of telemetry ingest (provisioning.services.telemetry_ingest), without I/O: what a batch
may say, what it encodes to, and how samples fold into per-GPU-minute rollup records -- across minutes,
drains and energy counter resets. The same rules over real WebSockets, Redis and PostgreSQL are
tests/provisioning/test_telemetry.py."""

import ast
import json
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest

from provisioning.hooks import Audience
from provisioning.models import GpuRollup
from provisioning.services import telemetry_ingest as ingest
from provisioning.services.telemetry_ingest import (
    ECC_DBE,
    ENERGY,
    FB_TOTAL,
    FB_USED,
    POWER,
    TEMP,
    UTIL,
    XID,
    BadTelemetry,
    GpuMinute,
    NodeStream,
    RollupBuffer,
)

NOW = 1_795_760_000.0
MINUTE = int(NOW // 60) * 60


def stream(gpus: int = 2, audience: list[Audience] | None = None) -> NodeStream:
    return NodeStream(
        node_id=7,
        hostname="fra-r01-n01",
        site="fra",
        rack="r01",
        gpu_ids={f"GPU-{i}": 100 + i for i in range(gpus)},
        gpu_index={f"GPU-{i}": i for i in range(gpus)},
        audience=audience or [],
    )


def reading(index: int, **values) -> dict:
    return {"uuid": f"GPU-{index}", "index": index, **values}


def frame(*gpus: dict, at: float = NOW) -> dict:
    return {"type": "telemetry", "seq": 1, "at": at, "gpus": list(gpus)}


def folded(node: NodeStream, frames: list[dict], buffer: RollupBuffer | None = None) -> dict[tuple, GpuMinute]:
    buffer = buffer or RollupBuffer()
    for f in frames:
        buffer.fold(node, *ingest.validate(f, node, now=NOW))
    records, _accepted, _rejected = buffer.drain()
    return {(r.gpu_id, r.minute): r for r in records}


def merged(parts: list[GpuMinute]) -> GpuMinute:
    """Parts of one row merged as rollups_write's ON CONFLICT does: counts, sums and energy add, maxima
    take the greater (NULL is no value)."""

    def greatest(values):
        present = [v for v in values if v is not None]
        return max(present) if present else None

    first = parts[0]
    return GpuMinute(
        gpu_id=first.gpu_id,
        minute=first.minute,
        **{
            f.name: (greatest if f.name.endswith("_max") else sum)(getattr(p, f.name) for p in parts)
            for f in fields(GpuMinute)
            if f.name not in ("gpu_id", "minute")
        },
    )


# --- validate -------------------------------------------------------------------------------------


def test_a_good_batch_keeps_the_known_readings_in_range_and_drops_the_rest():
    node = stream()
    at, readings = ingest.validate(
        frame(
            reading(0, **{UTIL: 97, FB_USED: 3666, FB_TOTAL: 81559, POWER: 689.4, "extra": "ignored"}),
            reading(1, **{UTIL: None, TEMP: -3}),
            at=int(NOW),
        ),
        node,
        now=NOW,
    )
    assert at == NOW and isinstance(at, float)
    assert readings == [
        {"uuid": "GPU-0", "index": 0, UTIL: 97, FB_USED: 3666, FB_TOTAL: 81559, POWER: 689.4},
        {"uuid": "GPU-1", "index": 1, TEMP: -3},  # a refused reading (null) is omitted
    ]


@pytest.mark.parametrize(
    "bad,says",
    [
        ({"at": "yesterday"}, "'at' must be Unix seconds"),
        ({"at": True}, "'at' must be Unix seconds"),
        ({"at": math.nan}, "'at' must be Unix seconds"),
        ({"at": NOW - 301}, "from the console's clock"),
        ({"gpus": []}, "must list 1 to 64"),
        ({"gpus": "GPU-0"}, "must list 1 to 64"),
        ({"gpus": [reading(0)] * 65}, "must list 1 to 64"),
        ({"gpus": [reading(5)]}, "'GPU-5' is not one of this node's GPUs"),
        ({"gpus": ["GPU-0"]}, "None is not one of this node's GPUs"),
        ({"gpus": [reading(0), reading(0)]}, "GPU-0 appears twice"),
        ({"gpus": [reading(0, **{TEMP: 151})]}, "outside [-40, 150]"),
        ({"gpus": [reading(0, **{UTIL: "97"})]}, "is '97'"),
        ({"gpus": [reading(0, **{POWER: True})]}, "is True"),
        ({"gpus": [reading(0, **{ENERGY: -1})]}, "outside"),
        ({"gpus": [reading(0, **{FB_USED: 2, FB_TOTAL: 1})]}, "uses more memory than it has"),
    ],
)
def test_a_bad_batch_is_refused_saying_what_is_wrong(bad, says):
    with pytest.raises(BadTelemetry) as refused:
        ingest.validate({**frame(reading(0)), **bad}, stream(), now=NOW)
    assert says in refused.value.message and refused.value.code == "bad_telemetry"


# --- health and encode ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,state",
    [
        ({TEMP: 84, XID: 0, ECC_DBE: 0}, "ok"),
        ({}, "ok"),
        ({TEMP: 85}, "warn"),
        ({XID: 79}, "warn"),
        ({ECC_DBE: 1, TEMP: 40}, "critical"),
    ],
)
def test_health_of_a_batch(values, state):
    assert ingest.health([reading(0, **{TEMP: 40}), reading(1, **values)]) == state


def test_a_batch_is_encoded_once_for_the_tenant_and_once_summarised_for_the_fleet():
    node = stream()
    at, readings = ingest.validate(
        frame(
            reading(0, **{UTIL: 50, POWER: 300.5, TEMP: 40, FB_USED: 1000, FB_TOTAL: 81559}),
            reading(1, **{UTIL: 51, POWER: 300.3, TEMP: 61, FB_USED: 24, FB_TOTAL: 81559}),
        ),
        node,
        now=NOW,
    )
    encoded = ingest.encode(node, at, readings)
    assert json.loads(encoded.node) == {"type": "telemetry", "node": "fra-r01-n01", "at": NOW, "gpus": readings}
    assert encoded.tenants == []  # no audience: the snapshot and the fleet only
    assert json.loads(encoded.fleet) == {
        "type": "node",
        "node": "fra-r01-n01",
        "site": "fra",
        "rack": "r01",
        "at": NOW,
        "util": 50.5,
        "power": 600.8,
        "temp": 61,
        "fb_used": 1024,
        "fb_total": 163118,
        "health": "ok",
    }
    silent = ingest.encode(node, at, [{"uuid": "GPU-0", "index": 0}]).fleet
    assert {k: v for k, v in json.loads(silent).items() if v is None} == dict.fromkeys(
        ("util", "power", "temp", "fb_used", "fb_total")
    )


def test_a_batch_of_a_shared_node_is_encoded_once_per_audience_with_only_its_gpus():
    """Three tenants holding slices of one 8-GPU node: three texts, each with only its GPUs' readings; a
    whole-node holder gets the snapshot's own text (not encoded again); one holding none of the batch's
    GPUs gets nothing; the snapshot and the fleet summary are of the whole node."""
    slices = [Audience("reservation.a", range(0, 2)), Audience("reservation.b", range(2, 4))]
    rest = Audience("reservation.c", range(4, 8))
    node = stream(8, audience=[*slices, rest])
    at, readings = ingest.validate(frame(*(reading(i, **{POWER: 100.0 + i}) for i in range(8))), node, now=NOW)

    encoded = ingest.encode(node, at, readings)
    assert [group for group, _text in encoded.tenants] == ["reservation.a", "reservation.b", "reservation.c"]
    sent = {group: json.loads(text) for group, text in encoded.tenants}
    for audience in node.audience:
        assert sent[audience.group] == {
            "type": "telemetry",
            "node": "fra-r01-n01",
            "at": NOW,
            "gpus": [r for r in readings if r["index"] in audience.gpus],
        }
    assert [g[POWER] for g in sent["reservation.b"]["gpus"]] == [102.0, 103.0]
    assert json.loads(encoded.node)["gpus"] == readings  # the snapshot keeps the whole node
    assert json.loads(encoded.fleet)["power"] == round(sum(100.0 + i for i in range(8)), 1)

    node.audience = [Audience("reservation.whole", range(0, 8)), Audience("reservation.elsewhere", range(8, 9))]
    whole = ingest.encode(node, at, readings)
    assert whole.tenants == [("reservation.whole", whole.node)]
    assert whole.tenants[0][1] is whole.node  # encoded once

    # A batch that reports only some GPUs: an audience gets what it holds of it, or nothing at all.
    node.audience = [*slices, rest]
    partial = ingest.encode(node, at, [r for r in readings if r["index"] in (1, 5)])
    assert {group: [g["index"] for g in json.loads(text)["gpus"]] for group, text in partial.tenants} == {
        "reservation.a": [1],
        "reservation.c": [5],
    }


def test_an_audience_is_matched_by_the_inventorys_index_not_the_one_a_batch_says():
    node = stream(4, audience=[Audience("reservation.a", range(0, 2))])
    lying = [reading(i) for i in range(4)]
    for r in lying:
        r["index"] = 3 - r["index"]  # GPU-3 says it is index 0, and so on
    at, readings = ingest.validate(frame(*lying), node, now=NOW)
    assert [r["index"] for r in readings] == [0, 1, 2, 3]  # the inventory's, per UUID
    [(_group, text)] = ingest.encode(node, at, readings).tenants
    assert [g["uuid"] for g in json.loads(text)["gpus"]] == ["GPU-0", "GPU-1"]


# --- Folding into GpuMinute records ---------------------------------------------------------------


def test_samples_fold_into_one_record_per_gpu_and_minute_with_counts_sums_and_maxima():
    node = stream()
    frames = [
        frame(reading(0, **{UTIL: 10, POWER: 100.0, TEMP: 40, FB_USED: 5}), reading(1, **{UTIL: 90}), at=MINUTE),
        frame(reading(0, **{UTIL: 30, TEMP: 45}), reading(1, **{POWER: 250.5}), at=MINUTE + 59.999),
        frame(reading(0, **{UTIL: 70, POWER: 80.0}), at=MINUTE + 60),  # the next minute
    ]
    records = folded(node, frames)
    assert records == {
        (100, MINUTE): GpuMinute(
            gpu_id=100,
            minute=MINUTE,
            samples=2,
            util_n=2,
            util_sum=40.0,
            util_max=30,
            power_n=1,
            power_sum=100.0,
            power_max=100.0,
            temp_max=45,
            fb_used_max=5,
        ),
        (101, MINUTE): GpuMinute(
            gpu_id=101,
            minute=MINUTE,
            samples=2,
            util_n=1,
            util_sum=90.0,
            util_max=90,
            power_n=1,
            power_sum=250.5,
            power_max=250.5,
        ),
        (100, MINUTE + 60): GpuMinute(
            gpu_id=100,
            minute=MINUTE + 60,
            samples=1,
            util_n=1,
            util_sum=70.0,
            util_max=70,
            power_n=1,
            power_sum=80.0,
            power_max=80.0,
        ),
    }


def test_the_record_has_gpu_rollups_columns_in_order():
    """rollups_write sends the records' fields as GpuRollup's columns, in this order."""
    columns = [f.column for f in GpuRollup._meta.concrete_fields if not f.primary_key]
    assert list(ingest.ROLLUP_COLUMNS) == columns


def test_energy_is_the_counters_advance_and_a_counter_reset_restarts_the_count():
    node = stream(gpus=1)
    energies = [1_000, 1_500, None, 2_500, 300, 800, 800]  # None: not read this tick; 300: driver reloaded
    frames = [
        frame(reading(0, **({} if e is None else {ENERGY: e})), at=MINUTE + second) for second, e in enumerate(energies)
    ]
    record = folded(node, frames)[(100, MINUTE)]
    # first reading: no delta (nothing before it on this connection); 500 + 1000; reset: 0; then 500 + 0
    assert record.energy_mj == 500 + 1_000 + 500
    assert node.last_energy == {100: 800}

    reconnected = stream(gpus=1)  # a new connection attributes nothing of the time it was away
    assert folded(reconnected, [frame(reading(0, **{ENERGY: 9_000}), at=MINUTE + 30)])[(100, MINUTE)].energy_mj == 0


def test_a_minute_folded_over_several_drains_is_parts_that_merge_into_the_whole():
    """A flush drains the buffer mid-minute: the minute's later samples make a second record of the same
    (gpu, minute), and the energy counter's advance across the drain is not lost. Merged (as the SQL
    merges them), the parts equal the minute folded at once."""
    samples = [
        frame(
            reading(0, **{UTIL: (s * 37) % 101, POWER: 100 + s * 2.5, TEMP: 30 + s % 7, ENERGY: 10_000 + s * 700}),
            reading(1, **({UTIL: s, FB_USED: 100 - s} if s % 3 else {ENERGY: 50_000 + s * 90})),
            at=MINUTE + s * 2.5,
        )
        for s in range(24)
    ]
    whole = folded(stream(), samples)

    node, buffer, parts = stream(), RollupBuffer(), {}
    for start, end in ((0, 5), (5, 6), (6, 24)):  # three flushes inside the minute
        for key, record in folded(node, samples[start:end], buffer).items():
            parts.setdefault(key, []).append(record)
    assert {key: len(p) for key, p in parts.items()} == {(100, MINUTE): 3, (101, MINUTE): 3}
    assert {key: merged(p) for key, p in parts.items()} == whole
    assert whole[(100, MINUTE)].energy_mj == 23 * 700  # every advance after the first reading, across drains


def test_a_drain_hands_over_what_was_folded_and_the_counts_then_starts_empty():
    node, buffer = stream(), RollupBuffer()
    buffer.fold(node, *ingest.validate(frame(reading(0, **{UTIL: 1}), reading(1)), node, now=NOW))
    buffer.fold(node, *ingest.validate(frame(reading(0, **{UTIL: 3})), node, now=NOW))
    buffer.rejected += 1
    records, accepted, rejected = buffer.drain()
    assert sorted((r.gpu_id, r.samples) for r in records) == [(100, 2), (101, 1)]
    assert (accepted, rejected) == (2, 1)
    assert buffer.drain() == ([], 0, 0)


def test_the_rules_do_no_io():
    """What makes them unit-testable and cheap on the hot path: no database, Redis, channel layer or
    event loop is imported by the rules' module."""
    tree = ast.parse(Path(ingest.__file__).read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    # provisioning.hooks: the Audience a stream goes to (a plain tuple; the hooks' module does no I/O either)
    assert imported == {"json", "math", "time", "dataclasses", "console.kernel.errors", "provisioning.hooks"}


def test_the_protocols_range_table_is_the_one_the_console_applies():
    """docs/agent-protocol.md is the agent's contract: its table of accepted ranges says what validate
    does, field by field."""

    def number(text: str) -> float:
        base, _, power = text.replace(",", "").partition("^")
        return int(base) ** int(power) if power else int(base)

    doc = (Path(__file__).resolve().parents[2] / "docs" / "agent-protocol.md").read_text()
    documented = {}
    for row in doc.splitlines():
        if row.startswith("| `DCGM_"):
            names, *_unit, accepted = (cell.strip() for cell in row.strip("|").split("|"))
            low, high = re.match(r"(-?[\d,^]+)–(-?[\d,^]+)", accepted).groups()
            for name in re.findall(r"`(DCGM_\w+)`", names):
                documented[name] = (number(low), number(high))
    assert documented == ingest.RANGES
