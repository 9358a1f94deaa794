"""Reads of telemetry: latest snapshots (Redis, refreshed every tick) and one-minute rollups (PostgreSQL).

Telemetry is fleet data: a node's GPUs report whoever holds them. A read on behalf of a tenant object
therefore names the ``Holding``s it may see -- which GPUs of which node, from when, until when -- and
gets only what was measured inside them (ARCHITECTURE invariant 5, sealed in time, and per GPU: tenants
holding slices of one node at once each read only their own GPUs). A one-minute rollup counts only
when its whole minute lies inside a holding: a minute cut by the holding's start or end may carry the
previous or the next holder's readings, so it is left out rather than shared."""

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache, reduce
from operator import or_

import redis
from django.conf import settings
from django.db.models import Q, Sum
from django.utils import timezone

from provisioning.models import Gpu, GpuRollup
from provisioning.services.telemetry import COUNTERS_KEY, LATEST_KEY, SUMMARY_KEY


@cache
def _redis():
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)


MINUTE = timedelta(minutes=1)


@dataclass(frozen=True)
class Holding:
    """GPUs ``gpus`` (Gpu.index) of one node as held by a tenant object over [start, end); ``end`` None:
    still held."""

    node_id: int
    gpus: range
    start: datetime
    end: datetime | None = None

    def covers(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)

    def whole_minutes(self) -> Q:
        """Rollups of the held GPUs whose minute lies wholly inside the holding."""
        first = self.start.replace(second=0, microsecond=0)
        if first < self.start:
            first += MINUTE
        q = Q(
            gpu__node_id=self.node_id,
            gpu__index__gte=self.gpus.start,
            gpu__index__lt=self.gpus.stop,
            minute__gte=first,
        )
        if self.end is not None:
            q &= Q(minute__lte=self.end - MINUTE)
        return q


def _held(holdings: list[Holding]) -> Q | None:
    return reduce(or_, (h.whole_minutes() for h in holdings)) if holdings else None


def latest_frames_held(*, holdings: list[Holding]) -> list[dict]:
    """The latest batch of each held node, if it was measured while held, with the held GPUs' readings
    only (what a page shows before its feed catches up). The snapshot holds every GPU of the node (by
    the inventory's index, telemetry_ingest.validate); a batch with none of the held GPUs is left out."""
    if not holdings:
        return []
    values = _redis().hmget(LATEST_KEY, [str(h.node_id) for h in holdings])
    frames = []
    for holding, value in zip(holdings, values, strict=True):
        frame = json.loads(value) if value else None
        if not frame or not holding.covers(datetime.fromtimestamp(frame["at"], UTC)):
            continue
        mine = [gpu for gpu in frame["gpus"] if gpu.get("index") in holding.gpus]
        if mine:
            frames.append({**frame, "gpus": mine})
    return frames


def latest_frames_by_node() -> dict[int, dict]:
    """{node id: latest batch} for every node that has reported (/metrics)."""
    return {int(node): json.loads(text) for node, text in _redis().hgetall(LATEST_KEY).items()}


def telemetry_counters() -> dict[str, int]:
    return {key.decode(): int(value) for key, value in _redis().hgetall(COUNTERS_KEY).items()}


def latest_summaries() -> dict[int, dict]:
    """{node id: fleet summary} for every node that has reported."""
    return {int(node): json.loads(text) for node, text in _redis().hgetall(SUMMARY_KEY).items()}


def gpus_of_nodes(*, gpus: dict[int, range]) -> list[dict]:
    """The GPUs named by ``gpus`` ({node id: its GPU indices}), by node and index: a tenant object's
    GPUs, not all its nodes' (another tenant may hold the rest)."""
    if not gpus:
        return []
    held = reduce(or_, (Q(node_id=node_id, index__gte=r.start, index__lt=r.stop) for node_id, r in gpus.items()))
    rows = Gpu.objects.filter(held).select_related("node").order_by("node__hostname", "index")
    return [{"uuid": g.uuid, "index": g.index, "node": g.node.hostname} for g in rows]


def gpus_held(*, holdings: list[Holding]) -> dict[str, dict]:
    """{uuid: {"node_id", "node", "index"}} of the GPUs the holdings name (several holdings may name
    GPUs of one node, or the same GPU at other times): to tell whose a rollup or a reading of theirs is."""
    if not holdings:
        return {}
    held = reduce(or_, (Q(node_id=h.node_id, index__gte=h.gpus.start, index__lt=h.gpus.stop) for h in holdings))
    rows = Gpu.objects.filter(held).values_list("uuid", "node_id", "node__hostname", "index")
    return {uuid: {"node_id": node_id, "node": hostname, "index": index} for uuid, node_id, hostname, index in rows}


def rollups_held(*, holdings: list[Holding], since: datetime) -> list[dict]:
    """One-minute rollups of the held GPUs from ``since`` on, whole minutes inside the holdings only."""
    held = _held(holdings)
    if held is None:
        return []
    rollups = GpuRollup.objects.filter(held, minute__gte=since).select_related("gpu")
    return [
        {
            "minute": r.minute,
            "uuid": r.gpu.uuid,
            "util_mean": _round(r.util_mean),
            "util_max": r.util_max,
            "power_mean": _round(r.power_mean),
            "power_max": r.power_max,
            "temp_max": r.temp_max,
            "fb_used_max": r.fb_used_max,
            "energy_j": round(r.energy_mj / 1000, 3),
        }
        for r in rollups.order_by("minute", "gpu__node_id", "gpu__index")
    ]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def energy_kwh_held(*, holdings: list[Holding]) -> Decimal:
    """Energy the held GPUs drew inside the holdings, by their energy counters, in whole minutes."""
    held = _held(holdings)
    millijoules = 0 if held is None else GpuRollup.objects.filter(held).aggregate(total=Sum("energy_mj"))["total"] or 0
    return (Decimal(millijoules) / Decimal(3_600_000_000)).quantize(Decimal("0.0001"))


def since_minutes(minutes: int) -> datetime:
    return timezone.now() - timedelta(minutes=minutes)
