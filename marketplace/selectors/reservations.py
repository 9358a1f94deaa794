"""Tenant-scoped reads of reservations."""

from datetime import UTC, datetime
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db.models import DecimalField, OuterRef, Prefetch, QuerySet, Subquery, Sum

from console.kernel.errors import NotFound
from marketplace.choices import ReservationState
from marketplace.models import Allocation, Reservation, UsageRecord
from marketplace.tenant_context import TenantContext
from provisioning.choices import CommandKind
from provisioning.models import NodeCommand
from provisioning.selectors.telemetry import (
    Holding,
    energy_kwh_held,
    gpus_of_nodes,
    latest_frames_held,
    rollups_held,
    since_minutes,
)
from provisioning.services import telemetry as t


def billed_of(reservations: QuerySet[Reservation]) -> QuerySet[Reservation]:
    """Each with ``billed_amount``: the sum of its rated usage (None while nothing is rated), one
    correlated sum over the usage records' (reservation, period) index."""
    rated = (
        UsageRecord.objects.filter(reservation=OuterRef("pk"))
        .order_by()
        .values("reservation")
        .annotate(total=Sum("amount"))
        .values("total")
    )
    return reservations.annotate(billed_amount=Subquery(rated, output_field=DecimalField()))


def reservation_billed(*, reservation: Reservation) -> Decimal | None:
    """What its rated usage has cost (None while nothing is rated): the annotation billed_of made,
    else one sum."""
    if hasattr(reservation, "billed_amount"):
        return reservation.billed_amount
    return UsageRecord.objects.filter(reservation=reservation).aggregate(total=Sum("amount"))["total"]


def reservation_list(*, tenant: TenantContext, state: str | None = None) -> QuerySet[Reservation]:
    reservations = billed_of(
        Reservation.objects.filter(organization=tenant.organization, replica__isnull=True)  # replicas: endpoints'
        .select_related("offer__site", "offer__accelerator_type", "created_by", "rack", "image")
        .prefetch_related(
            Prefetch(
                "allocations", queryset=Allocation.objects.select_related("node__rack__site").order_by("node__hostname")
            )
        )
    )
    if state:
        reservations = reservations.filter(state=state)
    return reservations.order_by("-created_at")


def reservation_get(*, tenant: TenantContext, reservation_id) -> Reservation:
    try:
        return reservation_list(tenant=tenant).get(pk=reservation_id)
    except (Reservation.DoesNotExist, ValidationError, ValueError):
        raise NotFound("No such reservation in this organization.") from None


# Operator-side reads for the lifecycle tick: not tenant-scoped by design.


def reservations_due_to_begin(*, now: datetime) -> list:
    return list(
        Reservation.objects.filter(state=ReservationState.PENDING, period__startswith__lte=now).values_list(
            "pk", flat=True
        )
    )


def reservations_due_to_end(*, now: datetime) -> list:
    return list(
        Reservation.objects.filter(
            state__in=[ReservationState.PROVISIONING, ReservationState.ACTIVE], period__endswith__lte=now
        ).values_list("pk", flat=True)
    )


def reservation_progress(*, reservation: Reservation) -> list[dict]:
    """Per node, the latest command provisioning or releasing it: what the agent reported."""
    latest: dict[int, NodeCommand] = {}
    for command in (
        NodeCommand.objects.filter(correlation_id=reservation.pk, kind__in=(CommandKind.PROVISION, CommandKind.RELEASE))
        .select_related("node")
        .order_by("created_at")
    ):
        latest[command.node_id] = command
    return [
        {
            "node": c.node.hostname,
            "kind": c.kind,
            "state": c.state,
            "step": c.progress_step,
            "percent": c.progress_percent,
            "error": c.error,
        }
        for c in sorted(latest.values(), key=lambda c: c.node.hostname)
    ]


def _gpus(reservation: Reservation) -> dict[int, range]:
    """{node id: the GPU indices it holds there}, from its allocations (one per node)."""
    # .all(): reservation_get prefetched its allocations, so the telemetry reads ask no more queries.
    return {allocation.node_id: allocation.gpu_indices for allocation in reservation.allocations.all()}


def reservation_holdings(*, reservation: Reservation) -> list[Holding]:
    """What of the fleet's telemetry this reservation may read: the GPUs its allocations hold (a slice:
    some of a node's; another tenant may hold the rest at the same time) over its active interval
    [activated_at, deactivated_at). Booked is not held -- a reservation that never went active (pending,
    cancelled, failed) reads nothing, and a finished one reads its own interval only, never who holds
    the GPUs now (ARCHITECTURE invariant 5)."""
    if reservation.activated_at is None:
        return []
    return [
        Holding(node_id=node_id, gpus=gpus, start=reservation.activated_at, end=reservation.deactivated_at)
        for node_id, gpus in _gpus(reservation).items()
    ]


def reservation_telemetry(*, reservation: Reservation, minutes: int) -> dict:
    """Its GPUs, their one-minute rollups over the last ``minutes`` (inside its active interval), and
    each node's latest batch while it is active (its GPUs' readings only)."""
    holdings = reservation_holdings(reservation=reservation)
    return {
        "gpus": gpus_of_nodes(gpus=_gpus(reservation)),
        "rollups": rollups_held(holdings=holdings, since=since_minutes(minutes)),
        "latest": latest_frames_held(holdings=holdings),
    }


def reservation_energy_kwh(*, reservation: Reservation):
    """kWh its GPUs drew while it was active (energy counters, whole minutes); None before active."""
    if reservation.activated_at is None:
        return None
    return energy_kwh_held(holdings=reservation_holdings(reservation=reservation))


def reservation_gpus_now(*, reservation: Reservation) -> list[dict]:
    """Its GPUs with their latest readings while active (for the page before its live feed catches up)."""
    latest = {}
    for frame in latest_frames_held(holdings=reservation_holdings(reservation=reservation)):
        at = datetime.fromtimestamp(frame["at"], UTC)
        for gpu in frame["gpus"]:
            latest[gpu["uuid"]] = {
                "util": gpu.get(t.UTIL),
                "power": gpu.get(t.POWER),
                "fb_used": gpu.get(t.FB_USED),
                "fb_total": gpu.get(t.FB_TOTAL),
                "temp": gpu.get(t.TEMP),
                "sm_clock": gpu.get(t.SM_CLOCK),
                "at": at,
            }
    return [{**gpu, **latest.get(gpu["uuid"], {})} for gpu in gpus_of_nodes(gpus=_gpus(reservation))]
