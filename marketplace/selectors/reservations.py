"""Tenant-scoped reads of reservations."""

from datetime import datetime

from django.core.exceptions import ValidationError
from django.db.models import Prefetch, QuerySet

from console.errors import NotFound
from marketplace.choices import ReservationState
from marketplace.models import Allocation, Reservation
from marketplace.tenancy import TenantContext


def reservation_list(*, tenant: TenantContext, state: str | None = None) -> QuerySet[Reservation]:
    reservations = (
        Reservation.objects.filter(organization=tenant.organization)
        .select_related("offer__site", "offer__accelerator_type", "created_by", "rack")
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
    from provisioning.models import NodeCommand

    latest: dict[int, NodeCommand] = {}
    for command in (
        NodeCommand.objects.filter(correlation_id=reservation.pk).select_related("node").order_by("created_at")
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
