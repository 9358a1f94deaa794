"""Telemetry ingest: validate a node's batch, fan it out once to exactly the groups that may see it,
keep the node's latest snapshot, and fold the samples into one-minute rollups written in bulk.

The hot path (one batch per node per second, 1,250 nodes in bench/telemetry) does no database work:
validation and folding are in memory, the fan-out is one pre-encoded text per audience, the snapshot
is one Redis write. A process-wide task flushes the rollups every ROLLUP_FLUSH_SECONDS as one
INSERT … ON CONFLICT that merges sums, counts and maxima, so flushes from several processes add up."""

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection

from console.kernel.errors import DomainError
from provisioning.models import Gpu, GpuRollup, Node

logger = logging.getLogger(__name__)

UTIL = "DCGM_FI_DEV_GPU_UTIL"
FB_USED = "DCGM_FI_DEV_FB_USED"
FB_TOTAL = "DCGM_FI_DEV_FB_TOTAL"
POWER = "DCGM_FI_DEV_POWER_USAGE"
TEMP = "DCGM_FI_DEV_GPU_TEMP"
SM_CLOCK = "DCGM_FI_DEV_SM_CLOCK"
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
XID = "DCGM_FI_DEV_XID_ERRORS"
ECC_DBE = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"

# docs/agent-protocol.md, Telemetry: accepted ranges per field.
RANGES: dict[str, tuple[float, float]] = {
    UTIL: (0, 100),
    FB_USED: (0, 1_048_576),
    FB_TOTAL: (0, 1_048_576),
    POWER: (0, 5_000),
    TEMP: (-40, 150),
    SM_CLOCK: (0, 10_000),
    ENERGY: (0, 2**62),
    XID: (0, 2**31),
    ECC_DBE: (0, 2**62),
}
MAX_GPUS = 64
CLOCK_SKEW_S = 300  # a batch stamped further from the server's clock is refused


class BadTelemetry(DomainError):
    code = "bad_telemetry"


@dataclass
class NodeStream:
    """What one agent connection needs to ingest its node's batches; built at hello."""

    node_id: int
    hostname: str
    site: str
    rack: str
    gpu_ids: dict[str, int]  # uuid → Gpu id: only this node's GPUs are accepted
    audience: list[str] = field(default_factory=list)  # groups that may see this node's telemetry
    last_energy: dict[int, int] = field(default_factory=dict)


def node_stream(*, node_id: int) -> NodeStream:
    node = Node.objects.select_related("rack__site").get(pk=node_id)
    gpu_ids = dict(Gpu.objects.filter(node_id=node_id).values_list("uuid", "id"))
    return NodeStream(
        node_id=node.pk, hostname=node.hostname, site=node.rack.site.slug, rack=node.rack.name, gpu_ids=gpu_ids
    )


def validate(frame: dict, stream: NodeStream, *, now: float | None = None) -> tuple[float, list[dict]]:
    """The batch's time and its GPUs' readings, checked field by field; BadTelemetry says what is wrong."""
    at = frame.get("at")
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        raise BadTelemetry("telemetry: 'at' must be Unix seconds.")
    if abs(at - (now or time.time())) > CLOCK_SKEW_S:
        raise BadTelemetry(f"telemetry: 'at' is more than {CLOCK_SKEW_S} s from the console's clock.")
    gpus = frame.get("gpus")
    if not isinstance(gpus, list) or not gpus or len(gpus) > MAX_GPUS:
        raise BadTelemetry(f"telemetry: 'gpus' must list 1 to {MAX_GPUS} GPUs.")
    clean, seen = [], set()
    for gpu in gpus:
        uuid = gpu.get("uuid") if isinstance(gpu, dict) else None
        if uuid not in stream.gpu_ids:
            raise BadTelemetry(f"telemetry: GPU {uuid!r} is not one of this node's GPUs.")
        if uuid in seen:
            raise BadTelemetry(f"telemetry: GPU {uuid} appears twice.")
        seen.add(uuid)
        reading = {"uuid": uuid, "index": gpu.get("index")}
        for name, (low, high) in RANGES.items():
            value = gpu.get(name)
            if value is None:
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
                raise BadTelemetry(f"telemetry: {name} of {uuid} is {value!r}, outside [{low}, {high}].")
            reading[name] = value
        if reading.get(FB_USED, 0) > reading.get(FB_TOTAL, math.inf):
            raise BadTelemetry(f"telemetry: {uuid} uses more memory than it has.")
        clean.append(reading)
    return float(at), clean


def health(readings: list[dict]) -> str:
    """critical: uncorrectable ECC errors; warn: XID errors or a GPU at 85 °C or more; else ok."""
    if any(r.get(ECC_DBE, 0) > 0 for r in readings):
        return "critical"
    if any(r.get(XID, 0) > 0 or r.get(TEMP, 0) >= 85 for r in readings):
        return "warn"
    return "ok"


def _sum(readings: list[dict], name: str) -> float | None:
    values = [r[name] for r in readings if name in r]
    return round(sum(values), 1) if values else None


def encode(stream: NodeStream, at: float, readings: list[dict]) -> tuple[str, str]:
    """The batch for the tenant holding the node, and its summary for the operators' fleet view. Each is
    encoded once here and forwarded unchanged to every subscriber (MEASURED: json.dumps per client was
    11 % of the fan-out)."""
    tenant = json.dumps({"type": "telemetry", "node": stream.hostname, "at": at, "gpus": readings})
    utils = [r[UTIL] for r in readings if UTIL in r]
    temps = [r[TEMP] for r in readings if TEMP in r]
    fleet = json.dumps(
        {
            "type": "node",
            "node": stream.hostname,
            "site": stream.site,
            "rack": stream.rack,
            "at": at,
            "util": round(sum(utils) / len(utils), 1) if utils else None,
            "power": _sum(readings, POWER),
            "temp": max(temps) if temps else None,
            "fb_used": _sum(readings, FB_USED),
            "fb_total": _sum(readings, FB_TOTAL),
            "health": health(readings),
        }
    )
    return tenant, fleet


# --- Rollups -------------------------------------------------------------------------------------


class RollupBuffer:
    """Per (GPU, minute): [samples, util_n, util_sum, util_max, power_n, power_sum, power_max, temp_max,
    fb_used_max, energy_mj]. Folded in memory, drained by the flusher."""

    def __init__(self):
        self._rows: dict[tuple[int, int], list] = {}
        self.accepted = 0
        self.rejected = 0

    def add(self, stream: NodeStream, at: float, readings: list[dict]) -> None:
        minute = int(at // 60) * 60
        for reading in readings:
            gpu_id = stream.gpu_ids[reading["uuid"]]
            row = self._rows.get((gpu_id, minute))
            if row is None:
                row = self._rows[(gpu_id, minute)] = [0, 0, 0.0, None, 0, 0.0, None, None, None, 0]
            row[0] += 1
            if UTIL in reading:
                row[1] += 1
                row[2] += reading[UTIL]
                row[3] = _max(row[3], reading[UTIL])
            if POWER in reading:
                row[4] += 1
                row[5] += reading[POWER]
                row[6] = _max(row[6], reading[POWER])
            row[7] = _max(row[7], reading.get(TEMP))
            row[8] = _max(row[8], reading.get(FB_USED))
            row[9] += energy_delta(stream, gpu_id, reading.get(ENERGY))
        self.accepted += 1

    def drain(self) -> tuple[list[tuple], int, int]:
        rows = [(gpu, minute, *values) for (gpu, minute), values in self._rows.items()]
        accepted, rejected = self.accepted, self.rejected
        self._rows, self.accepted, self.rejected = {}, 0, 0
        return rows, accepted, rejected


def _max(current, value):
    if value is None:
        return current
    return value if current is None or value > current else current


def energy_delta(stream: NodeStream, gpu_id: int, energy_mj) -> int:
    """How far the GPU's energy counter moved since its previous reading on this connection. The first
    reading has no delta (energy while disconnected is not attributed); a counter that went backwards
    (driver reload) restarts the count."""
    if energy_mj is None:
        return 0
    previous = stream.last_energy.get(gpu_id)
    stream.last_energy[gpu_id] = int(energy_mj)
    if previous is None or energy_mj < previous:
        return 0
    return int(energy_mj) - previous


def rollups_write(rows: list[tuple]) -> int:
    """Merge drained rows into GpuRollup in one statement."""
    if not rows:
        return 0
    columns = list(zip(*rows, strict=True))
    table = GpuRollup._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} AS r (gpu_id, minute, samples, util_n, util_sum, util_max, power_n, power_sum,
                                      power_max, temp_max, fb_used_max, energy_mj)
            SELECT g, to_timestamp(m), s, un, us, ux, pn, ps, px, tx, fx, e
            FROM unnest(%s::bigint[], %s::bigint[], %s::int[], %s::int[], %s::float8[], %s::float8[], %s::int[],
                        %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::bigint[])
                 AS u(g, m, s, un, us, ux, pn, ps, px, tx, fx, e)
            WHERE EXISTS (SELECT 1 FROM {Gpu._meta.db_table} WHERE id = u.g)
            ON CONFLICT (gpu_id, minute) DO UPDATE SET
                samples = r.samples + EXCLUDED.samples,
                util_n = r.util_n + EXCLUDED.util_n, util_sum = r.util_sum + EXCLUDED.util_sum,
                util_max = GREATEST(r.util_max, EXCLUDED.util_max),
                power_n = r.power_n + EXCLUDED.power_n, power_sum = r.power_sum + EXCLUDED.power_sum,
                power_max = GREATEST(r.power_max, EXCLUDED.power_max),
                temp_max = GREATEST(r.temp_max, EXCLUDED.temp_max),
                fb_used_max = GREATEST(r.fb_used_max, EXCLUDED.fb_used_max),
                energy_mj = r.energy_mj + EXCLUDED.energy_mj
            """,
            [list(column) for column in columns],
        )
    return len(rows)


def rollups_expire(*, days: int) -> int:
    cutoff = datetime.now(UTC).timestamp() - days * 86400
    deleted, _ = GpuRollup.objects.filter(minute__lt=datetime.fromtimestamp(cutoff, UTC)).delete()
    return deleted


# --- The process-wide buffer and its flusher ------------------------------------------------------

BUFFER = RollupBuffer()
COUNTERS_KEY = "neocloud:telemetry:counters"
LATEST_KEY = "neocloud:telemetry:latest"  # node id → the tenant frame of its latest batch
SUMMARY_KEY = "neocloud:telemetry:summary"  # node id → the fleet summary of its latest batch
_flusher: asyncio.Task | None = None


def ensure_flusher() -> None:
    """Start this process's flusher on first use (one per ASGI process, in its event loop)."""
    global _flusher
    if _flusher is None or _flusher.done():
        _flusher = asyncio.get_running_loop().create_task(_flush_forever(), name="telemetry rollup flusher")


async def _flush_forever() -> None:
    while True:
        await asyncio.sleep(settings.ROLLUP_FLUSH_SECONDS)
        try:
            await flush()
        except Exception:  # noqa: BLE001 - a failed flush must not stop the next one
            logger.exception("Telemetry rollup flush failed")


async def flush() -> int:
    """Write what the buffer holds and add its counters to Redis (for /metrics)."""
    rows, accepted, rejected = BUFFER.drain()
    written = await database_sync_to_async(rollups_write)(rows)
    if accepted or rejected:
        client = redis_client()
        await client.hincrby(COUNTERS_KEY, "accepted", accepted)
        await client.hincrby(COUNTERS_KEY, "rejected", rejected)
    return written


_redis = {}


def redis_client():
    """One asyncio Redis client per event loop (Redis holds only the latest snapshots and counters)."""
    loop = asyncio.get_running_loop()
    client = _redis.get(loop)
    if client is None:
        client = _redis[loop] = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    return client


async def snapshot(stream: NodeStream, tenant_text: str, fleet_text: str) -> None:
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    pipe.hset(LATEST_KEY, str(stream.node_id), tenant_text)
    pipe.hset(SUMMARY_KEY, str(stream.node_id), fleet_text)
    await pipe.execute()
