"""Inference endpoints: a tenant's model behind an OpenAI-compatible URL, served by replicas.

A replica is a rental like any other: it holds a GPU slice through a Reservation of a slice offer
(placement, quotas, balance holds, metering, invoices and telemetry sealing all come with it), leased
for REPLICA_LEASE and renewed while its endpoint lives. The Replica row adds what serving needs: the
address the agent reported and whether the server is answering."""

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from marketplace.choices import ReplicaState
from provisioning.models import AcceleratorType, Site

from .catalog import SLICE_SIZES
from .reservations import Reservation
from .tenancy import Organization


class ModelTask(models.TextChoices):
    EMBEDDINGS = "embeddings", "Embeddings"
    CHAT = "chat", "Chat"  # when a runtime for it exists


class ServedModel(models.Model):
    """A model operators offer to serve, and how a replica runs it on a host."""

    slug = models.SlugField(max_length=64, unique=True, help_text="What the catalog calls it, e.g. all-minilm-l6-v2.")
    name = models.CharField(max_length=100, help_text="Display name, e.g. all-MiniLM-L6-v2.")
    task = models.CharField(max_length=16, choices=ModelTask.choices, default=ModelTask.EMBEDDINGS)
    description = models.CharField(max_length=300, blank=True)
    server_program = models.JSONField(
        help_text='The model server\'s argv on a host, e.g. ["python", "-m", "provisioning.agent.serving", ...]; '
        "the agent adds the port, the served name comes from the endpoint."
    )
    weights = models.CharField(max_length=300, help_text="Where the weights are: a Python package or a host path.")
    gpus_per_replica = models.PositiveSmallIntegerField(default=1, help_text="GPUs one replica holds (a slice).")
    gpu_memory_gib = models.PositiveIntegerField(default=1, help_text="GPU memory one replica needs.")
    dimensions = models.PositiveIntegerField(null=True, blank=True, help_text="Embedding size (embeddings).")
    accelerator_types = models.ManyToManyField(AcceleratorType, related_name="served_models")
    is_active = models.BooleanField(default=True, help_text="Inactive models take no new endpoints.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(gpus_per_replica__in=SLICE_SIZES), name="served_model_replica_is_a_slice_size"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class EndpointState(models.TextChoices):
    DEPLOYING = "deploying", "Deploying"  # no replica ready yet
    READY = "ready", "Ready"  # at least min_replicas ready
    DEGRADED = "degraded", "Degraded"  # some ready, fewer than min_replicas
    SCALING = "scaling", "Scaling"  # replicas being added or removed
    IDLE = "idle", "Idle"  # scaled to zero (min_replicas 0, no traffic): the next request wakes it
    DELETING = "deleting", "Deleting"  # replicas being stopped
    DELETED = "deleted", "Deleted"


E = EndpointState
# The endpoint lifecycle. Every move goes through marketplace.services.endpoints, which checks this table.
_UP = (E.DEPLOYING, E.READY, E.DEGRADED, E.SCALING, E.IDLE)  # derived from the replicas: any of these to another
ENDPOINT_TRANSITIONS: dict[str, frozenset[str]] = {
    **{state: frozenset({*_UP, E.DELETING} - {state}) for state in _UP},
    E.DELETING: frozenset({E.DELETED}),
    E.DELETED: frozenset(),
}
SERVING_STATES = frozenset({E.READY, E.DEGRADED, E.SCALING})  # the gateway forwards to their ready replicas
WAKING_STATES = frozenset({E.IDLE, E.SCALING})  # with no replica ready the gateway holds a request a while


class PlacementPreference(models.TextChoices):
    NEAREST = "nearest", "Nearest site first"
    EDGE_FIRST = "edge_first", "Edge sites first"
    PINNED = "pinned", "Only the sites named"


MAX_REPLICAS = 16


class Endpoint(models.Model):
    """A tenant's model behind ``<gateway>/v1``: clients send the endpoint's name as ``model``."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="endpoints")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="endpoints"
    )
    name = models.SlugField(max_length=64, help_text="What clients send as `model`; unique in the organization.")
    model = models.ForeignKey(ServedModel, on_delete=models.PROTECT, related_name="endpoints")
    accelerator_types = models.ManyToManyField(
        AcceleratorType, blank=True, related_name="endpoints", help_text="Allowed types; none: any the model runs on."
    )
    region = models.CharField(max_length=32, help_text="Where the endpoint's users are, e.g. eu-central.")
    placement = models.CharField(
        max_length=16, choices=PlacementPreference.choices, default=PlacementPreference.NEAREST
    )
    pinned_sites = models.ManyToManyField(Site, blank=True, related_name="pinned_endpoints")
    min_replicas = models.PositiveSmallIntegerField(
        default=1, help_text="0: scale to zero when idle (the next request waits for a replica to start)."
    )
    max_replicas = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(MAX_REPLICAS)]
    )
    target_concurrency = models.PositiveSmallIntegerField(
        default=8,
        validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text="Requests in flight per replica.",
    )
    desired_replicas = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="What the autoscaler last asked for (within min and max); empty: min."
    )
    panic_until = models.DateTimeField(
        null=True, blank=True, help_text="The autoscaler is in panic mode (no scaling down) until then."
    )
    state = models.CharField(max_length=16, choices=EndpointState.choices, default=E.DEPLOYING)
    state_changed_at = models.DateTimeField(auto_now_add=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "name"], condition=~Q(state=E.DELETED), name="endpoint_name_unique_live"
            ),
            models.CheckConstraint(condition=Q(state__in=EndpointState.values), name="endpoint_state_valid"),
            models.CheckConstraint(
                condition=Q(
                    min_replicas__gte=0,
                    max_replicas__gte=1,
                    min_replicas__lte=models.F("max_replicas"),
                    max_replicas__lte=MAX_REPLICAS,
                ),
                name="endpoint_replica_bounds",
            ),
        ]
        indexes = [models.Index(fields=["organization", "state"], name="endpoint_org_state_idx")]

    def __str__(self) -> str:
        return f"{self.name} ({self.model})"

    @property
    def replica_target(self) -> int:
        """How many replicas it should run now: the autoscaler's ask within the bounds."""
        desired = self.min_replicas if self.desired_replicas is None else self.desired_replicas
        return max(self.min_replicas, min(self.max_replicas, desired))


class Replica(models.Model):
    """One model-server process of an endpoint, on the GPU slice its reservation holds."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="replicas")
    reservation = models.OneToOneField(Reservation, on_delete=models.PROTECT, related_name="replica")
    state = models.CharField(max_length=16, choices=ReplicaState.choices, default=ReplicaState.STARTING)
    address = models.CharField(max_length=100, blank=True, help_text="host:port the agent reported.")
    ready_at = models.DateTimeField(null=True, blank=True)
    draining_since = models.DateTimeField(null=True, blank=True, help_text="Chosen for removal at.")
    stopped_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=ReplicaState.values), name="replica_state_valid"),
        ]
        indexes = [models.Index(fields=["endpoint", "state"], name="replica_endpoint_state_idx")]

    def __str__(self) -> str:
        return f"{self.endpoint.name} replica {self.id.hex[:8]}"


class EndpointScaleEvent(models.Model):
    """One decision of the autoscaler that changed an endpoint's replicas: from how many to how many,
    why, and what it saw (the windows' average concurrency, the target, panic)."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="scale_events")
    at = models.DateTimeField()
    from_replicas = models.PositiveSmallIntegerField()
    to_replicas = models.PositiveSmallIntegerField()
    reason = models.CharField(max_length=200)
    panic = models.BooleanField(default=False)
    inputs = models.JSONField(default=dict)

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["endpoint", "at"], name="endpoint_scale_event_at_idx")]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.from_replicas} -> {self.to_replicas} at {self.at:%H:%M:%S}: {self.reason}"


# Request latency buckets of EndpointTraffic, upper bounds in milliseconds; the last bucket is open.
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class TrafficOutcome(models.TextChoices):
    OK = "ok", "Answered (2xx)"
    CLIENT_ERROR = "client_error", "Refused (4xx)"
    SERVER_ERROR = "server_error", "Failed (5xx)"


class EndpointTraffic(models.Model):
    """What the gateways answered for an endpoint, one row per minute, replica and outcome: the
    gateways count in memory and hand batches over through Redis (services.endpoints.traffic), so no
    request writes a row of its own. ``replica`` is empty for requests no replica took (none ready)."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="traffic")
    replica = models.ForeignKey(Replica, on_delete=models.PROTECT, null=True, blank=True, related_name="traffic")
    minute = models.DateTimeField(help_text="The minute the requests finished in (UTC, seconds zero).")
    outcome = models.CharField(max_length=16, choices=TrafficOutcome.choices)
    requests = models.PositiveIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0.0, help_text="Sum of the requests' latencies at the gateway.")
    latency_buckets = ArrayField(
        models.PositiveIntegerField(), size=len(LATENCY_BUCKETS_MS) + 1, help_text="Counts per LATENCY_BUCKETS_MS."
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint", "replica", "minute", "outcome"],
                name="endpoint_traffic_one_row",
                nulls_distinct=False,
            ),
            models.CheckConstraint(condition=Q(outcome__in=TrafficOutcome.values), name="endpoint_traffic_outcome"),
        ]
        indexes = [models.Index(fields=["endpoint", "minute"], name="endpoint_traffic_minute_idx")]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.minute:%Y-%m-%d %H:%M} {self.outcome}: {self.requests}"


class GatewayCursor(models.Model):
    """The last traffic batch taken from each gateway process (its id is drawn at start), so that a
    batch handed over twice -- the collector stopped between the database and Redis -- counts once."""

    gateway = models.CharField(max_length=64, primary_key=True)
    sequence = models.PositiveBigIntegerField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.gateway} at {self.sequence}"
