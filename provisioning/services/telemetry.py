"""Telemetry ingest at run time: where the pure rules of ``telemetry_ingest`` meet I/O. Owns this
process's rollup buffer and its flusher, the Redis clients, each node's latest snapshot and the batch
counters in Redis, and the one SQL statement that merges rollups into GpuRollup.

The agent consumer calls two entry points: ``stream_open`` at hello and ``ingest_batch`` per batch. The
hot path (one batch per node per second, 1,250 nodes in bench/telemetry) does no database work:
validation and folding are in memory, the fan-out is one pre-encoded text per audience (each with only
the GPUs that audience holds: tenants sharing a node get a text each), the snapshot is one Redis write.
The flusher writes the rollups every ROLLUP_FLUSH_SECONDS as one INSERT … ON CONFLICT that merges sums,
counts and maxima, so flushes from several processes add up."""

import asyncio
import logging
from datetime import UTC, datetime
from operator import attrgetter

import redis.asyncio
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection

from console.kernel.events import FLEET_GROUP
from provisioning import hooks
from provisioning.models import Gpu, GpuRollup, Node
from provisioning.services.telemetry_ingest import ECC_DBE as ECC_DBE
from provisioning.services.telemetry_ingest import ENERGY as ENERGY
from provisioning.services.telemetry_ingest import FB_TOTAL as FB_TOTAL
from provisioning.services.telemetry_ingest import FB_USED as FB_USED
from provisioning.services.telemetry_ingest import POWER as POWER
from provisioning.services.telemetry_ingest import (
    ROLLUP_COLUMNS,
    BadTelemetry,
    GpuMinute,
    NodeStream,
    RollupBuffer,
    encode,
    validate,
)
from provisioning.services.telemetry_ingest import SM_CLOCK as SM_CLOCK
from provisioning.services.telemetry_ingest import TEMP as TEMP
from provisioning.services.telemetry_ingest import UTIL as UTIL
from provisioning.services.telemetry_ingest import XID as XID

# The readings' names (ECC_DBE … XID) are defined with the rules, in telemetry_ingest; they are re-exported
# here (``X as X``) because this service's callers -- /metrics, the tenant's reads -- speak of them.

logger = logging.getLogger(__name__)

BUFFER = RollupBuffer()
COUNTERS_KEY = "neocloud:telemetry:counters"
LATEST_KEY = "neocloud:telemetry:latest"  # node id → its latest batch, every GPU (reads filter per holding)
SUMMARY_KEY = "neocloud:telemetry:summary"  # node id → the fleet summary of its latest batch


# --- The entry points ----------------------------------------------------------------------------


def node_stream(*, node_id: int) -> NodeStream:
    """The node's stream as its GPUs are now, with the groups that may see it and which GPUs each."""
    node = Node.objects.select_related("rack__site").get(pk=node_id)
    gpus = list(Gpu.objects.filter(node_id=node_id).values_list("uuid", "id", "index"))
    return NodeStream(
        node_id=node.pk,
        hostname=node.hostname,
        site=node.rack.site.slug,
        rack=node.rack.name,
        gpu_ids={uuid: gpu_id for uuid, gpu_id, _index in gpus},
        gpu_index={uuid: index for uuid, _gpu_id, index in gpus},
        audience=hooks.node_audience(node_id),
    )


async def stream_open(*, node_id: int) -> NodeStream:
    """At hello (after the inventory is recorded): the connection's stream, and this process's flusher
    running."""
    stream = await database_sync_to_async(node_stream)(node_id=node_id)
    ensure_flusher()
    return stream


async def ingest_batch(*, stream: NodeStream | None, frame: dict, channel_layer) -> None:
    """One batch of ``stream``'s node: validated (BadTelemetry, counted as rejected, and nothing kept),
    folded into the rollup buffer, sent once to each group that may see some of it (only those GPUs'
    readings) and to the fleet, and kept whole as the node's latest snapshot."""
    if stream is None:
        raise BadTelemetry("telemetry before hello: send the inventory first.")
    try:
        at, readings = validate(frame, stream)
    except BadTelemetry:
        BUFFER.rejected += 1
        raise
    BUFFER.fold(stream, at, readings)
    encoded = encode(stream, at, readings)
    for group, text in encoded.tenants:
        await channel_layer.group_send(group, {"type": "telemetry.frame", "text": text})
    await channel_layer.group_send(FLEET_GROUP, {"type": "telemetry.frame", "text": encoded.fleet})
    await snapshot(stream, encoded.node, encoded.fleet)


# --- Rollups in PostgreSQL -----------------------------------------------------------------------


_as_row = attrgetter(*ROLLUP_COLUMNS)  # a record as a row of GpuRollup's columns


def rollups_write(records: list[GpuMinute]) -> int:
    """Merge drained records into GpuRollup in one statement; a record of a GPU that is gone is dropped."""
    if not records:
        return 0
    columns = [list(column) for column in zip(*map(_as_row, records), strict=True)]
    table = GpuRollup._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} AS r ({", ".join(ROLLUP_COLUMNS)})
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
            columns,
        )
    return len(records)


def rollups_expire(*, days: int) -> int:
    cutoff = datetime.now(UTC).timestamp() - days * 86400
    deleted, _ = GpuRollup.objects.filter(minute__lt=datetime.fromtimestamp(cutoff, UTC)).delete()
    return deleted


# --- The flusher, Redis and the snapshot ---------------------------------------------------------

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
    records, accepted, rejected = BUFFER.drain()
    written = await database_sync_to_async(rollups_write)(records)
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


async def snapshot(stream: NodeStream, node_text: str, fleet_text: str) -> None:
    """The node's latest batch with every GPU's readings (a tenant's read keeps only its GPUs:
    selectors.telemetry.latest_frames_held), and its fleet summary."""
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    pipe.hset(LATEST_KEY, str(stream.node_id), node_text)
    pipe.hset(SUMMARY_KEY, str(stream.node_id), fleet_text)
    await pipe.execute()
