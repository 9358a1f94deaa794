"""Reads of telemetry: latest snapshots (Redis, refreshed every tick) and one-minute rollups (PostgreSQL)."""

import json
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from provisioning.models import Gpu, GpuRollup
from provisioning.services.telemetry import COUNTERS_KEY, LATEST_KEY, SUMMARY_KEY


@cache
def _redis():
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)


def latest_frames(*, node_ids: list[int]) -> list[dict]:
    """The latest batch of each node that has sent one (what a page shows before its feed catches up)."""
    if not node_ids:
        return []
    values = _redis().hmget(LATEST_KEY, [str(n) for n in node_ids])
    return [json.loads(v) for v in values if v]


def latest_frames_by_node() -> dict[int, dict]:
    """{node id: latest batch} for every node that has reported (/metrics)."""
    return {int(node): json.loads(text) for node, text in _redis().hgetall(LATEST_KEY).items()}


def telemetry_counters() -> dict[str, int]:
    return {key.decode(): int(value) for key, value in _redis().hgetall(COUNTERS_KEY).items()}


def latest_summaries() -> dict[int, dict]:
    """{node id: fleet summary} for every node that has reported."""
    return {int(node): json.loads(text) for node, text in _redis().hgetall(SUMMARY_KEY).items()}


def gpus_of_nodes(*, node_ids: list[int]) -> list[dict]:
    rows = Gpu.objects.filter(node_id__in=node_ids).select_related("node").order_by("node__hostname", "index")
    return [{"uuid": g.uuid, "index": g.index, "node": g.node.hostname} for g in rows]


def rollups_of_nodes(*, node_ids: list[int], since: datetime, until: datetime | None = None) -> list[dict]:
    rollups = GpuRollup.objects.filter(gpu__node_id__in=node_ids, minute__gte=since).select_related("gpu")
    if until is not None:
        rollups = rollups.filter(minute__lt=until)
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


def energy_kwh(*, node_ids: list[int], start: datetime, end: datetime | None) -> Decimal:
    """Energy the nodes' GPUs drew over [start, end) by their energy counters, at minute resolution."""
    first_minute = start.replace(second=0, microsecond=0)
    rollups = GpuRollup.objects.filter(gpu__node_id__in=node_ids, minute__gte=first_minute)
    if end is not None:
        rollups = rollups.filter(minute__lt=end)
    millijoules = rollups.aggregate(total=Sum("energy_mj"))["total"] or 0
    return (Decimal(millijoules) / Decimal(3_600_000_000)).quantize(Decimal("0.0001"))


def since_minutes(minutes: int) -> datetime:
    return timezone.now() - timedelta(minutes=minutes)
