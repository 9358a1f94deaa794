import uuid

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models

from provisioning.choices import CommandKind, CommandState

from .fleet import Node


class BootstrapToken(models.Model):
    """A one-time token an operator hands to a new host so its agent can enrol."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="bootstrap_tokens")
    prefix = models.CharField(max_length=16, unique=True)
    token_hash = models.CharField(max_length=64)
    created_by = models.CharField(max_length=254, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.node} ({self.prefix}…)"


class NodeCredential(models.Model):
    """The node's own secret, stored as a digest. An agent speaks only for the node whose secret it
    holds (ARCHITECTURE invariant 6). During a rotation the next secret waits in ``next_*`` until the
    agent confirms it has stored it."""

    node = models.OneToOneField(Node, on_delete=models.CASCADE, related_name="credential")
    prefix = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64)
    next_prefix = models.CharField(max_length=16, blank=True)
    next_secret_hash = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.node} ({self.prefix}…)"


# Commands move queued → sent → acknowledged → succeeded | failed; a missed deadline fails them.
C = CommandState
COMMAND_TRANSITIONS: dict[str, frozenset[str]] = {
    C.QUEUED: frozenset({C.SENT, C.ACKNOWLEDGED, C.SUCCEEDED, C.FAILED}),
    C.SENT: frozenset({C.ACKNOWLEDGED, C.SUCCEEDED, C.FAILED}),
    C.ACKNOWLEDGED: frozenset({C.SUCCEEDED, C.FAILED}),
    C.SUCCEEDED: frozenset(),
    C.FAILED: frozenset(),
}
UNFINISHED = (C.QUEUED, C.SENT, C.ACKNOWLEDGED)


class NodeCommand(models.Model):
    """Something an agent must do, as a row first (ARCHITECTURE invariant 3): pushed when made, pushed
    again on every reconnection until a result comes, failed when its deadline passes. ``correlation_id``
    names what asked for it (a reservation) without provisioning knowing what that is."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="commands")
    kind = models.CharField(max_length=16, choices=CommandKind.choices)
    params = models.JSONField(default=dict, encoder=DjangoJSONEncoder)
    correlation_id = models.UUIDField(null=True, blank=True, db_index=True)
    state = models.CharField(max_length=16, choices=CommandState.choices, default=C.QUEUED)
    state_changed_at = models.DateTimeField(auto_now_add=True)
    deadline = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    send_count = models.PositiveIntegerField(default=0)
    progress_step = models.CharField(max_length=100, blank=True)
    progress_percent = models.PositiveSmallIntegerField(default=0)
    result = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["created_at"]
        verbose_name = "node command"
        constraints = [
            # One provision and one release per (reservation, node); a reservation's key lists
            # (``access``) are sent as often as they change.
            models.UniqueConstraint(
                fields=["correlation_id", "node", "kind"],
                condition=models.Q(correlation_id__isnull=False) & ~models.Q(kind=CommandKind.ACCESS),
                name="command_once_per_subject",
            ),
            models.CheckConstraint(condition=models.Q(state__in=CommandState.values), name="command_state_valid"),
        ]
        indexes = [models.Index(fields=["node", "state"], name="command_node_state_idx")]

    def __str__(self) -> str:
        return f"{self.kind} {self.node} ({self.state})"

    @property
    def finished(self) -> bool:
        return self.state in (C.SUCCEEDED, C.FAILED)

    def as_frame(self) -> dict:
        """The command as the agent receives it (docs/agent-protocol.md)."""
        return {
            "type": "command",
            "id": str(self.id),
            "kind": self.kind,
            "params": self.params,
            "deadline": self.deadline.isoformat(),
        }
