import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import DateTimeRangeField, IntegerRangeField, RangeOperators
from django.contrib.postgres.indexes import GistIndex
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

from marketplace.choices import FINISHED_STATES, HOLDING_STATES, OfferShape, ReservationState, TermMonths
from marketplace.money import SECONDS_PER_HOUR, cents, cost, seconds_between
from provisioning.models import AcceleratorType, Node, Rack

from .catalog import Image, Offer
from .tenancy import Organization, SshKey

S = ReservationState

# The reservation lifecycle (ARCHITECTURE "Lifecycles"). Every move goes through
# marketplace.services.reservations.lifecycle, which checks this table.
RESERVATION_TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.PROVISIONING, S.CANCELLED}),
    S.PROVISIONING: frozenset({S.ACTIVE, S.FAILED, S.RELEASING}),
    S.ACTIVE: frozenset({S.RELEASING}),
    S.RELEASING: frozenset({S.COMPLETED}),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
    S.FAILED: frozenset(),
}


@dataclass(frozen=True)
class OnEnter:
    """What entering a state sets off (services.reservations carries it out, in the move's transaction).
    Every move also tells the tenant (``reservation.<state>``) and the nodes' agents (who may see their
    telemetry changed). ``tasks``: Celery tasks sent, by name, with the reservation's id after commit;
    ``frees_nodes``: its allocations stop holding their nodes."""

    tasks: tuple[str, ...] = ()
    frees_nodes: bool = False


_RATE = "marketplace.tasks.rate_reservation"  # rate it to its end and release the rest of its hold
RESERVATION_ON_ENTER: dict[str, OnEnter] = {
    S.PENDING: OnEnter(),
    S.PROVISIONING: OnEnter(tasks=("marketplace.tasks.provision_reservation",)),
    S.ACTIVE: OnEnter(),
    S.RELEASING: OnEnter(tasks=("marketplace.tasks.release_reservation", _RATE)),
    S.COMPLETED: OnEnter(frees_nodes=True),
    S.CANCELLED: OnEnter(tasks=(_RATE,), frees_nodes=True),
    # Some nodes may have been set up before one failed: tear them all down.
    S.FAILED: OnEnter(tasks=("marketplace.tasks.release_reservation", _RATE), frees_nodes=True),
}


def can_end_early(state: str) -> bool:
    """Whether a reservation in ``state`` can still be cancelled or released, and so extended too."""
    return bool(RESERVATION_TRANSITIONS[state] & {S.CANCELLED, S.RELEASING})


def billed_interval(
    *,
    activated_at: datetime | None,
    deactivated_at: datetime | None,
    released_early_at: datetime | None,
    booked_end: datetime,
    now: datetime,
) -> tuple[datetime, datetime] | None:
    """The time a reservation is billed for, up to ``now``: its active interval [activated_at,
    deactivated_at); for a reserved term its tenant released early, from activation (or the release, if
    it never went active) to the term's booked end -- the commitment. None: nothing billed (yet)."""
    if released_early_at is not None:
        start, end = activated_at or released_early_at, booked_end
    elif activated_at is not None:
        start, end = activated_at, deactivated_at or now
    else:
        return None
    end = min(end, now)
    return (start, end) if end > start else None


class Reservation(models.Model):
    """A tenant's rental of ``quantity`` nodes (or one whole rack) of an offer for ``[start, end)``.

    The price per GPU-hour is copied from the offer when the reservation is made and kept."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="reservations")
    offer = models.ForeignKey(Offer, on_delete=models.PROTECT, related_name="reservations")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="reservations"
    )
    shape = models.CharField(max_length=8, choices=OfferShape.choices)
    quantity = models.PositiveIntegerField(help_text="Nodes asked for; 1 for a whole rack.")
    rack = models.ForeignKey(Rack, on_delete=models.PROTECT, null=True, blank=True, related_name="reservations")
    node_count = models.PositiveIntegerField()
    gpu_count = models.PositiveIntegerField()
    period = DateTimeRangeField(help_text="Half-open [start, end).")
    state = models.CharField(max_length=16, choices=ReservationState.choices, default=S.PENDING)
    state_changed_at = models.DateTimeField(auto_now_add=True)
    price_per_gpu_hour = models.DecimalField(max_digits=10, decimal_places=4)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001 - NULL: none sent
    failure_reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # The active interval: from every node reporting ready to the release (energy, and later billing).
    activated_at = models.DateTimeField(null=True, blank=True)
    deactivated_at = models.DateTimeField(null=True, blank=True)
    # None: on demand. Otherwise a reserved term at the offer's term discount (price kept as above).
    term_months = models.PositiveSmallIntegerField(null=True, blank=True, choices=TermMonths.choices)
    # Set by billing (marketplace.services.billing.metering) once every billed second is rated and the hold released.
    billing_settled_at = models.DateTimeField(null=True, blank=True)
    # A reserved term is a commitment: released by its tenant before its end, its nodes are freed at
    # once but the rest of the term, [released_early_at, end), is still billed (docs/billing.md).
    released_early_at = models.DateTimeField(null=True, blank=True)
    # A way in (docs/access.md): what its nodes boot into, and the keys its SSH access lets in. An
    # endpoint's replica has no access (``has_access`` false): only the gateway reaches it.
    has_access = models.BooleanField(default=False)
    image = models.ForeignKey(Image, on_delete=models.PROTECT, null=True, blank=True, related_name="reservations")
    ssh_keys = models.ManyToManyField(SshKey, blank=True, related_name="reservations")
    # Bumped with every change of its keys, under its row lock; agents apply a key list only if newer.
    access_version = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(state__in=ReservationState.values), name="reservation_state_valid"
            ),
            models.CheckConstraint(condition=models.Q(quantity__gt=0), name="reservation_quantity_positive"),
            models.UniqueConstraint(
                fields=["organization", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="reservation_idempotency_key_unique",
            ),
        ]
        indexes = [
            # The quota check: a tenant's holding reservations overlapping a window (bench/placement).
            GistIndex(
                fields=["organization", "period"],
                name="reservation_holding_period_idx",
                condition=models.Q(state__in=sorted(HOLDING_STATES)),
            ),
            models.Index(fields=["organization", "state"], name="reservation_org_state_idx"),
            models.Index(fields=["state"], name="reservation_state_idx"),
            # What rating still has to look at.
            models.Index(
                fields=["id"], name="reservation_unsettled_idx", condition=models.Q(billing_settled_at__isnull=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id.hex[:8]} · {self.offer} × {self.quantity}"

    @property
    def start(self):
        return self.period.lower

    @property
    def end(self):
        return self.period.upper

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    @property
    def hours(self) -> Decimal:
        return seconds_between(self.start, self.end) / SECONDS_PER_HOUR

    @property
    def can_cancel(self) -> bool:
        """Cancel before its start, release after (RESERVATION_TRANSITIONS)."""
        return can_end_early(self.state)

    @property
    def can_extend(self) -> bool:
        return can_end_early(self.state)

    def billed_interval(self, now: datetime) -> tuple[datetime, datetime] | None:
        """[start, end) of the time billed so far (see ``billed_interval``)."""
        return billed_interval(
            activated_at=self.activated_at,
            deactivated_at=self.deactivated_at,
            released_early_at=self.released_early_at,
            booked_end=self.end,
            now=now,
        )

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def ended_at(self):
        """When it really ended: its active interval's end, or (never active) when it was cancelled,
        failed or completed; None while it has not ended."""
        if self.deactivated_at is not None:
            return self.deactivated_at
        return self.state_changed_at if self.is_finished else None

    @property
    def active_hours(self) -> Decimal:
        """Hours it was active (what billing rates); up to now while it still is."""
        if self.activated_at is None:
            return Decimal(0)
        end = self.deactivated_at or timezone.now()
        return max(seconds_between(self.activated_at, end), Decimal(0)) / SECONDS_PER_HOUR

    @property
    def estimated_cost(self) -> Decimal:
        """The whole period at the kept price (what was held); billing rates what was really active."""
        return cents(
            cost(
                price_per_gpu_hour=self.price_per_gpu_hour,
                gpus=self.gpu_count,
                seconds=seconds_between(self.start, self.end),
            )
        )


class Allocation(models.Model):
    """GPUs of one node held by a reservation for a half-open period: the contiguous range ``gpus`` of
    the node's GPU indices, [first, last + 1) -- all of them for a whole node or a rack. PostgreSQL
    refuses two live allocations of one node whose GPU ranges and periods both overlap, whatever the
    code above it does (ARCHITECTURE invariant 1).

    ``offer`` is the reservation's offer, copied by the database as the row is written (a trigger,
    migration 0011, whatever the writer sends) so that placement can read the live allocations of one
    site's nodes of one kind through one index -- those of the offers sharing them -- instead of every
    allocation of the fleet or every node in turn (marketplace.selectors.capacity, docs/benchmarks.md)."""

    reservation = models.ForeignKey(Reservation, on_delete=models.CASCADE, related_name="allocations")
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="allocations")
    offer = models.ForeignKey(
        Offer,
        on_delete=models.PROTECT,
        related_name="+",
        editable=False,
        db_index=False,  # allocation_pool_period_idx leads with it
        help_text="The reservation's offer, set by the database on insert (read by placement).",
    )
    gpus = IntegerRangeField(help_text="The node's GPU indices held, half-open [first, last + 1).")
    period = DateTimeRangeField()
    live = models.BooleanField(default=True, help_text="False once the reservation no longer holds the node.")

    class Meta:
        ordering = ["reservation", "node"]
        constraints = [
            ExclusionConstraint(
                name="allocation_no_overlap",
                expressions=[
                    ("node", RangeOperators.EQUAL),
                    ("gpus", RangeOperators.OVERLAPS),
                    ("period", RangeOperators.OVERLAPS),
                ],
                condition=models.Q(live=True),
            ),
            models.CheckConstraint(
                condition=models.Q(gpus__isempty=False, gpus__startswith__gte=0), name="allocation_gpus_valid"
            ),
            models.UniqueConstraint(fields=["reservation", "node"], name="allocation_unique_node_per_reservation"),
        ]
        indexes = [
            # Placement's pool scan: the live allocations of some offers overlapping a window, read
            # from the index alone (the node and its GPUs are in it).
            GistIndex(
                fields=["offer", "period"],
                include=["node", "gpus"],
                condition=models.Q(live=True),
                name="allocation_pool_period_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.node} {self.gpu_label} for {self.reservation_id}"

    @property
    def gpu_indices(self) -> range:
        return range(self.gpus.lower, self.gpus.upper)

    @property
    def gpu_label(self) -> str:
        """``GPU 3`` or ``GPUs 4–7``."""
        first, last = self.gpus.lower, self.gpus.upper - 1
        return f"GPU {first}" if first == last else f"GPUs {first}–{last}"


class Quota(models.Model):
    """The most GPUs of one accelerator type a tenant may hold at once, set by operators. Without a
    row, settings.DEFAULT_GPU_QUOTA applies."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="quotas")
    accelerator_type = models.ForeignKey(AcceleratorType, on_delete=models.CASCADE, related_name="quotas")
    max_gpus = models.PositiveIntegerField()

    class Meta:
        ordering = ["organization", "accelerator_type"]
        constraints = [models.UniqueConstraint(fields=["organization", "accelerator_type"], name="quota_unique")]

    def __str__(self) -> str:
        return f"{self.organization}: {self.max_gpus} × {self.accelerator_type.slug}"


class IdempotencyRecord(models.Model):
    """The first response to a POST sent with an Idempotency-Key, replayed for repeats of it
    (ARCHITECTURE invariant 7). Kept for a day."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="idempotency_records")
    key = models.CharField(max_length=255)
    endpoint = models.CharField(max_length=200, help_text="Method and path the key was used with.")
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the request body.")
    response_status = models.PositiveSmallIntegerField()
    response_body = models.JSONField(encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["organization", "key"], name="idempotency_key_unique")]

    def __str__(self) -> str:
        return f"{self.organization_id}:{self.key}"
