"""Reservations brought up and down through node commands.

provisioning → (a provision command per node) → active when every node reports ready; a failed or
timed-out provision fails the reservation (nothing billed) and releases whatever was set up.
releasing → (a release command per node) → completed when every node has answered; a node whose
release failed goes to maintenance for an operator. Every step is idempotent: commands are made once
per (reservation, node, kind), and state moves are compare-and-set."""

import logging

from django.conf import settings
from django.db import transaction

from console.kernel.events import publish_on_commit, reservation_group, tenant_group
from console.kernel.lifecycle import IllegalTransition
from console.kernel.tasks import enqueue_on_commit
from marketplace.choices import ReservationState
from marketplace.models import Allocation, Reservation
from marketplace.services.reservations.access import access_params, access_provisioned
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_cancel_as_operator,
    reservation_complete,
    reservation_fail,
    reservation_release,
)
from provisioning.choices import CommandKind, CommandState, NodeState
from provisioning.hooks import Audience
from provisioning.models import NodeCommand
from provisioning.services.agents import node_command_issue
from provisioning.services.fleet import node_transition

logger = logging.getLogger(__name__)
S = ReservationState


def _commands(reservation: Reservation, kind: str):
    return NodeCommand.objects.filter(correlation_id=reservation.pk, kind=kind)


@transaction.atomic
def reservation_provision_start(*, reservation_id) -> int:
    """Issue the provision commands a provisioning reservation still lacks; returns how many."""
    reservation = (
        Reservation.objects.select_related("offer__accelerator_type", "image")
        .filter(pk=reservation_id, state=S.PROVISIONING)
        .first()
    )
    if reservation is None:
        return 0
    issued = set(_commands(reservation, CommandKind.PROVISION).values_list("node_id", flat=True))
    missing = [a for a in reservation.allocations.filter(live=True) if a.node_id not in issued]
    for allocation in missing:
        node_command_issue(
            node_id=allocation.node_id,
            kind=CommandKind.PROVISION,
            correlation_id=reservation.pk,
            params=provision_params(reservation, allocation),
            timeout_seconds=settings.PROVISION_TIMEOUT_SECONDS,
        )
    return len(missing)


# What the subdomains renting reservations for their own use add to a provision command (an endpoint's
# replica: the server to run). Registered in MarketplaceConfig.ready, so reservations import none of them.
_param_extras: list = []


def on_provision_params(callback) -> None:
    """Register ``callback(reservation) -> dict | None``: more params for its provision commands."""
    if callback not in _param_extras:
        _param_extras.append(callback)


def provision_params(reservation: Reservation, allocation) -> dict:
    """What the agent is told (docs/agent-protocol.md): the reservation, the GPU indices of the node it
    may use -- the workload sees only those -- their vendor, which names the variables that say so, the
    image and the SSH keys of its access (services.reservations.access), and what the registered extras
    add."""
    params = {
        "reservation": str(reservation.pk),
        "gpus": list(allocation.gpu_indices),
        "gpu_vendor": reservation.offer.accelerator_type.vendor,
        **access_params(reservation),
    }
    for extra in _param_extras:
        params.update(extra(reservation) or {})
    return params


@transaction.atomic
def reservation_teardown_start(*, reservation_id) -> int:
    """Issue the release commands a releasing (or failed) reservation still lacks."""
    reservation = Reservation.objects.filter(pk=reservation_id, state__in=(S.RELEASING, S.FAILED)).first()
    if reservation is None:
        return 0
    issued = set(_commands(reservation, CommandKind.RELEASE).values_list("node_id", flat=True))
    missing = [a.node_id for a in reservation.allocations.all() if a.node_id not in issued]
    for node_id in missing:
        node_command_issue(
            node_id=node_id,
            kind=CommandKind.RELEASE,
            correlation_id=reservation.pk,
            params={"reservation": str(reservation.pk)},
            timeout_seconds=settings.RELEASE_TIMEOUT_SECONDS,
        )
    return len(missing)


def on_command_finished(command: NodeCommand) -> None:
    """provisioning.hooks: a node answered (or missed its deadline). Runs in that transaction."""
    if command.correlation_id is None:
        return
    reservation = Reservation.objects.filter(pk=command.correlation_id).first()
    if reservation is None:
        return
    if command.kind == CommandKind.PROVISION:
        _provision_finished(reservation, command)
    elif command.kind == CommandKind.RELEASE:
        _release_finished(reservation, command)


def _provision_finished(reservation: Reservation, command: NodeCommand) -> None:
    if command.state == CommandState.FAILED:
        reason = f"{command.node.hostname}: {command.error or 'provisioning failed'}"
        reservation_fail(reservation_id=reservation.pk, reason=reason)  # its nodes are torn down (OnEnter)
        return
    access_provisioned(reservation, command)
    done = _commands(reservation, CommandKind.PROVISION).filter(state=CommandState.SUCCEEDED).count()
    if done >= reservation.node_count:
        reservation_activate(reservation_id=reservation.pk)


def _release_finished(reservation: Reservation, command: NodeCommand) -> None:
    if command.state == CommandState.FAILED:
        _send_to_maintenance(command)
    releases = _commands(reservation, CommandKind.RELEASE)
    if (
        releases.count() >= reservation.allocations.count()
        and not releases.exclude(state__in=(CommandState.SUCCEEDED, CommandState.FAILED)).exists()
    ):
        reservation_complete(reservation_id=reservation.pk)


def _send_to_maintenance(command: NodeCommand) -> None:
    """A node that could not be torn down must not be rented again before an operator looks at it."""
    node = command.node
    reason = f"release failed: {command.error}"[:200]
    for target in (NodeState.DRAINING, NodeState.MAINTENANCE):
        try:
            node_transition(node=node, target=target, actor="provisioning", reason=reason)
        except IllegalTransition:
            continue
    logger.warning("Node %s sent to maintenance: %s", node.hostname, reason)


def on_command_progress(command: NodeCommand) -> None:
    """Provisioning progress to the tenant's browsers."""
    if command.correlation_id is None or command.kind not in (CommandKind.PROVISION, CommandKind.RELEASE):
        return
    organization_id = (
        Reservation.objects.filter(pk=command.correlation_id).values_list("organization_id", flat=True).first()
    )
    if organization_id is not None:
        publish_on_commit(
            tenant_group(organization_id),
            "reservation.progress",
            {
                "id": str(command.correlation_id),
                "node": command.node.hostname,
                "kind": command.kind,
                "step": command.progress_step,
                "percent": command.progress_percent,
            },
        )


def reservations_reconcile() -> dict[str, int]:
    """Re-enqueue reservation work whose task was lost (a worker killed, Redis flushed): rows are the truth."""

    counts = {"provision": 0, "release": 0}
    for reservation in Reservation.objects.filter(state=S.PROVISIONING):
        if _commands(reservation, CommandKind.PROVISION).count() < reservation.allocations.filter(live=True).count():
            with transaction.atomic():
                enqueue_on_commit("marketplace.tasks.provision_reservation", str(reservation.pk))
            counts["provision"] += 1
    for reservation in Reservation.objects.filter(state=S.RELEASING):
        if _commands(reservation, CommandKind.RELEASE).count() < reservation.allocations.count():
            with transaction.atomic():
                enqueue_on_commit("marketplace.tasks.release_reservation", str(reservation.pk))
            counts["release"] += 1
    return counts


def reservation_force_release(*, reservation: Reservation, actor: str) -> Reservation:
    """Operators: free a reservation's nodes now, whatever state it is in (pending: cancelled). Release
    commands still go to the agents; the nodes are free for new reservations at once."""
    note = f"released by operator {actor}"
    with transaction.atomic():
        if reservation.state == S.PENDING:
            reservation_cancel_as_operator(reservation=reservation, reason=note)
        else:
            reservation_release(reservation_id=reservation.pk, reason=note)
            reservation_teardown_start(reservation_id=reservation.pk)
            reservation_complete(reservation_id=reservation.pk)
    reservation.refresh_from_db()
    return reservation


def node_audience(node_id: int) -> list[Audience]:
    """provisioning.hooks: who may see a node's telemetry now -- each reservation active on it, with the
    GPUs its live allocation holds there (slices: several at once, each only its own). Only active:
    while one is still provisioning the GPUs, or releasing them, another may be active on them (or just
    have been), and each sees only its own active interval (selectors.reservations)."""
    holding = Allocation.objects.filter(node_id=node_id, live=True, reservation__state=S.ACTIVE).values_list(
        "reservation_id", "gpus"
    )
    return [Audience(reservation_group(pk), range(gpus.lower, gpus.upper)) for pk, gpus in holding.order_by("gpus")]
