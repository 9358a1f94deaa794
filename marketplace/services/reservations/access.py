"""A way into what was rented (docs/access.md): the image a reservation's nodes boot into, the SSH keys
its access lets in, and keeping the agents' key lists in step with the console's.

A reservation made by a tenant has access (an endpoint's replica has none: only the gateway reaches it).
Its provision commands carry the image's steps and the keys (``access_params``); each agent sets up a
dedicated SSH server for it and answers with where it serves. A key added to or taken from a running
reservation -- by its members, or because the key or its owner's membership was removed -- bumps the
reservation's ``access_version`` under its row lock and sends every node already provisioned an
``access`` command with the whole key list and that version; an agent applies a list only if it is newer
than the one it has, so two changes crossing on the way end as the later one. A node still provisioning
when the keys change is sent the newer list once its provision succeeds (``access_provisioned``)."""

import logging
import re

from django.conf import settings
from django.db import transaction

from console.kernel.errors import Conflict, DomainError, Forbidden, NotFound
from console.kernel.events import publish_on_commit, tenant_group
from marketplace.choices import ReservationState, Role
from marketplace.models import Reservation, SshKey
from marketplace.tenant_context import TenantContext
from provisioning.choices import CommandKind, CommandState
from provisioning.models import NodeCommand
from provisioning.services.agents import node_command_issue

logger = logging.getLogger(__name__)
S = ReservationState

# While its nodes are being set up or are up: a change of keys reaches them.
KEYED_STATES = (S.PENDING, S.PROVISIONING, S.ACTIVE)
MAX_KEYS = 32
_COMMENT_UNSAFE = re.compile(r"[^\w.@+-]+")


def keys_for(*, tenant: TenantContext, key_ids: list | None) -> list[SshKey]:
    """The keys a new reservation installs: those named (the tenant's own or the organization's shared
    ones; admins may name any member's), else the tenant's own keys."""
    organization_keys = SshKey.objects.filter(organization=tenant.organization)
    if key_ids is None:
        return list(organization_keys.filter(owner=tenant.user).order_by("created_at")[:MAX_KEYS])
    if len(key_ids) > MAX_KEYS:
        raise _keys_refused(f"At most {MAX_KEYS} keys per reservation.")
    found = {str(key.pk): key for key in organization_keys.filter(pk__in=key_ids)}
    missing = [str(key_id) for key_id in key_ids if str(key_id) not in found]
    if missing:
        raise _keys_refused(f"No SSH key {missing[0]} in {tenant.organization.name}.", code="unknown_ssh_key")
    keys = list(dict.fromkeys(found[str(key_id)] for key_id in key_ids))
    for key in keys:
        _check_may_install(tenant, key)
    return keys


def _keys_refused(message: str, *, code: str = "invalid") -> DomainError:
    return DomainError(message, code=code, fields={"ssh_keys": [message]})


def _check_may_install(tenant: TenantContext, key: SshKey) -> None:
    if key.owner_id not in (None, tenant.user.pk) and not tenant.is_admin:
        raise Forbidden(
            f"The key {key.name} is another member's; only admins and owners install someone else's key.",
            code="ssh_key_not_yours",
        )


def access_params(reservation: Reservation) -> dict:
    """What its provision commands add (docs/agent-protocol.md, "Access"): the image and the keys."""
    if not reservation.has_access:
        return {}
    params = {"access": {"keys": _key_lines(reservation), "version": reservation.access_version}}
    if reservation.image is not None:
        image = reservation.image
        params["image"] = {"slug": image.slug, "name": image.name, "steps": image.steps}
    return params


def _key_lines(reservation: Reservation) -> list[str]:
    """authorized_keys lines: the key and, as its comment, who it is (what ``who`` in a session shows)."""
    lines = []
    for key in reservation.ssh_keys.select_related("owner").order_by("created_at"):
        who = key.owner.email if key.owner_id else f"shared:{key.name}"
        lines.append(f"{key.public_key} {_COMMENT_UNSAFE.sub('_', who)[:100]}")
    return lines


def _locked(reservation_id) -> Reservation:
    return Reservation.objects.select_for_update(of=("self",)).select_related("image").get(pk=reservation_id)


@transaction.atomic
def reservation_key_add(*, tenant: TenantContext, reservation: Reservation, key: SshKey) -> Reservation:
    """Let ``key`` into a reservation of the tenant's (its running nodes within seconds)."""
    tenant.require(Role.MEMBER, "changing a reservation's SSH keys")
    reservation = _changeable(tenant, reservation)
    if key.organization_id != tenant.organization.pk:
        raise NotFound("No such SSH key in this organization.")
    _check_may_install(tenant, key)
    if reservation.ssh_keys.filter(pk=key.pk).exists():
        raise Conflict(f"The key {key.name} is already installed on this reservation.", code="ssh_key_installed")
    if reservation.ssh_keys.count() >= MAX_KEYS:
        raise _keys_refused(f"At most {MAX_KEYS} keys per reservation.")
    reservation.ssh_keys.add(key)
    _sync(reservation)
    return reservation


@transaction.atomic
def reservation_key_remove(*, tenant: TenantContext, reservation: Reservation, key_id) -> Reservation:
    """Take a key out of a reservation: the key's owner, the reservation's creator, or an admin."""
    tenant.require(Role.MEMBER, "changing a reservation's SSH keys")
    reservation = _changeable(tenant, reservation)
    key = reservation.ssh_keys.filter(pk=key_id).first()
    if key is None:
        raise NotFound("That key is not installed on this reservation.")
    if not tenant.is_admin and tenant.user.pk not in (key.owner_id, reservation.created_by_id):
        raise Forbidden("Only the key's owner, the reservation's creator, admins and owners take a key out.")
    reservation.ssh_keys.remove(key)
    _sync(reservation)
    return reservation


def _changeable(tenant: TenantContext, reservation: Reservation) -> Reservation:
    if reservation.organization_id != tenant.organization.pk:  # selectors already scope; a backstop
        raise NotFound("No such reservation.")
    reservation = _locked(reservation.pk)
    if not reservation.has_access:
        raise Conflict("This reservation has no SSH access (an endpoint's replica).", code="no_access")
    if reservation.state not in KEYED_STATES:
        raise Conflict(f"The reservation is {reservation.state}: its access is gone.", code="reservation_finished")
    return reservation


def keys_removed(reservation_ids) -> None:
    """services.tenancy.ssh_keys (on_keys_removed): keys were deleted, so the running reservations that
    had them get their new lists. Runs in the deleting transaction."""
    for reservation_id in sorted(set(reservation_ids), key=str):
        reservation = _locked(reservation_id)
        if reservation.has_access and reservation.state in KEYED_STATES:
            _sync(reservation)


def _sync(reservation: Reservation) -> int:
    """Bump the version and send the whole list to every node whose provision succeeded; returns how
    many. Under the reservation's row lock (the caller's)."""
    reservation.access_version += 1
    Reservation.objects.filter(pk=reservation.pk).update(access_version=reservation.access_version)
    sent = 0
    if reservation.state in (S.PROVISIONING, S.ACTIVE):
        keys = _key_lines(reservation)  # once: every node gets the same list
        for node_id in _provisioned_nodes(reservation):
            _send(reservation, node_id, keys)
            sent += 1
    publish_on_commit(
        tenant_group(reservation.organization_id),
        "reservation.access",
        {"id": str(reservation.pk), "version": reservation.access_version},
    )
    return sent


def _provisioned_nodes(reservation: Reservation) -> list[int]:
    live = reservation.allocations.filter(live=True).values_list("node_id", flat=True)
    return list(
        NodeCommand.objects.filter(
            correlation_id=reservation.pk, kind=CommandKind.PROVISION, state=CommandState.SUCCEEDED, node_id__in=live
        ).values_list("node_id", flat=True)
    )


def _send(reservation: Reservation, node_id: int, keys: list[str]) -> None:
    node_command_issue(
        node_id=node_id,
        kind=CommandKind.ACCESS,
        correlation_id=reservation.pk,
        params={
            "reservation": str(reservation.pk),
            "keys": keys,
            "version": reservation.access_version,
        },
        timeout_seconds=settings.ACCESS_TIMEOUT_SECONDS,
        once=False,
    )


def access_provisioned(reservation: Reservation, command: NodeCommand) -> None:
    """A node's provision succeeded: if the keys changed since its command was made, send it the list
    now (a change made while it provisioned went to the nodes already up only)."""
    sent_version = (command.params.get("access") or {}).get("version")
    if not reservation.has_access or sent_version is None:
        return
    reservation = _locked(reservation.pk)
    if reservation.access_version > sent_version:
        _send(reservation, command.node_id, _key_lines(reservation))
