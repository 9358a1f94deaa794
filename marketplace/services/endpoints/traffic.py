"""What the gateways answered, counted without a database write per request.

Each gateway process counts its requests in memory (TrafficCounter: per endpoint, replica, minute and
outcome, with latency buckets and input tokens) and pushes what it counted about once a second as one
batch onto a Redis list, numbered per process. Beat's collector (traffic_collect) merges the waiting
batches into EndpointTraffic rows in one transaction, and remembers the last number taken from each
gateway (GatewayCursor) in that same transaction: a batch seen again -- the collector stopped after the
commit and before trimming the list -- is skipped, so every request counts exactly once. Losing Redis
loses at most the batches not yet collected; the bill does not depend on them (replicas are billed by
the time they run), only the request counts shown beside it.
"""

import bisect
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import connection, transaction
from django.utils import timezone

from console.kernel.events import publish_on_commit, tenant_group
from console.kernel.stores import redis_client
from marketplace.models import LATENCY_BUCKETS_MS, Endpoint, EndpointTraffic, GatewayCursor, Replica, TrafficOutcome

logger = logging.getLogger(__name__)

TRAFFIC_KEY = "neocloud:gateway:traffic"  # a list of JSON batches, pushed on the right, taken from the left
COLLECT_LOCK_KEY = "neocloud:gateway:traffic:collecting"
BUCKETS = len(LATENCY_BUCKETS_MS) + 1
CURSOR_RETENTION_DAYS = 2


def outcome_of(status: int) -> str:
    if status < 400:
        return TrafficOutcome.OK
    return TrafficOutcome.CLIENT_ERROR if status < 500 else TrafficOutcome.SERVER_ERROR


@dataclass
class _Cell:
    requests: int = 0
    input_tokens: int = 0
    latency_ms_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)


class TrafficCounter:
    """One gateway process's counts since its last batch. Not thread-safe: the gateway's event loop
    is its only user. Pure: no I/O (the gateway pushes what ``batch`` returns)."""

    def __init__(self, gateway: str | None = None) -> None:
        self.gateway = gateway or secrets.token_hex(8)  # one id per process start: sequences restart at 1
        self.sequence = 0
        self._cells: dict[tuple[str, str | None, int, str], _Cell] = {}

    def record(
        self,
        *,
        endpoint_id: str,
        replica_id: str | None,
        status: int,
        latency_ms: float,
        input_tokens: int = 0,
        now: float | None = None,
    ) -> None:
        minute = int((time.time() if now is None else now) // 60) * 60
        key = (endpoint_id, replica_id, minute, outcome_of(status))
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell()
        cell.requests += 1
        cell.input_tokens += max(0, input_tokens)
        cell.latency_ms_sum += latency_ms
        cell.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1

    def batch(self) -> bytes | None:
        """What was counted since the last batch, as the next numbered batch; None when nothing was."""
        if not self._cells:
            return None
        cells, self._cells = self._cells, {}
        self.sequence += 1
        rows = [
            [endpoint, replica, minute, outcome, cell.requests, cell.input_tokens, cell.latency_ms_sum, cell.buckets]
            for (endpoint, replica, minute, outcome), cell in cells.items()
        ]
        return json.dumps({"gateway": self.gateway, "sequence": self.sequence, "rows": rows}).encode()


def _decode(raw: bytes) -> dict | None:
    try:
        batch = json.loads(raw)
        gateway, sequence, rows = str(batch["gateway"])[:64], int(batch["sequence"]), list(batch["rows"])
    except (ValueError, TypeError, KeyError):
        logger.error("A malformed traffic batch was dropped: %r", raw[:200])
        return None
    return {"gateway": gateway, "sequence": sequence, "rows": rows}


@transaction.atomic
def _merge(batches: list[dict]) -> int:
    """Merge the batches not merged before into EndpointTraffic; returns the requests added."""
    gateways = {batch["gateway"] for batch in batches}
    cursors = {
        cursor.gateway: cursor.sequence
        for cursor in GatewayCursor.objects.select_for_update().filter(gateway__in=gateways)
    }
    merged: dict[tuple, list] = {}
    for batch in sorted(batches, key=lambda b: (b["gateway"], b["sequence"])):
        if batch["sequence"] <= cursors.get(batch["gateway"], 0):
            continue  # taken before: the list was not trimmed after that commit
        cursors[batch["gateway"]] = batch["sequence"]
        for row in batch["rows"]:
            try:
                endpoint, replica, minute, outcome, requests, tokens, latency, buckets = row
                key = (str(endpoint), str(replica) if replica else None, int(minute), TrafficOutcome(outcome))
                values = [int(requests), int(tokens), float(latency), [int(count) for count in buckets]]
            except (ValueError, TypeError):
                logger.error("A malformed traffic row was dropped: %r", row)
                continue
            if len(values[3]) != BUCKETS:
                logger.error("A traffic row with %d latency buckets was dropped", len(values[3]))
                continue
            into = merged.setdefault(key, [0, 0, 0.0, [0] * BUCKETS])
            into[0] += values[0]
            into[1] += values[1]
            into[2] += values[2]
            into[3] = [a + b for a, b in zip(into[3], values[3], strict=True)]
    # Rows naming an endpoint or replica that does not exist are dropped, not a failed merge.
    owners = {
        str(pk): organization_id
        for pk, organization_id in Endpoint.objects.filter(pk__in={key[0] for key in merged}).values_list(
            "pk", "organization_id"
        )
    }
    replicas = set(
        map(str, Replica.objects.filter(pk__in={key[1] for key in merged if key[1]}).values_list("pk", flat=True))
    )
    rows = [(key, values) for key, values in merged.items() if key[0] in owners and (not key[1] or key[1] in replicas)]
    if len(rows) < len(merged):
        logger.error("%d traffic row(s) for unknown endpoints or replicas were dropped", len(merged) - len(rows))
    with connection.cursor() as cursor:
        cursor.executemany(
            f"""
            INSERT INTO {EndpointTraffic._meta.db_table} AS t
                (endpoint_id, replica_id, minute, outcome, requests, input_tokens, latency_ms_sum, latency_buckets)
            VALUES (%s, %s, to_timestamp(%s), %s, %s, %s, %s, %s)
            ON CONFLICT ON CONSTRAINT endpoint_traffic_one_row DO UPDATE SET
                requests = t.requests + EXCLUDED.requests,
                input_tokens = t.input_tokens + EXCLUDED.input_tokens,
                latency_ms_sum = t.latency_ms_sum + EXCLUDED.latency_ms_sum,
                latency_buckets = ARRAY(
                    SELECT a + b FROM unnest(t.latency_buckets, EXCLUDED.latency_buckets)
                    WITH ORDINALITY AS u(a, b, i) ORDER BY i
                )
            """,
            [[*key, *values] for key, values in rows],
        )
    now = timezone.now()
    for gateway, sequence in cursors.items():
        GatewayCursor.objects.update_or_create(gateway=gateway, defaults={"sequence": sequence, "updated_at": now})
    GatewayCursor.objects.filter(updated_at__lt=now - timedelta(days=CURSOR_RETENTION_DAYS)).delete()
    # Live endpoint pages show the requests so far: tell each endpoint's tenant that they moved.
    for endpoint in {key[0] for key, _values in rows}:
        publish_on_commit(tenant_group(owners[endpoint]), "endpoint.traffic", {"id": endpoint})
    return sum(values[0] for _key, values in rows)


def traffic_collect(*, limit: int = 1000) -> int:
    """Beat: merge up to ``limit`` waiting batches into EndpointTraffic, exactly once each; returns the
    requests added. One collector at a time (a Redis lock); the list is trimmed only after the commit."""
    client = redis_client()
    token = secrets.token_hex(8)
    if not client.set(COLLECT_LOCK_KEY, token, nx=True, ex=120):
        return 0
    try:
        raw = client.lrange(TRAFFIC_KEY, 0, limit - 1)
        if not raw:
            return 0
        batches = [batch for batch in map(_decode, raw) if batch is not None]
        added = _merge(batches) if batches else 0
        client.ltrim(TRAFFIC_KEY, len(raw), -1)
        return added
    finally:
        if client.get(COLLECT_LOCK_KEY) == token.encode():
            client.delete(COLLECT_LOCK_KEY)
