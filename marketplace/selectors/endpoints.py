"""Tenant-scoped reads of inference endpoints and their replicas, and the catalog of served models."""

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db.models import Count, Prefetch, Q, QuerySet, Sum

from console.kernel.errors import DomainError, NotFound
from marketplace.choices import LIVE_REPLICA_STATES, ReplicaState
from marketplace.models import (
    LATENCY_BUCKETS_MS,
    Allocation,
    Endpoint,
    EndpointState,
    EndpointTraffic,
    Replica,
    ServedModel,
    TrafficOutcome,
    UsageRecord,
)
from marketplace.tenant_context import TenantContext
from provisioning.models import AcceleratorType, Site


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


def endpoint_traffic_summary(*, endpoint: Endpoint, start=None, end=None) -> dict:
    """What the gateways answered for ``endpoint`` (the minutes collected so far, optionally within
    [start, end)): requests by outcome, input tokens, mean and p50/p99 latency in milliseconds."""
    rows = EndpointTraffic.objects.filter(endpoint=endpoint)
    if start is not None:
        rows = rows.filter(minute__gte=start)
    if end is not None:
        rows = rows.filter(minute__lt=end)
    summary = {"requests": 0, "ok": 0, "client_errors": 0, "server_errors": 0, "input_tokens": 0}
    buckets, latency_sum = [0] * (len(LATENCY_BUCKETS_MS) + 1), 0.0
    names = {
        TrafficOutcome.OK: "ok",
        TrafficOutcome.CLIENT_ERROR: "client_errors",
        TrafficOutcome.SERVER_ERROR: "server_errors",
    }
    for row in rows.only("outcome", "requests", "input_tokens", "latency_ms_sum", "latency_buckets"):
        summary["requests"] += row.requests
        summary[names[row.outcome]] += row.requests
        summary["input_tokens"] += row.input_tokens
        latency_sum += row.latency_ms_sum
        buckets = [a + b for a, b in zip(buckets, row.latency_buckets, strict=True)]
    summary["mean_ms"] = latency_sum / summary["requests"] if summary["requests"] else None
    summary["p50_ms"] = _quantile_ms(buckets, 0.50)
    summary["p99_ms"] = _quantile_ms(buckets, 0.99)
    return summary


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
