"""Reservations: made, extended, cancelled, and moved along their lifecycle. The only writer of
Reservation and Allocation rows."""

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange, NumericRange
from django.db.models import Q, Sum
from django.utils import timezone

from console.kernel.errors import Conflict, DomainError
from console.kernel.events import publish_on_commit, tenant_group
from console.kernel.lifecycle import IllegalTransition, transition
from console.kernel.tasks import enqueue_on_commit
from marketplace.choices import HOLDING_STATES, OfferShape, ReservationState, Role
from marketplace.models import (
    RESERVATION_ON_ENTER,
    RESERVATION_TRANSITIONS,
    Allocation,
    Offer,
    Organization,
    Quota,
    Reservation,
)
from marketplace.money import SECONDS_PER_HOUR, add_months, cents, cost, seconds_between, term_price
from marketplace.selectors.access import image_for
from marketplace.selectors.capacity import MAX_ADVANCE, WHOLE_RACKS, earliest_fit
from marketplace.selectors.catalog import price_in_force
from marketplace.selectors.reservations import reservations_due_to_begin, reservations_due_to_end
from marketplace.services.billing.ledger import hold_check, hold_place
from marketplace.services.reservations.access import keys_for
from marketplace.services.reservations.placement import (
    CapacityUnavailable,
    Placement,
    PowerBudgetExceeded,
    nodes_lock,
    placement_check,
    placement_pick,
    power_refusal,
    power_short,
)
from marketplace.services.tenancy.members import organization_lock
from marketplace.tenant_context import TenantContext
from provisioning.models import Node
from provisioning.services.agents import agent_group

logger = logging.getLogger(__name__)
S = ReservationState

CLOCK_SKEW = timedelta(minutes=1)  # a start this far in the past is taken as "now"
MIN_DURATION = timedelta(minutes=1)
# The longest any reservation may last, whatever its offer allows: with MAX_ADVANCE, it bounds every
# date the services compute, so that none can leave the calendar (year 9999).
MAX_DURATION_HOURS = 5 * 366 * 24


class QuotaExceeded(Conflict):
    code = "quota_exceeded"


@dataclass(frozen=True)
class Quote:
    """What a reservation would hold and cost, before it is made."""

    offer: Offer
    quantity: int
    start: datetime
    end: datetime
    node_count: int
    gpu_count: int
    price_per_gpu_hour: Decimal
    term_months: int | None = None

    @property
    def hours(self) -> Decimal:
        return seconds_between(self.start, self.end) / SECONDS_PER_HOUR

    @property
    def expected_cost(self) -> Decimal:
        """The whole period at the price: what is held when it is made."""
        return cost(
            price_per_gpu_hour=self.price_per_gpu_hour,
            gpus=self.gpu_count,
            seconds=seconds_between(self.start, self.end),
        )

    @property
    def estimated_cost(self) -> Decimal:
        return cents(self.expected_cost)


def _window_error(message: str, field: str) -> DomainError:
    return DomainError(message, code="invalid_window", fields={field: [message]})


def _most_hours(offer: Offer) -> int:
    return min(offer.max_duration_hours, MAX_DURATION_HOURS)


def _too_long(offer: Offer, field: str) -> DomainError:
    return _window_error(f"This offer allows at most {_most_hours(offer):,} hours per reservation.", field)


def _hours(duration_hours: Decimal | int, *, offer: Offer, field: str) -> timedelta:
    """``duration_hours`` as a timedelta, refused (naming ``field``) before any arithmetic unless it
    is from a minute to what the offer allows."""
    hours = Decimal(str(duration_hours))
    if not hours.is_finite() or hours * 60 < 1:
        raise _window_error("A reservation lasts at least a minute.", field)
    if hours > _most_hours(offer):
        raise _too_long(offer, field)
    return timedelta(microseconds=int(hours * 3_600_000_000))


def reservation_quote(
    *,
    offer: Offer,
    quantity: int,
    start: datetime | None,
    end: datetime | None,
    duration_hours: Decimal | int | None = None,
    term_months: int | None = None,
    now: datetime | None = None,
) -> Quote:
    """Validate a request against the offer and say what it would hold and cost: on demand for
    [start, end) or ``duration_hours`` from start, at the price in force; or a reserved term of
    ``term_months`` from start at the offer's discount for that term. The start and the duration are
    bounded before an end is computed from them, so no input can overflow the calendar. Raises
    DomainError (400) naming the field at fault."""
    now = now or timezone.now()
    if not offer.is_active:
        raise DomainError(
            f"Offer {offer.pk} is not available for new reservations.",
            code="offer_inactive",
            fields={"offer": ["This offer is no longer sold."]},
        )
    if quantity < 1:
        raise DomainError("Quantity must be at least 1.", fields={"quantity": ["Must be at least 1."]})
    if offer.shape == OfferShape.RACK and quantity != 1:
        raise DomainError(
            "A rack offer rents one whole rack per reservation; use quantity 1.",
            fields={"quantity": ["Must be 1 for a rack offer."]},
        )
    if offer.is_slice and quantity != 1:
        raise DomainError(
            f"A {offer.gpus_per_instance}-GPU instance is rented one per reservation; use quantity 1 (for more "
            "GPUs together, choose a larger instance or whole nodes).",
            fields={"quantity": ["Must be 1 for a slice of a node."]},
        )
    start = now if start is None else start  # up to CLOCK_SKEW in the past is accepted as it is
    if start < now - CLOCK_SKEW:
        raise _window_error("The start is in the past.", "start")
    if start > now + MAX_ADVANCE:
        raise _window_error(f"Reservations can start at most {MAX_ADVANCE.days} days ahead.", "start")
    price = price_in_force(offer=offer, at=now)
    if term_months is not None:
        discount = offer.term_discounts.filter(term_months=term_months).first()
        if discount is None:
            terms = sorted(offer.term_discounts.values_list("term_months", flat=True))
            offered = ", ".join(f"{t}" for t in terms) or "none"
            raise DomainError(
                f"This offer has no {term_months}-month term (terms offered, in months: {offered}).",
                code="invalid_term",
                fields={"term_months": [f"Choose one of: {offered}."]},
            )
        term_end = add_months(start, term_months)
        if end is not None and end != term_end:
            raise _window_error("A reserved term ends when the term does; leave the end out.", "end")
        end = term_end
        price = term_price(price, discount.percent_off)
    elif duration_hours is not None:
        end = start + _hours(duration_hours, offer=offer, field="duration_hours")
    elif end is None:
        raise _window_error("An on-demand reservation needs an end.", "end")
    if end <= start:
        raise _window_error("The end must be after the start.", "end")
    if end - start < MIN_DURATION:
        raise _window_error("A reservation lasts at least a minute.", "end")
    if term_months is None and end - start > timedelta(hours=_most_hours(offer)):
        raise _too_long(offer, "end")
    nodes = _typical_rack_size(offer) if offer.shape == OfferShape.RACK else quantity
    return Quote(
        offer=offer,
        quantity=quantity,
        start=start,
        end=end,
        node_count=nodes,
        gpu_count=nodes * offer.gpus_per_instance,
        price_per_gpu_hour=price,
        term_months=term_months,
    )


def _typical_rack_size(offer: Offer) -> int:
    """Nodes in the racks of a rack offer (the largest, for a quote before a rack is picked)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT coalesce(max(c), 0) FROM (SELECT count(*) c FROM {Node._meta.db_table} n "
            f"WHERE n.rack_id IN ({WHOLE_RACKS}) GROUP BY n.rack_id) s",
            {"site": offer.site_id, "type": offer.accelerator_type_id, "gpus": offer.gpus_per_node},
        )
        return cursor.fetchone()[0]


def _check_quota(
    *,
    organization: Organization,
    offer: Offer,
    gpus: int,
    start: datetime,
    end: datetime,
    excluding: Reservation | None = None,
) -> None:
    """GPUs of the type held by the tenant's reservations overlapping [start, end), plus ``gpus``, must
    stay within the quota. Counting every overlapping reservation is conservative (they may not all
    overlap each other) and cheap."""
    limit = (
        Quota.objects.filter(organization=organization, accelerator_type_id=offer.accelerator_type_id)
        .values_list("max_gpus", flat=True)
        .first()
    )
    limit = settings.DEFAULT_GPU_QUOTA if limit is None else limit
    held = Reservation.objects.filter(
        organization=organization,
        state__in=HOLDING_STATES,
        offer__accelerator_type_id=offer.accelerator_type_id,
        period__overlap=DateTimeTZRange(start, end, "[)"),
    )
    if excluding is not None:
        held = held.exclude(pk=excluding.pk)
    used = held.aggregate(n=Sum("gpu_count"))["n"] or 0
    if used + gpus > limit:
        raise QuotaExceeded(
            f"Your organization may hold {limit} {offer.accelerator_type.model} GPUs at once; it holds {used} "
            f"in that window and this needs {gpus} more. Ask an operator to raise the quota.",
            quota=limit,
            in_use=used,
            requested=gpus,
        )


def _capacity_refusal(error: CapacityUnavailable, quote: Quote) -> CapacityUnavailable:
    """The refusal, with the earliest window that would fit -- by GPUs: a refusal for power is left as it
    is (that search does not weigh racks' budgets, and would name a window power refuses too)."""
    if isinstance(error, PowerBudgetExceeded):
        return error
    earliest = earliest_fit(
        offer=quote.offer, quantity=quote.quantity, start=quote.start, duration=quote.end - quote.start
    )
    hint = (
        f" The earliest window of that length starts at {earliest.isoformat()}."
        if earliest
        else " This offer does not have that much capacity at all."
    )
    details = {**error.details, "earliest_start": earliest.isoformat() if earliest else None}
    return CapacityUnavailable(error.message + hint, **details)


def reservation_check(
    *,
    tenant: TenantContext,
    offer: Offer,
    quantity: int,
    start: datetime | None,
    end: datetime | None,
    duration_hours: Decimal | int | None = None,
    term_months: int | None = None,
) -> Quote:
    """The price step: the quote, refused as reservation_create would refuse it now (the role 403,
    the window 400, the quota and capacity 409, the hold 402), reading only. Each refusal comes from
    the helper reservation_create calls, so both steps say the same thing; create checks again under
    its locks, and decides."""
    tenant.require(Role.MEMBER, "reserving capacity")
    quote = reservation_quote(
        offer=offer, quantity=quantity, start=start, end=end, duration_hours=duration_hours, term_months=term_months
    )
    return quote_check(tenant=tenant, quote=quote)


def quote_check(*, tenant: TenantContext, quote: Quote) -> Quote:
    """reservation_check for a quote already made (the portal shows it even when it is refused)."""
    tenant.require(Role.MEMBER, "reserving capacity")
    quote, _placement = _placed_within_quota(tenant=tenant, quote=quote, pick=False)
    hold_check(organization_id=tenant.organization.pk, amount=quote.expected_cost)
    return quote


def _placed_within_quota(*, tenant: TenantContext, quote: Quote, pick: bool) -> tuple[Quote, Placement | None]:
    """The checks the price step and reservation_create both make, in one order and in one set of words:
    a node offer's quota, the capacity (refused with the earliest window that fits), a rack offer's quota
    for the rack placed. ``pick``: place it for real (the caller holds the locks) rather than only look.
    Returns the quote for what would be placed (a rack's real size), and the placement when picked."""
    offer = quote.offer

    def within_quota(gpus: int) -> None:
        _check_quota(organization=tenant.organization, offer=offer, gpus=gpus, start=quote.start, end=quote.end)

    if offer.shape == OfferShape.NODE:
        within_quota(quote.gpu_count)
    window = {"offer": offer, "quantity": quote.quantity, "start": quote.start, "end": quote.end}
    try:
        placement = placement_pick(**window) if pick else None
        node_count = len(placement.node_ids) if placement else placement_check(**window)
    except CapacityUnavailable as error:
        raise _capacity_refusal(error, quote) from None
    if node_count != quote.node_count:  # the rack placed, not the largest one quoted
        quote = replace(quote, node_count=node_count, gpu_count=node_count * offer.gpus_per_instance)
    if offer.shape == OfferShape.RACK:
        within_quota(quote.gpu_count)
    return quote, placement


def _event(reservation: Reservation, event: str, **extra) -> None:
    publish_on_commit(
        tenant_group(reservation.organization_id),
        event,
        {"id": str(reservation.id), "state": reservation.state, **extra},
    )


@transaction.atomic
def reservation_create(
    *,
    tenant: TenantContext,
    offer: Offer,
    quantity: int,
    start: datetime | None,
    end: datetime | None,
    duration_hours: Decimal | int | None = None,
    term_months: int | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
    image: str | None = None,
    ssh_keys: list | None = None,
    access: bool = True,
) -> Reservation:
    """Hold whole nodes, one whole rack or a slice of a node of ``offer`` for [start, end) (or
    ``duration_hours`` from start, or a term), and the expected cost from the tenant's balance (402 when
    it cannot cover it). All or nothing. ``now`` is the clock the window is judged by: the real one,
    except where history is written on purpose (the demo's past month).

    With ``access`` (all but an endpoint's replicas) its nodes boot into ``image`` (a slug; default: the
    accelerator's, services.reservations.access) and let in ``ssh_keys`` (ids; default: the creator's)."""
    tenant.require(Role.MEMBER, "reserving capacity")
    chosen_image = image_for(offer=offer, slug=image) if access else None
    keys = keys_for(tenant=tenant, key_ids=ssh_keys) if access else []
    quote = reservation_quote(
        offer=offer,
        quantity=quantity,
        start=start,
        end=end,
        duration_hours=duration_hours,
        term_months=term_months,
        now=now,
    )
    organization_lock(tenant.organization.pk)
    quote, placement = _placed_within_quota(tenant=tenant, quote=quote, pick=True)
    node_count = quote.node_count
    period = DateTimeTZRange(quote.start, quote.end, "[)")
    try:
        with transaction.atomic():
            reservation = Reservation.objects.create(
                organization=tenant.organization,
                offer=offer,
                created_by=tenant.user,
                shape=offer.shape,
                quantity=quantity,
                rack_id=placement.rack_id,
                node_count=node_count,
                gpu_count=quote.gpu_count,
                period=period,
                price_per_gpu_hour=quote.price_per_gpu_hour,
                term_months=quote.term_months,
                idempotency_key=idempotency_key,
                has_access=access,
                image=chosen_image,
            )
            reservation.ssh_keys.set(keys)
            Allocation.objects.bulk_create(
                [
                    Allocation(
                        reservation=reservation, node_id=node, gpus=NumericRange(*placement.gpus[node]), period=period
                    )
                    for node in placement.node_ids
                ]
            )
    except IntegrityError as error:
        if _constraint(error) == "allocation_no_overlap":  # placement is wrong if this happens; the database is not
            logger.error("Exclusion constraint refused a placement for %s", offer)
            raise CapacityUnavailable("That capacity was just taken; try again.") from None
        raise
    hold_place(reservation=reservation, amount=quote.expected_cost, memo=f"Hold for reservation {reservation.pk}")
    _event(reservation, "reservation.created")
    if quote.start <= timezone.now():  # starts now: do not wait for the next beat tick
        enqueue_on_commit("marketplace.tasks.begin_reservation", str(reservation.pk))
    return reservation


def _constraint(error: IntegrityError) -> str | None:
    diag = getattr(error.__cause__, "diag", None)
    return getattr(diag, "constraint_name", None)


def _move(reservation: Reservation, target: str, *, release_early: bool = False, **also_set) -> str:
    # Lock the row before reading the clock: a rating run holding it has rated up to a moment before
    # this one, so the active interval never ends before what was already billed.
    Reservation.objects.select_for_update().filter(pk=reservation.pk).values_list("pk", flat=True).first()
    now = timezone.now()
    if release_early and now < reservation.end:  # a reserved term given up early: the rest is still owed
        also_set["released_early_at"] = now
    if target == S.ACTIVE:
        also_set.setdefault("activated_at", now)
    elif reservation.state == S.ACTIVE:  # leaving active: the active interval ends (energy, billing)
        also_set.setdefault("deactivated_at", now)
    previous = transition(reservation, table=RESERVATION_TRANSITIONS, target=target, **also_set)
    effects = RESERVATION_ON_ENTER[target]
    if effects.frees_nodes:
        Allocation.objects.filter(reservation=reservation, live=True).update(live=False)
    _event(reservation, f"reservation.{target}", previous_state=previous)
    # Who may see these nodes' telemetry changed: tell their agents' connections (provisioning.consumers).
    for node_id in reservation.allocations.values_list("node_id", flat=True):
        publish_on_commit(agent_group(node_id), "agent.audience", {})
    for task in effects.tasks:
        enqueue_on_commit(task, str(reservation.pk))
    return previous


@transaction.atomic
def reservation_cancel(*, tenant: TenantContext, reservation: Reservation) -> Reservation:
    """Before it starts: cancelled, nothing held. After: released (its nodes are torn down). A reserved
    term released before its end is a commitment kept: the rest of the term is billed all the same
    (``released_early_at``; docs/billing.md), while its nodes are freed at once. A replica of an
    inference endpoint is ended by scaling or deleting its endpoint, not here."""
    tenant.require(Role.MEMBER, "cancelling a reservation")
    if Reservation.objects.filter(pk=reservation.pk, replica__isnull=False).exists():
        raise Conflict(
            "This reservation is a replica of an inference endpoint; scale or delete the endpoint instead.",
            code="replica_reservation",
        )
    return reservation_end(reservation=reservation)


@transaction.atomic
def reservation_end(*, reservation: Reservation) -> Reservation:
    """reservation_cancel without the tenant's checks, for the services that own a reservation's use
    (an endpoint stopping a replica)."""
    if reservation.state == S.PENDING:
        _move(reservation, S.CANCELLED)
    elif reservation.can_cancel:
        _move(reservation, S.RELEASING, release_early=reservation.term_months is not None)
    else:
        raise IllegalTransition(
            f"A {reservation.state} reservation cannot be cancelled.",
            current_state=reservation.state,
            requested_state="cancelled",
        )
    return reservation


@transaction.atomic
def reservation_extend(
    *,
    tenant: TenantContext,
    reservation: Reservation,
    end: datetime | None = None,
    duration_hours: Decimal | int | None = None,
) -> Reservation:
    """Move the end later, to ``end`` or by ``duration_hours``, if every GPU it holds stays free until
    then. The duration is bounded before the new end is computed from it."""
    tenant.require(Role.MEMBER, "extending a reservation")
    if (end is None) == (duration_hours is None):
        raise _window_error("Give either a new end or the hours to add (duration_hours).", "end")
    reservation = (
        Reservation.objects.select_for_update().select_related("offer__accelerator_type").get(pk=reservation.pk)
    )
    if not reservation.can_extend:
        raise IllegalTransition(
            f"A {reservation.state} reservation cannot be extended.",
            current_state=reservation.state,
            requested_state=reservation.state,
        )
    old_end = reservation.end
    offer = reservation.offer
    if duration_hours is not None:
        end = old_end + _hours(duration_hours, offer=offer, field="duration_hours")
        if end - reservation.start > timedelta(hours=_most_hours(offer)):
            raise _too_long(offer, "duration_hours")
    if end <= old_end:
        raise _window_error(f"The new end must be after the current end ({old_end.isoformat()}).", "end")
    if end - reservation.start > timedelta(hours=_most_hours(offer)):
        raise _too_long(offer, "end")
    organization_lock(reservation.organization_id)
    _check_quota(
        organization=reservation.organization,
        offer=reservation.offer,
        gpus=reservation.gpu_count,
        start=old_end,
        end=end,
        excluding=reservation,
    )
    held = list(reservation.allocations.filter(live=True).select_related("node"))
    rack_of = {allocation.node_id: allocation.node.rack_id for allocation in held}
    if not nodes_lock(node_ids=list(rack_of), rack_ids=list(set(rack_of.values()))):
        raise CapacityUnavailable("A node of this reservation moved to another rack meanwhile; try again.")
    later = DateTimeTZRange(old_end, end, "[)")
    clashes = Q()
    for allocation in held:
        clashes |= Q(node_id=allocation.node_id, gpus__overlap=allocation.gpus)
    clash = (
        Allocation.objects.filter(clashes, live=True, period__overlap=later)
        .exclude(reservation=reservation)
        .select_related("node")
        .order_by("period")
        .first()
        if held
        else None
    )
    if clash is not None:
        raise CapacityUnavailable(
            f"{clash.gpu_label} of node {clash.node.hostname} are reserved by someone else from "
            f"{clash.period.lower.isoformat()}; the latest end possible is {clash.period.lower.isoformat()}.",
            latest_end=clash.period.lower.isoformat(),
        )
    gpus_by_rack: dict[int, int] = {}
    for allocation in held:  # its racks are locked: what they commit from old_end on stays as read
        rack = rack_of[allocation.node_id]
        gpus_by_rack[rack] = gpus_by_rack.get(rack, 0) + len(allocation.gpu_indices)
    short = power_short(offer=offer, gpus_by_rack=gpus_by_rack, start=old_end, end=end)
    if short is not None:
        raise power_refusal(
            short,
            gpus=gpus_by_rack[short.rack_id],
            offer=offer,
            when=f"between {old_end.isoformat()} and {end.isoformat()}",
        )
    period = DateTimeTZRange(reservation.start, end, "[)")
    more = cost(
        price_per_gpu_hour=reservation.price_per_gpu_hour,
        gpus=reservation.gpu_count,
        seconds=seconds_between(reservation.start, end),
    ) - cost(
        price_per_gpu_hour=reservation.price_per_gpu_hour,
        gpus=reservation.gpu_count,
        seconds=seconds_between(reservation.start, old_end),
    )
    hold_place(reservation=reservation, amount=more, memo=f"Hold for extending reservation {reservation.pk}")
    try:
        with transaction.atomic():
            reservation.allocations.filter(live=True).update(period=period)
            Reservation.objects.filter(pk=reservation.pk).update(period=period)
    except IntegrityError as error:
        if _constraint(error) == "allocation_no_overlap":
            raise CapacityUnavailable("Another reservation took those nodes for that time; try again.") from None
        raise
    reservation.period = period
    _event(reservation, "reservation.extended", end=end.isoformat())
    return reservation


# Lifecycle steps, driven by beat (marketplace.tasks) and later by provisioning. Each takes an id,
# re-reads the row and is a no-op when the reservation has already moved on.


@transaction.atomic
def _step(reservation_id, *, sources: tuple[str, ...], target: str, ready=None, **also_set) -> bool:
    """Move the reservation to ``target`` if it is in one of ``sources`` (and ``ready`` says yes);
    False, changing nothing, if it already moved on. Safe to run twice."""
    reservation = Reservation.objects.select_for_update().filter(pk=reservation_id).first()
    if reservation is None or reservation.state not in sources or (ready and not ready(reservation)):
        return False
    try:
        _move(reservation, target, **also_set)
    except IllegalTransition:  # a concurrent step won the compare-and-set
        return False
    return True


def reservation_begin(*, reservation_id, now: datetime | None = None) -> bool:
    """pending → provisioning once the start has come."""
    return _step(
        reservation_id, sources=(S.PENDING,), target=S.PROVISIONING, ready=lambda r: r.start <= (now or timezone.now())
    )


def reservation_activate(*, reservation_id, at: datetime | None = None) -> bool:
    """provisioning → active, when every node is ready (``at``: when it was, for history written on
    purpose; else now)."""
    extra = {"activated_at": at} if at else {}
    return _step(reservation_id, sources=(S.PROVISIONING,), target=S.ACTIVE, **extra)


def reservation_release(*, reservation_id, reason: str = "", at: datetime | None = None) -> bool:
    """provisioning/active → releasing: at the end, on cancel, or forced by an operator (``at``: when
    its active time ended, for history written on purpose; else now)."""
    extra = {"failure_reason": reason[:500]} if reason else {}
    if at:
        extra["deactivated_at"] = at
    return _step(reservation_id, sources=(S.PROVISIONING, S.ACTIVE), target=S.RELEASING, **extra)


def reservation_complete(*, reservation_id) -> bool:
    """releasing → completed: the nodes are torn down and free again."""
    return _step(reservation_id, sources=(S.RELEASING,), target=S.COMPLETED)


def reservation_fail(*, reservation_id, reason: str) -> bool:
    """provisioning → failed: nothing billed, the hold released."""
    return _step(reservation_id, sources=(S.PROVISIONING,), target=S.FAILED, failure_reason=reason[:500])


def reservations_advance(*, now: datetime | None = None) -> dict[str, int]:
    """Move every reservation whose time has come: started ones to provisioning, ended ones to
    releasing. Their nodes are then set up or torn down through their agents (provisioning_flow)."""
    now = now or timezone.now()
    begun = sum(reservation_begin(reservation_id=pk, now=now) for pk in reservations_due_to_begin(now=now))
    ended = sum(reservation_release(reservation_id=pk) for pk in reservations_due_to_end(now=now))
    return {"begun": begun, "ended": ended}


def reservation_cancel_as_operator(*, reservation: Reservation, reason: str) -> bool:
    """pending → cancelled by an operator (no tenant role check)."""
    return _step(reservation.pk, sources=(S.PENDING,), target=S.CANCELLED, failure_reason=reason[:500])
