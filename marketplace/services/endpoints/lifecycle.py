"""Endpoints: made, rescaled, deleted, and their state kept true to their replicas. The only writer of
Endpoint rows (replicas: services.endpoints.replicas).

An endpoint is made with its first ``min_replicas`` replicas placed in the same transaction, so a
refusal -- role, quota, capacity, balance -- comes back at once and leaves nothing behind; their servers
then start asynchronously through the agents, and the endpoint is ``ready`` once ``min_replicas`` answer."""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from console.kernel.errors import Conflict, DomainError, clean_or_refuse
from console.kernel.events import publish_on_commit, tenant_group
from console.kernel.lifecycle import transition
from marketplace.choices import FINISHED_STATES, ReplicaState, Role
from marketplace.models import (
    ENDPOINT_TRANSITIONS,
    Endpoint,
    EndpointScaleEvent,
    EndpointState,
    PlacementPreference,
    Replica,
    ServedModel,
)
from marketplace.models.endpoints import MAX_REPLICAS
from marketplace.services.endpoints.replicas import (
    acting_for,
    live_replicas,
    removal_order,
    replica_start,
    replica_stop,
    replicas_drain,
)
from marketplace.services.reservations.lifecycle import reservation_extend
from marketplace.tenant_context import TenantContext
from provisioning.models import AcceleratorType, Site

E = EndpointState
R = ReplicaState
logger = logging.getLogger(__name__)


def endpoint_base_url(endpoint: Endpoint) -> str:
    """What an OpenAI client takes as ``base_url``: the gateway's ``/v1`` (the model is the endpoint's name)."""
    return settings.GATEWAY_URL.rstrip("/") + "/v1"


def _bounds(min_replicas: int, max_replicas: int, target_concurrency: int) -> None:
    if not (0 <= min_replicas <= max_replicas <= MAX_REPLICAS and max_replicas >= 1):
        raise DomainError(
            f"Replicas: min_replicas 0 (scale to zero) to max_replicas, and max_replicas 1 to {MAX_REPLICAS}.",
            code="invalid_scaling",
            fields={"min_replicas": [f"0 to max_replicas (at most {MAX_REPLICAS})."]},
        )
    if not 1 <= target_concurrency <= 1000:
        raise DomainError(
            "target_concurrency is the requests in flight per replica: 1 to 1000.",
            code="invalid_scaling",
            fields={"target_concurrency": ["1 to 1000."]},
        )


def _event(endpoint: Endpoint, event: str, **extra) -> None:
    publish_on_commit(
        tenant_group(endpoint.organization_id), event, {"id": str(endpoint.id), "state": endpoint.state, **extra}
    )


@transaction.atomic
def endpoint_create(
    *,
    tenant: TenantContext,
    name: str,
    model: ServedModel,
    region: str,
    placement: str = PlacementPreference.NEAREST,
    accelerator_types: list[AcceleratorType] | None = None,
    pinned_sites: list[Site] | None = None,
    min_replicas: int = 1,
    max_replicas: int = 1,
    target_concurrency: int = 8,
) -> Endpoint:
    """An endpoint serving ``model`` as ``name``, with its first ``min_replicas`` replicas placed (each a
    slice reservation: quota, capacity and balance checked as for any rental). All or nothing."""
    tenant.require(Role.MEMBER, "deploying an endpoint")
    if not model.is_active:
        raise DomainError(f"{model} is not served any more.", code="model_inactive", fields={"model": ["Inactive."]})
    _bounds(min_replicas, max_replicas, target_concurrency)
    served_on = set(model.accelerator_types.values_list("pk", flat=True))
    chosen = list(accelerator_types or [])
    if any(t.pk not in served_on for t in chosen):
        names = ", ".join(sorted(t.slug for t in model.accelerator_types.all())) or "none"
        raise DomainError(
            f"{model} runs on: {names}.", code="invalid_accelerator", fields={"accelerator_types": [f"Of: {names}."]}
        )
    regions = set(Site.objects.values_list("region", flat=True))
    if region not in regions:
        known = ", ".join(sorted(regions))
        raise DomainError(f"Unknown region {region!r}; regions: {known}.", fields={"region": [f"One of: {known}."]})
    if placement not in PlacementPreference.values:
        choices = ", ".join(PlacementPreference.values)
        raise DomainError(f"placement is one of {choices}.", fields={"placement": [f"One of: {choices}."]})
    pinned = list(pinned_sites or [])
    if (placement == PlacementPreference.PINNED) != bool(pinned):
        raise DomainError(
            "Pinned placement names its sites (pinned_sites); the other preferences name none.",
            fields={"pinned_sites": ["Required for pinned placement, and only then."]},
        )
    endpoint = Endpoint(
        organization=tenant.organization,
        created_by=tenant.user,
        name=name,
        model=model,
        region=region,
        placement=placement,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_concurrency=target_concurrency,
    )
    # The name's uniqueness is the constraint's to decide (two creates may race): refused from its
    # IntegrityError in this service's words, not by full_clean's generic constraint message.
    clean_or_refuse(endpoint, validate_constraints=False)
    try:
        with transaction.atomic():
            endpoint.save()
    except IntegrityError:
        raise Conflict(
            f"Your organization already has an endpoint named {name!r}.",
            code="name_taken",
            fields={"name": ["Taken."]},
        ) from None
    endpoint.accelerator_types.set(chosen)
    endpoint.pinned_sites.set(pinned)
    for _ in range(min_replicas):
        replica_start(endpoint=endpoint, tenant=tenant)
    _event(endpoint, "endpoint.created")
    return endpoint


@transaction.atomic
def endpoint_scale(
    *,
    tenant: TenantContext,
    endpoint: Endpoint,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_concurrency: int | None = None,
) -> Endpoint:
    """New scaling bounds. Raising the minimum places the new replicas now (refused as a whole, changing
    nothing, when one cannot be placed); lowering the maximum stops the extra ones."""
    tenant.require(Role.MEMBER, "scaling an endpoint")
    endpoint = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    if endpoint.state in (E.DELETING, E.DELETED):
        raise Conflict(f"The endpoint is {endpoint.state}.", code="endpoint_deleted")
    low = endpoint.min_replicas if min_replicas is None else min_replicas
    high = endpoint.max_replicas if max_replicas is None else max_replicas
    target = endpoint.target_concurrency if target_concurrency is None else target_concurrency
    _bounds(low, high, target)
    Endpoint.objects.filter(pk=endpoint.pk).update(min_replicas=low, max_replicas=high, target_concurrency=target)
    endpoint.min_replicas, endpoint.max_replicas, endpoint.target_concurrency = low, high, target
    live = list(live_replicas(endpoint))
    for _ in range(low - len(live)):
        replica_start(endpoint=endpoint, tenant=tenant)
    replicas_drain(removal_order(live)[: max(0, len(live) - high)])
    endpoint_refresh(endpoint_id=endpoint.pk)
    endpoint.refresh_from_db()
    _event(endpoint, "endpoint.scaled", min_replicas=low, max_replicas=high)
    return endpoint


@transaction.atomic
def endpoint_delete(*, tenant: TenantContext, endpoint: Endpoint) -> Endpoint:
    """Stop every replica (their bills settle as any reservation's) and free the name; ``deleted`` once
    the last replica is down."""
    tenant.require(Role.MEMBER, "deleting an endpoint")
    endpoint = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    if endpoint.state in (E.DELETING, E.DELETED):
        return endpoint
    transition(endpoint, table=ENDPOINT_TRANSITIONS, target=E.DELETING)
    for replica in endpoint.replicas.exclude(state__in=[ReplicaState.STOPPING, ReplicaState.STOPPED]):
        replica_stop(replica=replica, reason="endpoint deleted")
    endpoint_refresh(endpoint_id=endpoint.pk)
    endpoint.refresh_from_db()
    _event(endpoint, "endpoint.deleting")
    return endpoint


def desired_state(*, endpoint: Endpoint, ready: int, starting: int, live: int, ever_ready: bool) -> str:
    """What the endpoint's state is, from its replicas (pure): deleted once a deleting endpoint has none
    live; ready with min_replicas answering and none starting; scaling while more start beyond those;
    degraded with fewer answering than it needs; deploying until one ever answered."""
    if endpoint.state in (E.DELETING, E.DELETED):
        return E.DELETED if live == 0 else E.DELETING
    if endpoint.replica_target == 0 and ready == 0 and starting == 0:
        return E.IDLE
    if ready >= endpoint.min_replicas:
        return E.SCALING if starting else E.READY
    if ready == 0 and not ever_ready:
        return E.DEPLOYING
    return E.DEGRADED


@transaction.atomic
def endpoint_refresh(*, endpoint_id) -> str:
    """Move the endpoint to the state its replicas say (desired_state); returns it."""
    endpoint = Endpoint.objects.select_for_update().filter(pk=endpoint_id).first()
    if endpoint is None:
        return ""
    replicas = list(endpoint.replicas.values_list("state", "ready_at"))
    ready = sum(state == ReplicaState.READY for state, _ in replicas)
    starting = sum(state == ReplicaState.STARTING for state, _ in replicas)
    live = sum(state != ReplicaState.STOPPED for state, _ in replicas)
    ever_ready = any(at is not None for _, at in replicas)
    target = desired_state(endpoint=endpoint, ready=ready, starting=starting, live=live, ever_ready=ever_ready)
    if target != endpoint.state:
        previous = transition(endpoint, table=ENDPOINT_TRANSITIONS, target=target)
        _event(endpoint, f"endpoint.{target}", previous_state=previous)
    return target


@transaction.atomic
def endpoint_reconcile(*, endpoint_id) -> dict[str, int]:
    """Make the endpoint's replicas what it asks for: replicas whose reservation ended (released,
    failed) are stopped; a deleting endpoint's are stopped; fewer live than min_replicas are topped up,
    more than max_replicas stopped; leases ending within half a lease are renewed (or, when the GPUs are
    booked next by someone else, a replacement is started). Then its state follows."""
    counts = {"stopped": 0, "started": 0, "renewed": 0, "drained": 0}
    # One reconcile of an endpoint at a time (beat's and the ones hooks enqueue run side by side on the
    # workers), in the lock endpoint_scale and endpoint_delete take: two would each top up the same gap.
    endpoint = Endpoint.objects.select_for_update().filter(pk=endpoint_id).first()
    if endpoint is None or endpoint.state == EndpointState.DELETED:
        return counts
    for replica in endpoint.replicas.exclude(state=R.STOPPED).select_related("reservation"):
        reservation = replica.reservation
        if reservation.state in FINISHED_STATES:
            reason = reservation.failure_reason or replica.failure_reason
            Replica.objects.filter(pk=replica.pk).update(
                state=R.STOPPED, stopped_at=timezone.now(), failure_reason=reason
            )
            counts["stopped"] += 1
        elif endpoint.state == EndpointState.DELETING or replica.state == R.UNHEALTHY:
            replica_stop(
                replica=replica, reason="endpoint deleted" if endpoint.state == EndpointState.DELETING else "unhealthy"
            )
    if endpoint.state != EndpointState.DELETING:
        now = timezone.now()
        live = list(live_replicas(endpoint))
        draining = list(endpoint.replicas.filter(state=R.DRAINING).order_by("-draining_since"))
        target = endpoint.replica_target  # the autoscaler's ask within min and max
        # Too many (the autoscaler asked for fewer, or a replacement raced the one it replaced): drained.
        extra = removal_order(live)[: max(0, len(live) - target)]
        counts["drained"] = replicas_drain(extra, now=now)
        live = [replica for replica in live if replica not in extra]
        # Too few: a replica still draining is taken back first (no cold start), then new ones.
        while len(live) < target and draining:
            replica = draining.pop(0)
            if Replica.objects.filter(pk=replica.pk, state=R.DRAINING).update(state=R.READY, draining_since=None):
                live.append(replica)
        for _ in range(target - len(live)):
            try:
                replica_start(endpoint=endpoint)
                counts["started"] += 1
            except Conflict as refusal:  # capacity, quota, balance: try again on the next run
                logger.warning("Endpoint %s: cannot start a replica: %s", endpoint.pk, refusal.message)
                _held_at(endpoint, len(live) + counts["started"], target, refusal.message, now)
                break
        drained = now - timedelta(seconds=settings.ENDPOINT_DRAIN_SECONDS)
        for replica in draining:
            if replica.draining_since is not None and replica.draining_since <= drained:
                replica_stop(replica=replica, reason="scaled down (drained)")
                counts["stopped"] += 1
        lease = timedelta(hours=settings.REPLICA_LEASE_HOURS)
        for replica in live:
            reservation = replica.reservation
            if reservation.state in FINISHED_STATES or reservation.end - timezone.now() > lease / 2:
                continue
            try:
                reservation_extend(
                    tenant=acting_for(endpoint, None),
                    reservation=reservation,
                    duration_hours=settings.REPLICA_LEASE_HOURS,
                )
                counts["renewed"] += 1
            except Conflict as refusal:  # its GPUs are booked next: a replacement elsewhere, this one expires
                logger.info("Endpoint %s: replica %s not renewed: %s", endpoint.pk, replica.pk, refusal.message)
    endpoint_refresh(endpoint_id=endpoint.pk)
    return counts


def _held_at(endpoint: Endpoint, running: int, target: int, why: str, now) -> None:
    """The ask could not be met (quota, balance, capacity): a scale event says so, once per reason in a
    row, so the tenant sees what holds the endpoint where it is."""
    reason = f"held at {running} of {target}: {why}"[:200]
    last = EndpointScaleEvent.objects.filter(endpoint=endpoint).order_by("-at").values_list("reason", flat=True).first()
    if last != reason:
        EndpointScaleEvent.objects.create(
            endpoint=endpoint,
            at=now,
            from_replicas=running,
            to_replicas=running,
            reason=reason,
            inputs={"asked": target},
        )
        _event(endpoint, "endpoint.scaled", held=reason)


def endpoints_reconcile() -> int:
    """endpoint_reconcile for every endpoint not deleted (beat)."""
    ids = list(Endpoint.objects.exclude(state=EndpointState.DELETED).values_list("pk", flat=True))
    for endpoint_id in ids:
        endpoint_reconcile(endpoint_id=endpoint_id)
    return len(ids)
