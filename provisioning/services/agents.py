"""Writes about node agents: enrolment, credentials, what agents report, and the commands they are
sent. The agent consumer and the Celery tasks call these; docs/agent-protocol.md is the contract."""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from console.kernel.errors import DomainError, Forbidden, NotFound, delete_or_refuse
from console.kernel.events import publish, publish_on_commit
from console.kernel.lifecycle import IllegalTransition, transition
from console.kernel.tokens import matches, new_token, parse
from provisioning import hooks
from provisioning.choices import CommandKind, CommandState, NodeState
from provisioning.models import (
    COMMAND_TRANSITIONS,
    UNFINISHED,
    AcceleratorType,
    BootstrapToken,
    Node,
    NodeCommand,
    NodeCredential,
)
from provisioning.services.fleet import GpuSpec, node_set_inventory, node_transition

logger = logging.getLogger(__name__)
NODE_SECRET_SCHEME = "ncn"  # noqa: S105 - a token scheme name, not a secret
BOOTSTRAP_SCHEME = "ncb"
C = CommandState


class InvalidNodeSecret(Exception):
    """Unknown, revoked or rotated-away node secret (deliberately not saying which)."""


def agent_group(node_id) -> str:
    """The Channels group of a node's agent connection: only its own consumer joins it."""
    return f"agent.{node_id}"


# --- Enrolment and credentials ------------------------------------------------------------------


def bootstrap_token_create(*, node: Node, actor: str, hours: int | None = None) -> str:
    """A one-time enrolment token for ``node``; returns the plaintext, which is not stored."""
    token = new_token(BOOTSTRAP_SCHEME)
    BootstrapToken.objects.create(
        node=node,
        prefix=token.prefix,
        token_hash=token.digest,
        created_by=actor[:254],
        expires_at=timezone.now() + timedelta(hours=hours or settings.BOOTSTRAP_TOKEN_HOURS),
    )
    logger.info("Bootstrap token %s… created for %s by %s", token.prefix, node.hostname, actor)
    return token.plaintext


class EnrolmentRefused(Forbidden):
    code = "enrolment_refused"


@transaction.atomic
def node_enrol(*, token: str, hostname: str, agent_version: str = "") -> tuple[Node, str]:
    """Exchange a bootstrap token for the node's own secret (plaintext returned once)."""
    parsed = parse(token, BOOTSTRAP_SCHEME)
    row = (
        BootstrapToken.objects.select_for_update().select_related("node").filter(prefix=parsed.prefix).first()
        if parsed
        else None
    )
    if row is None or not matches(row.token_hash, parsed):
        raise EnrolmentRefused("The bootstrap token is not valid.")
    if row.used_at is not None:
        raise EnrolmentRefused("The bootstrap token was already used; ask an operator for a new one.")
    if row.expires_at <= timezone.now():
        raise EnrolmentRefused("The bootstrap token has expired; ask an operator for a new one.")
    if row.node.hostname != (hostname or "").strip().lower():
        raise EnrolmentRefused(f"The bootstrap token was made for another host, not {hostname!r}.")
    row.used_at = timezone.now()
    row.save(update_fields=["used_at"])
    secret = new_token(NODE_SECRET_SCHEME)
    NodeCredential.objects.update_or_create(
        node=row.node,
        defaults={
            "prefix": secret.prefix,
            "secret_hash": secret.digest,
            "next_prefix": "",
            "next_secret_hash": "",
            "revoked_at": None,
            "rotated_at": timezone.now(),
        },
    )
    Node.objects.filter(pk=row.node.pk).update(agent_version=agent_version[:32])
    logger.info("Node %s enrolled (secret %s…)", row.node.hostname, secret.prefix)
    return row.node, secret.plaintext


def node_authenticate(*, secret: str) -> Node:
    """The node whose current (or just-rotated-to) secret this is; InvalidNodeSecret otherwise."""
    token = parse(secret, NODE_SECRET_SCHEME)
    if token is None:
        raise InvalidNodeSecret
    credential = (
        NodeCredential.objects.select_related("node")
        .filter(Q(prefix=token.prefix) | Q(next_prefix=token.prefix), revoked_at__isnull=True)
        .first()
    )
    if credential is None:
        raise InvalidNodeSecret
    if credential.prefix == token.prefix and matches(credential.secret_hash, token):
        return credential.node
    if credential.next_prefix == token.prefix and matches(credential.next_secret_hash, token):
        _promote_next_secret(credential)  # the agent stored the new secret and reconnected with it
        return credential.node
    raise InvalidNodeSecret


def node_secret_known(*, node: Node, secret: str) -> bool:
    """Whether ``secret`` is ``node``'s current or next secret, unrevoked: node_authenticate's answer
    for that node, reading only (a dev tool's check of stored credentials, before agents connect)."""
    token = parse(secret, NODE_SECRET_SCHEME)
    credential = NodeCredential.objects.filter(node=node, revoked_at__isnull=True).first()
    if token is None or credential is None:
        return False
    return (credential.prefix == token.prefix and matches(credential.secret_hash, token)) or (
        bool(credential.next_prefix)
        and credential.next_prefix == token.prefix
        and matches(credential.next_secret_hash, token)
    )


def _promote_next_secret(credential: NodeCredential) -> None:
    NodeCredential.objects.filter(pk=credential.pk, next_prefix=credential.next_prefix).update(
        prefix=credential.next_prefix,
        secret_hash=credential.next_secret_hash,
        next_prefix="",
        next_secret_hash="",
        rotated_at=timezone.now(),
    )


def node_secret_revoke(*, node: Node, actor: str) -> None:
    """Refuse the node's agent from now on, and close its connection if it has one."""
    NodeCredential.objects.filter(node=node, revoked_at__isnull=True).update(revoked_at=timezone.now())
    logger.info("Secret of %s revoked by %s", node.hostname, actor)
    publish_on_commit(agent_group(node.pk), "agent.disconnect", {"code": 4401})


@transaction.atomic
def node_delete(*, node: Node, actor: str) -> None:
    """Retire a host that never served (rows that must outlive a node, its commands and allocations,
    refuse it): its agent is disconnected first, and its credential goes with it."""
    node_secret_revoke(node=node, actor=actor)
    delete_or_refuse(node, noun="node")


def node_secret_rotate(*, node: Node, actor: str) -> bool:
    """Send a connected agent a new secret. The old one stays valid until the agent confirms it stored
    the new one (or connects with it), so a lost message locks nobody out. False if not enrolled."""
    credential = NodeCredential.objects.filter(node=node, revoked_at__isnull=True).first()
    if credential is None:
        return False
    secret = new_token(NODE_SECRET_SCHEME)
    NodeCredential.objects.filter(pk=credential.pk).update(next_prefix=secret.prefix, next_secret_hash=secret.digest)
    logger.info("Rotation of the secret of %s started by %s", node.hostname, actor)
    # Through the channel layer to the agent's own consumer only; never stored in plaintext.
    transaction.on_commit(lambda: publish(agent_group(node.pk), "agent.rotate", {"secret": secret.plaintext}))
    return True


def node_secret_rotated(*, node: Node) -> None:
    credential = NodeCredential.objects.filter(node=node, revoked_at__isnull=True).exclude(next_prefix="").first()
    if credential is not None:
        _promote_next_secret(credential)


# --- What agents report ---------------------------------------------------------------------------


def _types_by_device_name() -> dict[str, AcceleratorType]:
    return {t.device_name: t for t in AcceleratorType.objects.exclude(device_name="")}


@transaction.atomic
def node_hello(*, node: Node, agent_version: str, driver_version: str, gpus: list[dict]) -> Node:
    """Reconcile the inventory an agent reports on connect, and bring the node back into service if it
    was enrolling or offline. GPUs of a model the catalog does not know are refused."""
    types = _types_by_device_name()
    specs = []
    for gpu in gpus:
        accelerator = types.get(gpu.get("name", ""))
        if accelerator is None:
            raise DomainError(
                f"Unknown GPU model {gpu.get('name')!r}; an operator must add its accelerator type.",
                code="unknown_gpu_model",
            )
        specs.append(
            GpuSpec(
                index=int(gpu["index"]),
                uuid=str(gpu["uuid"]),
                accelerator_type=accelerator,
                memory_mib=int(gpu["memory_mib"]),
            )
        )
    node = node_set_inventory(node=node, gpus=specs)
    Node.objects.filter(pk=node.pk).update(
        agent_version=agent_version[:32], driver_version=driver_version[:32], last_seen_at=timezone.now()
    )
    node.refresh_from_db()
    if node.state in (NodeState.ENROLLING, NodeState.OFFLINE):
        node_transition(node=node, target=NodeState.AVAILABLE, actor="agent", reason="agent connected")
    return node


def node_seen(*, node_id: int, now: datetime | None = None) -> None:
    """Record that the agent is alive. Written at most twice per heartbeat interval per node."""
    now = now or timezone.now()
    stale_before = now - timedelta(seconds=settings.AGENT_HEARTBEAT_SECONDS / 2)
    Node.objects.filter(Q(last_seen_at__isnull=True) | Q(last_seen_at__lt=stale_before), pk=node_id).update(
        last_seen_at=now
    )


def nodes_mark_silent_offline(*, now: datetime | None = None) -> int:
    """Nodes whose agent missed AGENT_MISSED_BEATS heartbeats go offline."""
    now = now or timezone.now()
    silent_since = now - timedelta(seconds=settings.AGENT_HEARTBEAT_SECONDS * settings.AGENT_MISSED_BEATS)
    moved = 0
    for node in Node.objects.filter(last_seen_at__lt=silent_since).exclude(state=NodeState.OFFLINE):
        try:
            node_transition(
                node=node,
                target=NodeState.OFFLINE,
                actor="heartbeat sweeper",
                reason=f"no heartbeat since {node.last_seen_at.isoformat()}",
            )
            moved += 1
        except IllegalTransition:
            continue
    return moved


# --- Commands ------------------------------------------------------------------------------------


def _push(command: NodeCommand) -> None:
    publish_on_commit(agent_group(command.node_id), "agent.command", {"id": str(command.id)})


@transaction.atomic
def node_command_issue(
    *, node_id: int, kind: str, params: dict, correlation_id=None, timeout_seconds: int, once: bool = True
) -> NodeCommand:
    """A command for a node's agent, made once per (correlation, node, kind) and pushed after commit;
    ``once=False`` for kinds sent again and again for one correlation (a reservation's key lists)."""
    if correlation_id is not None and once:
        existing = NodeCommand.objects.filter(correlation_id=correlation_id, node_id=node_id, kind=kind).first()
        if existing is not None:
            return existing
    command = NodeCommand.objects.create(
        node_id=node_id,
        kind=CommandKind(kind),
        params=params,
        correlation_id=correlation_id,
        deadline=timezone.now() + timedelta(seconds=timeout_seconds),
    )
    _push(command)
    return command


def node_commands_unfinished(*, node_id: int) -> list[NodeCommand]:
    return list(NodeCommand.objects.filter(node_id=node_id, state__in=UNFINISHED, deadline__gt=timezone.now()))


def node_command_for_agent(*, node_id: int, command_id) -> NodeCommand:
    """A command of this node; another node's command id is as unknown as a made-up one."""
    try:
        return NodeCommand.objects.get(pk=command_id, node_id=node_id)
    except (NodeCommand.DoesNotExist, ValidationError, ValueError, TypeError):
        raise NotFound(f"No command {command_id} for this node.") from None


def node_command_sent(*, command: NodeCommand) -> None:
    NodeCommand.objects.filter(pk=command.pk).update(send_count=F("send_count") + 1, sent_at=timezone.now())
    NodeCommand.objects.filter(pk=command.pk, state=C.QUEUED).update(state=C.SENT, state_changed_at=timezone.now())


def node_command_acknowledged(*, node_id: int, command_id) -> None:
    command = node_command_for_agent(node_id=node_id, command_id=command_id)
    if command.state in (C.QUEUED, C.SENT):
        try:
            transition(command, table=COMMAND_TRANSITIONS, target=C.ACKNOWLEDGED)
        except IllegalTransition:
            pass  # a result overtook the ack


def node_command_progress(*, node_id: int, command_id, step: str, percent: int) -> None:
    command = node_command_for_agent(node_id=node_id, command_id=command_id)
    if command.finished:
        return
    percent = max(0, min(100, int(percent)))
    NodeCommand.objects.filter(pk=command.pk).update(progress_step=str(step)[:100], progress_percent=percent)
    command.progress_step, command.progress_percent = str(step)[:100], percent
    hooks.command_progress(command)


@transaction.atomic
def node_command_finish(*, node_id: int, command_id, ok: bool, detail: dict | None = None, error: str = "") -> bool:
    """Record a command's outcome once; a repeated result changes nothing. False if already finished."""
    command = node_command_for_agent(node_id=node_id, command_id=command_id)
    return _finish(command, ok=ok, detail=detail or {}, error=error)


def _finish(command: NodeCommand, *, ok: bool, detail: dict, error: str) -> bool:
    if command.finished:
        return False
    try:
        transition(
            command,
            table=COMMAND_TRANSITIONS,
            target=C.SUCCEEDED if ok else C.FAILED,
            result=detail,
            error=(error or "")[:500],
            progress_percent=100 if ok else command.progress_percent,
            params=without_secrets(command.params),
        )
    except IllegalTransition:
        return False
    hooks.command_finished(command)
    return True


def without_secrets(params: dict) -> dict:
    """A finished command's params as kept: a finished command is never sent again, so the secrets it
    carried to the agent (a replica's ``serve.secret``, docs/agent-protocol.md) leave the database."""
    serve = params.get("serve") if isinstance(params, dict) else None
    if not isinstance(serve, dict) or "secret" not in serve:
        return params
    return {**params, "serve": {**serve, "secret": "[removed once the command finished]"}}


def node_commands_expire(*, now: datetime | None = None) -> int:
    """Fail every unfinished command past its deadline (the reconciler's job)."""
    expired = 0
    for command in NodeCommand.objects.filter(state__in=UNFINISHED, deadline__lte=now or timezone.now()):
        with transaction.atomic():
            expired += _finish(command, ok=False, detail={}, error="deadline missed: the agent did not finish in time")
    return expired


def node_commands_repush(*, older_than_seconds: int = 30, now: datetime | None = None) -> int:
    """Push again commands an agent has not acknowledged: a push is lost if Redis was flushed or the
    connection dropped between the row and the push (invariant 2: rows are the truth)."""
    now = now or timezone.now()
    stale = NodeCommand.objects.filter(state__in=(C.QUEUED, C.SENT), deadline__gt=now).filter(
        Q(sent_at__isnull=True, created_at__lt=now - timedelta(seconds=5))
        | Q(sent_at__lt=now - timedelta(seconds=older_than_seconds))
    )
    count = 0
    for command in stale:
        publish(agent_group(command.node_id), "agent.command", {"id": str(command.id)})
        count += 1
    return count
