"""The autoscaler: replicas follow the requests in flight, as Knative's does (docs/autoscaling.md).

Every few seconds (beat, ``endpoints_autoscale``) each live endpoint's last minute of concurrency -- the
requests in flight the gateways saw, added up across gateway processes (services.endpoints.concurrency)
-- is turned into how many replicas it should run (``decide``, pure):

    desired = ceil(average concurrency / (target_concurrency x utilization))

over the stable window (60 s). When the panic window's average (the last 6 s) asks for at least twice
the replicas ready, the endpoint panics: it scales on the panic window and does not scale down until a
whole stable window has passed without that. Scaling down is at most by half a decision. The result is
bounded by min and max replicas; quota and balance bound it again when replicas are placed (a refused
start is tried on the next reconcile). Each decision that changes the ask is an EndpointScaleEvent with
what it saw, shown to the tenant; reconcile makes the replicas follow (draining those it removes).
"""

import logging
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from console.kernel.events import publish_on_commit, tenant_group
from console.kernel.tasks import enqueue_on_commit
from marketplace.choices import ReplicaState
from marketplace.models import Endpoint, EndpointScaleEvent, EndpointState
from marketplace.services.endpoints.concurrency import Series, concurrency_series

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    target: float  # requests in flight one replica should carry (the endpoint's target_concurrency)
    min_replicas: int
    max_replicas: int
    utilization: float = 0.7  # of the target, so a replica has headroom while the next one starts
    stable_seconds: int = 60
    panic_seconds: int = 6
    panic_threshold: float = 2.0  # panic when the panic window asks for this many times the replicas ready
    max_scale_down_rate: float = 2.0  # a decision leaves at least ready / this
    max_scale_up_rate: float = 1000.0

    @property
    def per_replica(self) -> float:
        return self.target * self.utilization


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    panic_until: datetime | None
    inputs: dict = field(default_factory=dict)
    changed: bool = False  # the ask moved (set by endpoint_autoscale, which knows what it was)


def decide(
    *, concurrency: list[float], ready: int, current: int, policy: Policy, now: datetime, panic_until: datetime | None
) -> Decision:
    """How many replicas, from ``concurrency`` (one average a second, oldest first, at least the stable
    window), ``ready`` replicas answering and ``current`` asked for before. Pure."""
    stable_window = concurrency[-policy.stable_seconds :]
    panic_window = concurrency[-policy.panic_seconds :]
    stable = sum(stable_window) / max(1, len(stable_window))
    panic = sum(panic_window) / max(1, len(panic_window))
    basis = max(1, ready)
    most = max(1, math.ceil(policy.max_scale_up_rate * basis))
    least = math.floor(basis / policy.max_scale_down_rate)
    want_stable = min(most, max(least, math.ceil(round(stable / policy.per_replica, 6))))
    want_panic = min(most, max(least, math.ceil(round(panic / policy.per_replica, 6))))
    over_threshold = want_panic / basis >= policy.panic_threshold
    inputs = {
        "stable_concurrency": round(stable, 3),
        "panic_concurrency": round(panic, 3),
        "target_concurrency": policy.target,
        "utilization": policy.utilization,
        "ready": ready,
        "asked_before": current,
        "stable_wants": want_stable,
        "panic_wants": want_panic,
    }
    panicking = panic_until is not None and now < panic_until
    if over_threshold:
        panic_until, panicking = now + timedelta(seconds=policy.stable_seconds), True
    if panicking:
        desired = max(want_panic, current)  # no scaling down while panicking
        reason = (
            f"panic: {panic:.1f} requests in flight over the last {policy.panic_seconds} s need {want_panic} "
            f"replica(s) at {policy.per_replica:g} each"
        )
    else:
        panic_until = None
        desired = want_stable
        if desired > current:
            reason = f"{stable:.2f} requests in flight over the last {policy.stable_seconds} s need {desired}"
        elif desired < current and stable == 0:
            reason = f"no request in flight for {policy.stable_seconds} s"
        elif desired < current:
            reason = f"{stable:.2f} requests in flight over the last {policy.stable_seconds} s need only {desired}"
        else:
            reason = "steady"
    bounded = max(policy.min_replicas, min(policy.max_replicas, desired))
    if bounded != desired:
        side = "minimum" if bounded > desired else "maximum"
        reason = f"{reason}; held at its {side} of {bounded}"
    return Decision(desired=bounded, reason=reason, panic_until=panic_until, inputs=inputs)


def _policy(endpoint: Endpoint) -> Policy:
    return Policy(
        target=float(endpoint.target_concurrency),
        min_replicas=endpoint.min_replicas,
        max_replicas=endpoint.max_replicas,
        utilization=settings.AUTOSCALE_TARGET_UTILIZATION,
        stable_seconds=settings.AUTOSCALE_STABLE_SECONDS,
        panic_seconds=settings.AUTOSCALE_PANIC_SECONDS,
    )


@transaction.atomic
def endpoint_autoscale(*, endpoint_id, series: Series, now: datetime | None = None) -> Decision | None:
    """Decide for one endpoint from its ``series``; record and act on a changed ask. None when it is
    being deleted."""
    now = now or timezone.now()
    endpoint = Endpoint.objects.select_for_update().filter(pk=endpoint_id).first()
    if endpoint is None or endpoint.state in (EndpointState.DELETING, EndpointState.DELETED):
        return None
    ready = endpoint.replicas.filter(state=ReplicaState.READY).count()
    current = endpoint.replica_target
    decision = decide(
        concurrency=series.concurrency,
        ready=ready,
        current=current,
        policy=_policy(endpoint),
        now=now,
        panic_until=endpoint.panic_until,
    )
    changed = decision.desired != current
    decision = replace(decision, changed=changed)
    if changed or decision.panic_until != endpoint.panic_until or endpoint.desired_replicas is None:
        Endpoint.objects.filter(pk=endpoint.pk).update(
            desired_replicas=decision.desired, panic_until=decision.panic_until
        )
    if changed:
        EndpointScaleEvent.objects.create(
            endpoint=endpoint,
            at=now,
            from_replicas=current,
            to_replicas=decision.desired,
            reason=decision.reason[:200],
            panic=decision.panic_until is not None,
            inputs=decision.inputs,
        )
        logger.info("Endpoint %s: %d -> %d replicas (%s)", endpoint.pk, current, decision.desired, decision.reason)
        publish_on_commit(
            tenant_group(endpoint.organization_id),
            "endpoint.scaled",
            {"id": str(endpoint.pk), "from": current, "to": decision.desired, "reason": decision.reason},
        )
        enqueue_on_commit("marketplace.tasks.endpoint_reconcile", str(endpoint.pk))
    return decision


def endpoints_autoscale(*, now: datetime | None = None) -> int:
    """Beat: decide for every live endpoint (one Redis round trip for all of their series); returns how
    many changed their ask."""
    ids = list(
        Endpoint.objects.exclude(state__in=[EndpointState.DELETING, EndpointState.DELETED]).values_list("pk", flat=True)
    )
    if not ids:
        return 0
    wall = (now or timezone.now()).timestamp()
    series = concurrency_series(ids, seconds=settings.AUTOSCALE_STABLE_SECONDS, now=wall)
    changed = 0
    for endpoint_id in ids:
        decision = endpoint_autoscale(endpoint_id=endpoint_id, series=series[str(endpoint_id)], now=now)
        changed += decision is not None and decision.changed
    return changed
