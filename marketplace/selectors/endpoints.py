"""Tenant-scoped reads of inference endpoints and their replicas, and the catalog of served models."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db.models import Count, DurationField, ExpressionWrapper, F, Prefetch, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, Extract, Least
from django.utils import timezone

from console.kernel.errors import DomainError, NotFound
from marketplace.choices import LIVE_REPLICA_STATES, ReplicaState, ReservationState
from marketplace.models import (
    LATENCY_BUCKETS_MS,
    Allocation,
    Endpoint,
    EndpointState,
    EndpointTraffic,
    Replica,
    Reservation,
    ServedModel,
    TrafficOutcome,
    UsageRecord,
)
from marketplace.money import LEDGER_QUANTUM
from marketplace.selectors.reservations import reservation_holdings
from marketplace.tenant_context import TenantContext
from provisioning.models import AcceleratorType, Site
from provisioning.selectors.telemetry import gpus_held, latest_frames_held, rollups_held
from provisioning.services.telemetry import UTIL


def served_model_list() -> QuerySet[ServedModel]:
    """Models that take new endpoints, with the accelerator types they run on."""
    return ServedModel.objects.filter(is_active=True).prefetch_related("accelerator_types").order_by("name")


def served_model_for_endpoint(*, slug: str) -> ServedModel:
    """The model a request names; an inactive one is returned so that the refusal can say why."""
    model = ServedModel.objects.filter(slug=slug).first()
    if model is None:
        message = f"No served model {slug!r}."
        raise DomainError(message, code="unknown_model", fields={"model": [message]})
    return model


def _by_slugs(queryset, slugs: list[str], *, field: str, noun: str) -> list:
    found = {row.slug: row for row in queryset.filter(slug__in=slugs)}
    missing = [slug for slug in slugs if slug not in found]
    if missing:
        message = f"No {noun} {', '.join(missing)}."
        raise DomainError(message, code=f"unknown_{noun.replace(' ', '_')}", fields={field: [message]})
    return [found[slug] for slug in dict.fromkeys(slugs)]


def accelerator_types_by_slug(*, slugs: list[str]) -> list[AcceleratorType]:
    return _by_slugs(AcceleratorType.objects.all(), slugs, field="accelerator_types", noun="accelerator type")


def sites_by_slug(*, slugs: list[str]) -> list[Site]:
    return _by_slugs(Site.objects.all(), slugs, field="pinned_sites", noun="site")


def _endpoints(tenant: TenantContext) -> QuerySet[Endpoint]:
    replicas = Replica.objects.select_related("reservation").prefetch_related(
        Prefetch("reservation__allocations", queryset=Allocation.objects.select_related("node__rack__site"))
    )
    return (
        Endpoint.objects.filter(organization=tenant.organization)
        .select_related("model")
        .prefetch_related(
            "accelerator_types",
            "pinned_sites",
            # What a tenant is shown of its replicas: all but the stopped ones (cost counts those too).
            Prefetch("replicas", queryset=replicas.exclude(state=ReplicaState.STOPPED), to_attr="current_replicas"),
        )
        .annotate(
            live_replica_count=Count("replicas", filter=Q(replicas__state__in=LIVE_REPLICA_STATES)),
            ready_replica_count=Count("replicas", filter=Q(replicas__state=ReplicaState.READY)),
        )
    )


def endpoint_list(*, tenant: TenantContext, state: str | None = None) -> QuerySet[Endpoint]:
    """The organization's endpoints, newest first; deleted ones only when ``state`` asks for them.
    Each carries ``current_replicas`` (all but stopped ones, with their slice's allocation),
    ``live_replica_count`` and ``ready_replica_count``."""
    endpoints = _endpoints(tenant)
    endpoints = endpoints.filter(state=state) if state else endpoints.exclude(state=EndpointState.DELETED)
    return endpoints.order_by("-created_at")


def endpoint_get(*, tenant: TenantContext, endpoint_id) -> Endpoint:
    """One of the organization's endpoints, a deleted one included; another tenant's id is not found."""
    try:
        return _endpoints(tenant).get(pk=endpoint_id)
    except (Endpoint.DoesNotExist, ValidationError, ValueError):
        raise NotFound("No such endpoint in this organization.") from None


def endpoint_cost(*, endpoint: Endpoint) -> Decimal:
    """What the endpoint has cost so far: the rated usage of every reservation its replicas held (a
    replica is a rental like any other, metered and billed as one), stopped replicas included. One sum."""
    total = UsageRecord.objects.filter(reservation__replica__endpoint=endpoint).aggregate(total=Sum("amount"))["total"]
    return total or Decimal("0")


def _quantile_ms(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile from LATENCY_BUCKETS_MS counts, interpolated within its bucket (the open last
    bucket answers its lower bound)."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = LATENCY_BUCKETS_MS[index - 1] if index else 0.0
            if index == len(LATENCY_BUCKETS_MS):
                return float(low)
            return low + (LATENCY_BUCKETS_MS[index] - low) * (rank - seen) / count
        seen += count
    return float(LATENCY_BUCKETS_MS[-1])


_BUCKETS = len(LATENCY_BUCKETS_MS) + 1
_OUTCOMES = {
    TrafficOutcome.OK: "ok",
    TrafficOutcome.CLIENT_ERROR: "client_errors",
    TrafficOutcome.SERVER_ERROR: "server_errors",
}


def _traffic_sums(rows: QuerySet[EndpointTraffic], *by: str) -> QuerySet:
    """``rows`` grouped by ``by`` (outcome always among them): requests, tokens, the latency sum and
    each latency bucket (``b0``...) added up in SQL."""
    return (
        rows.values(*by, "outcome")
        .annotate(
            requests_sum=Sum("requests"),
            input_tokens_sum=Sum("input_tokens"),
            latency_sum=Sum("latency_ms_sum"),
            **{f"b{i}": Sum(f"latency_buckets__{i}") for i in range(_BUCKETS)},
        )
        .order_by()
    )


def _empty_cell() -> dict:
    return {
        "requests": 0,
        "ok": 0,
        "client_errors": 0,
        "server_errors": 0,
        "input_tokens": 0,
        "latency": 0.0,
        "buckets": [0] * _BUCKETS,
    }


def _add_row(cell: dict, row: dict) -> None:
    cell["requests"] += row["requests_sum"]
    cell[_OUTCOMES[row["outcome"]]] += row["requests_sum"]
    cell["input_tokens"] += row["input_tokens_sum"]
    cell["latency"] += row["latency_sum"]
    cell["buckets"] = [a + (row[f"b{i}"] or 0) for i, a in enumerate(cell["buckets"])]


def _merge_cells(cells) -> dict:
    total = _empty_cell()
    for cell in cells:
        for key in ("requests", "ok", "client_errors", "server_errors", "input_tokens", "latency"):
            total[key] += cell[key]
        total["buckets"] = [a + b for a, b in zip(total["buckets"], cell["buckets"], strict=True)]
    return total


def _summary(cell: dict) -> dict:
    """Requests by outcome, input tokens, mean and p50/p99 latency (ms) of a cell of sums."""
    return {
        "requests": cell["requests"],
        "ok": cell["ok"],
        "client_errors": cell["client_errors"],
        "server_errors": cell["server_errors"],
        "input_tokens": cell["input_tokens"],
        "mean_ms": cell["latency"] / cell["requests"] if cell["requests"] else None,
        "p50_ms": _quantile_ms(cell["buckets"], 0.50),
        "p99_ms": _quantile_ms(cell["buckets"], 0.99),
    }


def endpoint_traffic_summary(*, endpoint: Endpoint, start=None, end=None) -> dict:
    """What the gateways answered for ``endpoint`` (the minutes collected so far, optionally within
    [start, end)): requests by outcome, input tokens, mean and p50/p99 latency in milliseconds. One
    grouped sum (a row per outcome)."""
    rows = EndpointTraffic.objects.filter(endpoint=endpoint)
    if start is not None:
        rows = rows.filter(minute__gte=start)
    if end is not None:
        rows = rows.filter(minute__lt=end)
    cell = _empty_cell()
    for row in _traffic_sums(rows):
        _add_row(cell, row)
    return _summary(cell)


def endpoint_routes(*, organization_id) -> list[dict]:
    """What the gateway routes to for one organization (console.gateway): each endpoint not being
    deleted, by name, with its ready replicas' ids and addresses (none while deploying: the gateway
    answers 503 and when to retry, not 404). Two queries."""
    endpoints = list(
        Endpoint.objects.filter(organization_id=organization_id)
        .exclude(state__in=[EndpointState.DELETING, EndpointState.DELETED])
        .order_by("name")
        .values("id", "name", "state", "created_at")
    )
    ready: dict = {}
    for replica in (
        Replica.objects.filter(endpoint__in=[endpoint["id"] for endpoint in endpoints], state=ReplicaState.READY)
        .exclude(address="")
        .values("id", "endpoint_id", "address")
    ):
        ready.setdefault(replica["endpoint_id"], []).append({"id": str(replica["id"]), "address": replica["address"]})
    return [
        {
            "id": str(endpoint["id"]),
            "name": endpoint["name"],
            "state": endpoint["state"],
            "created": int(endpoint["created_at"].timestamp()),
            "replicas": ready.get(endpoint["id"], []),
        }
        for endpoint in endpoints
    ]


def endpoint_traffic_totals(*, endpoint_ids, start, end) -> dict:
    """``{endpoint_id: {"requests", "input_tokens"}}``: what the gateways answered for these endpoints
    in the minutes of [start, end), every outcome counted (what the bill shows beside the replicas'
    usage). One grouped sum; endpoints with no traffic are absent. Callers name endpoints they may see."""
    endpoint_ids = list(endpoint_ids)
    if not endpoint_ids:
        return {}
    rows = (
        EndpointTraffic.objects.filter(endpoint_id__in=endpoint_ids, minute__gte=start, minute__lt=end)
        .values("endpoint_id")
        .annotate(requests=Sum("requests"), input_tokens=Sum("input_tokens"))
        .order_by()
    )
    return {row["endpoint_id"]: {"requests": row["requests"], "input_tokens": row["input_tokens"]} for row in rows}


# --- The live endpoint page: the last hour of an endpoint ---------------------------------------------

TIMELINE_MAX_MINUTES = 24 * 60
RECENT_MINUTES = 5  # "now" latency: the last few minutes' requests
LIVE_IN_FLIGHT_SECONDS = 5  # "now" in flight: the average of the last few complete seconds
LIVE_RATE_SECONDS = 10  # "now" requests/s: arrivals over the last few complete seconds
MINUTE = timedelta(minutes=1)


def endpoint_cost_now(*, endpoint: Endpoint, now: datetime | None = None) -> dict:
    """What the endpoint has cost up to ``now`` and costs an hour now: every replica's slice billed
    for its active interval at its price, rated or not yet (what metering will rate; replicas are
    on-demand leases, never reserved terms), and the price of the slices active now. One sum."""
    now = now or timezone.now()
    held = ExpressionWrapper(
        Least(Coalesce(F("deactivated_at"), Value(now)), Value(now)) - F("activated_at"), output_field=DurationField()
    )
    active = Q(state=ReservationState.ACTIVE)
    sums = Reservation.objects.filter(replica__endpoint=endpoint, activated_at__isnull=False).aggregate(
        so_far=Sum(F("price_per_gpu_hour") * F("gpu_count") * Extract(held, "epoch") / Value(Decimal(3600))),
        per_hour=Sum(F("price_per_gpu_hour") * F("gpu_count"), filter=active),
    )
    so_far = max(sums["so_far"] or Decimal(0), Decimal(0)).quantize(LEDGER_QUANTUM)
    return {"so_far": so_far, "per_hour": sums["per_hour"] or Decimal(0), "as_of": now}


def _ready_interval(replica: Replica, now: datetime) -> tuple[datetime, datetime | None] | None:
    """When it served: from ready until drained, stopped or its slice ended; one not answering now
    (unhealthy: when it stopped answering is not recorded) counts up to now. None: never ready."""
    if replica.ready_at is None:
        return None
    ends = [at for at in (replica.draining_since, replica.stopped_at, replica.reservation.deactivated_at) if at]
    if ends:
        return replica.ready_at, min(ends)
    return replica.ready_at, None if replica.state == ReplicaState.READY else now


def _running_interval(replica: Replica) -> tuple[datetime, datetime | None]:
    """When it held its slice (starting, serving, draining): from placed until stopped or released."""
    ends = [at for at in (replica.stopped_at, replica.reservation.deactivated_at) if at]
    return replica.created_at, min(ends) if ends else None


def _count_at(intervals, at: datetime) -> int:
    return sum(1 for start, end in intervals if start <= at and (end is None or at < end))


def _replica_steps(replicas: list[Replica], events: list, asked_before: int, since: datetime, now: datetime):
    """Replicas ready and running, and the autoscaler's ask, at ``since``, at each change, and now."""
    ready = [i for i in (_ready_interval(r, now) for r in replicas) if i]
    running = [_running_interval(r) for r in replicas]
    changes = {since, now, *(e.at for e in events if since < e.at <= now)}
    for start, end in (*ready, *running):
        changes.update(at for at in (start, end) if at is not None and since < at <= now)
    asks = sorted(((e.at, e.to_replicas) for e in events), key=lambda ask: ask[0])
    steps = []
    for at in sorted(changes):
        asked = asked_before
        for when, to in asks:
            if when <= at:
                asked = to
        steps.append({"at": at, "ready": _count_at(ready, at), "running": _count_at(running, at), "asked": asked})
    return steps


def _cold_starts(replicas: list[Replica], since: datetime, now: datetime) -> list[dict]:
    """Each replica placed in the window, newest first: how long from placed to answering (a cold
    start), or how long it has been starting, or that it stopped before it answered."""
    starts = []
    for replica in sorted(replicas, key=lambda r: r.created_at, reverse=True):
        if replica.created_at < since:
            continue
        if replica.ready_at is not None:
            outcome, seconds = "ready", (replica.ready_at - replica.created_at).total_seconds()
        elif replica.state in (ReplicaState.STOPPING, ReplicaState.STOPPED):
            outcome, seconds = "failed", None
        else:
            outcome, seconds = "starting", (now - replica.created_at).total_seconds()
        starts.append(
            {
                "replica": replica.pk,
                "created_at": replica.created_at,
                "ready_at": replica.ready_at,
                "seconds": round(seconds, 1) if seconds is not None else None,
                "outcome": outcome,
                "state": replica.state,
                "reason": replica.failure_reason if outcome == "failed" else "",
            }
        )
    return starts


def _gpu_utilization(replicas: list[Replica], since: datetime) -> list[dict]:
    """Each replica's GPUs' utilization over the window, sealed as any reservation's telemetry is: the
    GPUs its slice held, only while its reservation was active (whole minutes of rollups; the latest
    reading only if measured inside). Per replica, the mean over its GPUs: per minute and latest."""
    holdings = {replica.pk: reservation_holdings(reservation=replica.reservation) for replica in replicas}
    every = [holding for held in holdings.values() for holding in held]
    if not every:
        return []
    gpus = gpus_held(holdings=every)

    def owner(uuid: str, at: datetime):
        gpu = gpus.get(uuid)
        if gpu is None:
            return None
        for replica_id, held in holdings.items():
            for h in held:
                if h.node_id == gpu["node_id"] and gpu["index"] in h.gpus and h.covers(at):
                    return replica_id
        return None

    minutes: dict = {}
    for rollup in rollups_held(holdings=every, since=since):
        replica_id = owner(rollup["uuid"], rollup["minute"])
        if replica_id is not None and rollup["util_mean"] is not None:
            minutes.setdefault(replica_id, {}).setdefault(rollup["minute"], []).append(rollup["util_mean"])
    latest: dict = {}
    for frame in latest_frames_held(holdings=every):
        at = datetime.fromtimestamp(frame["at"], UTC)
        for reading in frame["gpus"]:
            replica_id = owner(reading["uuid"], at)
            if replica_id is not None and reading.get(UTIL) is not None:
                latest.setdefault(replica_id, {"at": at, "values": []})["values"].append(float(reading[UTIL]))
    series = []
    for replica in replicas:
        if not holdings[replica.pk]:
            continue  # never active: nothing of its GPUs is its to read
        allocation = next(iter(replica.reservation.allocations.all()), None)
        mine = minutes.get(replica.pk, {})
        now_reading = latest.get(replica.pk)
        series.append(
            {
                "replica": replica.pk,
                "node": allocation.node.hostname if allocation else None,
                "gpu_label": allocation.gpu_label if allocation else None,
                "minutes": [
                    {"minute": minute, "util": round(sum(values) / len(values), 2)}
                    for minute, values in sorted(mine.items())
                ],
                "latest": (
                    {
                        "at": now_reading["at"],
                        "util": round(sum(now_reading["values"]) / len(now_reading["values"]), 2),
                    }
                    if now_reading
                    else None
                ),
            }
        )
    return series


def _live(concurrency, now: datetime) -> dict:
    """The gateways' last seconds (in flight and arrivals each second, oldest first) and the numbers
    of now drawn from them."""
    in_flight, arrivals = list(concurrency.concurrency), list(concurrency.arrivals)
    last = int(now.timestamp()) - 1  # concurrency_series: the last complete second
    start = datetime.fromtimestamp(last - len(in_flight) + 1, UTC)
    recent_flight = in_flight[-LIVE_IN_FLIGHT_SECONDS:]
    recent_arrivals = arrivals[-LIVE_RATE_SECONDS:]
    return {
        "in_flight": round(sum(recent_flight) / len(recent_flight), 3) if recent_flight else 0.0,
        "requests_per_s": round(sum(recent_arrivals) / len(recent_arrivals), 3) if recent_arrivals else 0.0,
        "seconds": {
            "start": start,
            "in_flight": [round(value, 3) for value in in_flight],
            "arrivals": arrivals,
        },
    }


def endpoint_timeline(*, endpoint: Endpoint, minutes: int = 60, now: datetime | None = None, concurrency=None) -> dict:
    """The live endpoint page's document: the last ``minutes`` of ``endpoint`` (one of the caller's,
    from endpoint_get) -- per minute, requests by outcome and per second, input tokens, p50/p99 and
    mean latency and the average in flight (the requests' latencies over the minute, Little's law);
    replicas ready and running and the autoscaler's ask at every change, with its scale events; each
    replica placed in the window and how long it took to answer; its replicas' GPU utilization (sealed
    as reservations' telemetry is); and the cost so far. ``concurrency``, when given, is the endpoint's
    last seconds as the gateways reported them (``concurrency_series``: the services own that Redis
    hash, a selector does not import them): the live in-flight and requests/s. A handful of queries."""
    now = now or timezone.now()
    minutes = max(1, min(int(minutes), TIMELINE_MAX_MINUTES))
    current = now.replace(second=0, microsecond=0)
    since = current - (minutes - 1) * MINUTE

    cells: dict = {}
    for row in _traffic_sums(EndpointTraffic.objects.filter(endpoint=endpoint, minute__gte=since), "minute"):
        _add_row(cells.setdefault(row["minute"], _empty_cell()), row)
    per_minute = []
    for step in range(minutes):
        minute = since + step * MINUTE
        cell = cells.get(minute) or _empty_cell()
        seconds = 60.0 if minute < current else max((now - minute).total_seconds(), 1.0)
        per_minute.append(
            {
                "minute": minute,
                "seconds": round(seconds, 3),
                **_summary(cell),
                "requests_per_s": round(cell["requests"] / seconds, 4),
                "errors_per_s": round((cell["client_errors"] + cell["server_errors"]) / seconds, 4),
                "in_flight": round(cell["latency"] / 1000.0 / seconds, 4),
            }
        )
    recent_from = current - (RECENT_MINUTES - 1) * MINUTE

    replicas = list(
        Replica.objects.filter(endpoint=endpoint, created_at__lte=now)
        .filter((Q(stopped_at__isnull=True) & ~Q(state=ReplicaState.STOPPED)) | Q(stopped_at__gte=since))
        .select_related("reservation")
        .prefetch_related(
            Prefetch("reservation__allocations", queryset=Allocation.objects.select_related("node").order_by("pk"))
        )
        .order_by("created_at")
    )
    events = list(endpoint.scale_events.filter(at__gte=since, at__lte=now).order_by("at"))
    before = endpoint.scale_events.filter(at__lt=since).order_by("-at").values_list("to_replicas", flat=True).first()
    if before is None:
        before = events[0].from_replicas if events else endpoint.replica_target

    cost = endpoint_cost_now(endpoint=endpoint, now=now)
    return {
        "id": endpoint.pk,
        "state": endpoint.state,
        "now": now,
        "since": since,
        "minutes": per_minute,
        "totals": _summary(_merge_cells(cells.values())),
        "recent": _summary(_merge_cells(cell for minute, cell in cells.items() if minute >= recent_from)),
        "live": _live(concurrency, now) if concurrency is not None else None,
        "replicas": {
            "ready": sum(r.state == ReplicaState.READY for r in replicas),
            "running": sum(r.state != ReplicaState.STOPPED for r in replicas),
            "target": endpoint.replica_target,
            "min": endpoint.min_replicas,
            "max": endpoint.max_replicas,
            "reservations": [r.reservation_id for r in replicas if r.state != ReplicaState.STOPPED],
            "steps": _replica_steps(replicas, events, before, since, now),
        },
        "scale_events": [
            {
                "at": e.at,
                "from_replicas": e.from_replicas,
                "to_replicas": e.to_replicas,
                "reason": e.reason,
                "panic": e.panic,
            }
            for e in events
        ],
        "cold_starts": _cold_starts(replicas, since, now),
        "gpus": _gpu_utilization(replicas, since),
        "cost": cost,
    }


# --- Operators: /metrics (not tenant-scoped by design) ------------------------------------------------

COLD_START_BUCKETS_S = (10, 30, 60, 120, 300, 600, 1800)


def endpoint_metrics_totals() -> list[dict]:
    """Per endpoint not deleted, for Prometheus: requests by outcome and latency buckets since it was
    made, its replicas by state (stopped ones left out), and its cold starts (replicas that came to
    answer) with how long each took, bucketed. Four grouped queries, whatever the number of rows."""
    endpoints = list(
        Endpoint.objects.exclude(state=EndpointState.DELETED)
        .order_by("organization__slug", "name")
        .values("id", "name", "organization__slug")
    )
    if not endpoints:
        return []
    ids = [endpoint["id"] for endpoint in endpoints]
    traffic: dict = {}
    for row in _traffic_sums(EndpointTraffic.objects.filter(endpoint_id__in=ids), "endpoint_id"):
        _add_row(traffic.setdefault(row["endpoint_id"], _empty_cell()), row)
    replicas: dict = {}
    for row in (
        Replica.objects.filter(endpoint_id__in=ids)
        .exclude(state=ReplicaState.STOPPED)
        .values("endpoint_id", "state")
        .annotate(n=Count("id"))
        .order_by()
    ):
        replicas.setdefault(row["endpoint_id"], {})[row["state"]] = row["n"]
    took = ExpressionWrapper(F("ready_at") - F("created_at"), output_field=DurationField())
    cold: dict = {
        row["endpoint_id"]: row
        for row in Replica.objects.filter(endpoint_id__in=ids, ready_at__isnull=False)
        .alias(took=took)
        .values("endpoint_id")
        .annotate(
            n=Count("id"),
            seconds=Sum(Extract("took", "epoch")),
            **{
                f"le{i}": Count("id", filter=Q(took__lte=timedelta(seconds=bound)))
                for i, bound in enumerate(COLD_START_BUCKETS_S)
            },
        )
        .order_by()
    }
    totals = []
    for endpoint in endpoints:
        cell = traffic.get(endpoint["id"]) or _empty_cell()
        starts = cold.get(endpoint["id"])
        totals.append(
            {
                "id": endpoint["id"],
                "name": endpoint["name"],
                "tenant": endpoint["organization__slug"],
                "requests": {outcome: cell[name] for outcome, name in _OUTCOMES.items()},
                "latency_buckets": cell["buckets"],
                "latency_ms_sum": cell["latency"],
                "replicas": replicas.get(endpoint["id"], {}),
                "cold_starts": starts["n"] if starts else 0,
                "cold_start_seconds": float(starts["seconds"] or 0) if starts else 0.0,
                "cold_start_buckets": [starts[f"le{i}"] for i in range(len(COLD_START_BUCKETS_S))]
                if starts
                else [0] * len(COLD_START_BUCKETS_S),
            }
        )
    return totals
