"""Replicas: an endpoint's model servers, each on a GPU slice its reservation holds. The only writer of
Replica rows.

A replica is started by reserving a slice of the best offer its endpoint's preference allows
(``candidate_offers``: the sites nearest the users first -- by the round trips the operator records,
provisioning.RegionSiteLatency -- or edge sites first, or only pinned sites), the next offer when one
has no room (no free slice, or its rack's power budget spent), leased for
REPLICA_LEASE_HOURS and renewed while the endpoint lives; the reservation's provision command carries
``serve`` (docs/agent-protocol.md) so the node's agent starts the server on those GPUs and reports its
address. Everything after that -- replacing a replica whose reservation ended or failed, topping up to
``min_replicas``, renewing leases -- is ``lifecycle.endpoint_reconcile``, run by beat."""

import hashlib
import hmac
import logging

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Case, F, IntegerField, QuerySet, Value, When
from django.db.models.functions import Floor
from django.utils import timezone

from console.kernel.errors import Conflict
from console.kernel.tasks import enqueue_on_commit
from marketplace.choices import LIVE_REPLICA_STATES, OfferShape, ReplicaState, Role
from marketplace.models import Endpoint, Offer, PlacementPreference, Replica, Reservation
from marketplace.services.reservations.lifecycle import reservation_create, reservation_end
from marketplace.services.reservations.placement import CapacityUnavailable, PowerBudgetExceeded
from marketplace.tenant_context import TenantContext
from provisioning.choices import CommandKind, CommandState, SiteKind
from provisioning.selectors.fleet import region_rtt_ms

logger = logging.getLogger(__name__)
R = ReplicaState


class NoCapacityForReplica(Conflict):
    code = "capacity_unavailable"


def live_replicas(endpoint: Endpoint) -> QuerySet[Replica]:
    return endpoint.replicas.filter(state__in=LIVE_REPLICA_STATES).select_related("reservation")


def replica_secret(replica_id) -> str:
    """The secret the gateway presents to a replica and the replica checks (X-Neocloud-Replica-Secret):
    derived from the console's key, so it is stored nowhere in the console."""
    key = settings.SECRET_KEY.encode()
    return hmac.new(key, f"neocloud-replica:{replica_id}".encode(), hashlib.sha256).hexdigest()


# Round trips in one bucket of this many milliseconds are as near as each other: among them an edge
# site comes first, then the cheaper offer. (A few ms are noise between two sites both near the users;
# an edge site there is the one built for them.)
NEAR_MS = 5


def candidate_offers(endpoint: Endpoint) -> QuerySet[Offer]:
    """Slice offers a replica of ``endpoint`` may take, best first: the model's slice size on an
    accelerator type it runs on (and the endpoint allows), ordered by the endpoint's placement.

    How near a site is: sites with a recorded round trip from the endpoint's region first, by that round
    trip in NEAR_MS buckets; then sites without one in the endpoint's region, then the rest. ``nearest``
    (and ``pinned``, among the pinned sites): by nearness, then edge before hall, then price.
    ``edge_first``: edge sites by nearness, then halls by nearness, each then by price. The caller takes
    the first with room, so a full site (or a rack at its power budget) spills to the next."""
    model = endpoint.model
    allowed = list(endpoint.accelerator_types.values_list("pk", flat=True)) or list(
        model.accelerator_types.values_list("pk", flat=True)
    )
    offers = (
        Offer.objects.filter(
            is_active=True,
            shape=OfferShape.NODE,
            gpus_per_instance=model.gpus_per_replica,
            accelerator_type__in=allowed,
        )
        .select_related("site", "accelerator_type")
        .annotate(rtt_ms=region_rtt_ms(region=endpoint.region))
    )
    measured = Case(
        When(rtt_ms__isnull=False, then=Value(0)),
        When(site__region=endpoint.region, then=Value(1)),
        default=Value(2),
        output_field=IntegerField(),
    )
    near = [measured, Floor(F("rtt_ms") / NEAR_MS)]
    at_edge = Case(When(site__kind=SiteKind.EDGE, then=Value(0)), default=Value(1), output_field=IntegerField())
    if endpoint.placement == PlacementPreference.PINNED:
        offers, ranks = offers.filter(site__in=endpoint.pinned_sites.all()), [*near, at_edge]
    elif endpoint.placement == PlacementPreference.EDGE_FIRST:
        ranks = [at_edge, *near]
    else:
        ranks = [*near, at_edge]
    return offers.order_by(*ranks, "price_per_gpu_hour", "pk")


def acting_for(endpoint: Endpoint, tenant: TenantContext | None) -> TenantContext:
    """Who a replica's reservation is made by: the caller, or (beat) the endpoint's organization acting
    for its creator as a member -- the endpoint's own standing, never more."""
    if tenant is not None:
        return tenant
    return TenantContext(organization=endpoint.organization, user=endpoint.created_by, role=Role.MEMBER)


@transaction.atomic
def replica_start(*, endpoint: Endpoint, tenant: TenantContext | None = None) -> Replica:
    """Place one more replica: a slice of the first candidate offer with room, leased for
    REPLICA_LEASE_HOURS. Quota and balance refusals are the tenant's (raised as they are); no room at
    any candidate is NoCapacityForReplica (409), saying which sites were tried and, where a rack's power
    budget and not its GPUs refused, that."""
    acting = acting_for(endpoint, tenant)
    tried, power = [], {}
    for offer in candidate_offers(endpoint):
        try:
            with transaction.atomic():
                reservation = reservation_create(
                    tenant=acting,
                    offer=offer,
                    quantity=1,
                    start=None,
                    end=None,
                    duration_hours=settings.REPLICA_LEASE_HOURS,
                    access=False,  # only the gateway reaches a replica
                )
                return Replica.objects.create(endpoint=endpoint, reservation=reservation)
        except CapacityUnavailable as refusal:
            tried.append(offer.site.name)
            if isinstance(refusal, PowerBudgetExceeded):
                power.setdefault(offer.site.name, refusal.message)
    where = ", ".join(dict.fromkeys(tried)) or "no site offers it"
    why = "".join(f" {site}: {message}" for site, message in power.items())
    raise NoCapacityForReplica(
        f"No room for a {endpoint.model.gpus_per_replica}-GPU replica of {endpoint.model} where this endpoint may "
        f"run ({where}).{why}",
        sites_tried=list(dict.fromkeys(tried)),
        power_budget_sites=list(power) or None,
    )


@transaction.atomic
def replica_stop(*, replica: Replica, reason: str = "") -> Replica:
    """Release its slice (the agent stops the server); ``stopped`` once the reservation has ended."""
    replica = Replica.objects.select_for_update().select_related("reservation").get(pk=replica.pk)
    if replica.state in (R.STOPPING, R.STOPPED):
        return replica
    if not replica.reservation.is_finished:
        reservation_end(reservation=replica.reservation)
    Replica.objects.filter(pk=replica.pk).update(state=R.STOPPING, failure_reason=reason[:500])
    replica.state = R.STOPPING
    return replica


def replicas_drain(replicas: list[Replica], *, now=None) -> int:
    """Take replicas out of service without failing a request: ``draining``, so the gateways stop
    sending them new requests (they route to ready replicas only; their routes are a second old at
    most) and those in flight finish; reconcile stops them after ENDPOINT_DRAIN_SECONDS. One that never
    answered has nothing to drain and stops at once."""
    now = now or timezone.now()
    for replica in replicas:
        if replica.state == R.READY:
            Replica.objects.filter(pk=replica.pk, state=R.READY).update(state=R.DRAINING, draining_since=now)
        else:
            replica_stop(replica=replica, reason="scaled down before it answered")
    return len(replicas)


def removal_order(replicas: list[Replica]) -> list[Replica]:
    """Which go first when there are too many: those not answering yet, then the newest."""
    return sorted(replicas, key=lambda r: (r.state != R.READY, r.created_at), reverse=True)


def serve_params(reservation: Reservation) -> dict | None:
    """services.reservations.provisioning (on_provision_params): what the agent needs to run a replica's
    server -- provision params ``serve`` -- or None when the reservation is no replica."""
    replica = Replica.objects.select_related("endpoint__model").filter(reservation=reservation).first()
    if replica is None:
        return None
    model = replica.endpoint.model
    return {
        "serve": {
            "program": [*model.server_program, "--served-name", replica.endpoint.name],
            "port_arg": "--port",
            "health_path": "/healthz",
            "secret": replica_secret(replica.pk),
            "startup_timeout_s": 180,
        }
    }


def on_command_finished(command) -> None:
    """provisioning.hooks, after reservations' own: the agent answered the provision command of a
    replica's slice; a success carries the server's address, and the replica is ready."""
    if command.kind != CommandKind.PROVISION or command.correlation_id is None:
        return
    replica = Replica.objects.filter(reservation_id=command.correlation_id).first()
    if replica is None or command.state != CommandState.SUCCEEDED:
        return
    address = (command.result or {}).get("address", "")
    Replica.objects.filter(pk=replica.pk, state=R.STARTING).update(
        state=R.READY, address=str(address)[:100], ready_at=timezone.now()
    )
    enqueue_on_commit("marketplace.tasks.endpoint_reconcile", str(replica.endpoint_id))


@transaction.atomic
def on_workload_reported(*, node_id: int, reservation: str, state: str, detail: str = "") -> None:
    """provisioning.hooks: the agent of ``node_id`` says a replica's server stopped answering (or exited,
    or answers again). Only a replica whose slice is on that node is touched -- an agent speaks for its
    own node -- and beat's reconcile (enqueued now) replaces an unhealthy one."""
    try:
        replica = (
            Replica.objects.select_for_update()
            .filter(reservation_id=reservation, reservation__allocations__node_id=node_id)
            .first()
        )
    except (ValueError, TypeError, ValidationError):  # not a UUID: nothing of ours
        return
    if replica is None:
        return
    if state in ("unhealthy", "exited") and replica.state == R.READY:
        Replica.objects.filter(pk=replica.pk).update(state=R.UNHEALTHY, failure_reason=f"{state}: {detail}"[:500])
    elif state == "healthy" and replica.state == R.UNHEALTHY:
        Replica.objects.filter(pk=replica.pk).update(state=R.READY, failure_reason="")
    else:
        return
    enqueue_on_commit("marketplace.tasks.endpoint_reconcile", str(replica.endpoint_id))
