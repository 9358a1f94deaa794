from django.db import models

from provisioning.choices import NodeState, SiteKind

from .hardware import AcceleratorType


class Site(models.Model):
    """A data centre: a large training hall or a small edge site close to users."""

    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=100)
    region = models.CharField(max_length=32, db_index=True, help_text="e.g. eu-central, us-west.")
    kind = models.CharField(max_length=8, choices=SiteKind.choices)
    location = models.CharField(max_length=100, help_text="City and country, e.g. Frankfurt, DE.")
    power_capacity_mw = models.DecimalField(
        "power capacity (MW)", max_digits=7, decimal_places=2, null=True, blank=True
    )

    class Meta:
        ordering = ["region", "name"]

    def __str__(self) -> str:
        return self.name


class Rack(models.Model):
    """A rack: the unit of a rack-scale rental, one NVLink domain when the hardware has one."""

    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="racks")
    name = models.CharField(max_length=64)
    nvlink_domain_size = models.PositiveIntegerField(
        "NVLink domain (GPUs)", default=8, help_text="GPUs that share one NVLink domain (8 for HGX, 72 for NVL72)."
    )
    power_budget_kw = models.DecimalField("power budget (kW)", max_digits=7, decimal_places=2)

    class Meta:
        ordering = ["site", "name"]
        constraints = [models.UniqueConstraint(fields=["site", "name"], name="rack_name_unique_per_site")]

    def __str__(self) -> str:
        return f"{self.site.slug}/{self.name}"


class RegionSiteLatency(models.Model):
    """How far a site is from the users of a region, as the round-trip time the operator measured (or
    took from a measurement): what an endpoint's ``nearest`` placement orders sites by
    (marketplace.services.endpoints.replicas.candidate_offers). A region with no row for a site is not
    known to be near it; placement puts such sites after the measured ones."""

    region = models.CharField(max_length=32, db_index=True, help_text="Where the users are, e.g. eu-central.")
    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="latencies")
    rtt_ms = models.DecimalField(
        "round trip (ms)", max_digits=7, decimal_places=2, help_text="From the region's users to the site and back."
    )
    source = models.CharField(max_length=200, blank=True, help_text="Where the figure comes from.")

    class Meta:
        ordering = ["region", "rtt_ms", "site"]
        verbose_name = "region ↔ site latency"
        verbose_name_plural = "region ↔ site latencies"
        constraints = [
            models.UniqueConstraint(fields=["region", "site"], name="latency_unique_per_region_site"),
            models.CheckConstraint(
                condition=models.Q(rtt_ms__gte=0),
                name="latency_rtt_not_negative",
                violation_error_message="A round trip cannot be negative.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.region} ↔ {self.site.slug}: {self.rtt_ms} ms"


# The node lifecycle (ARCHITECTURE "Lifecycles"). Every move goes through
# provisioning.services.fleet.node_transition, which checks this table.
NODE_TRANSITIONS: dict[str, frozenset[str]] = {
    NodeState.ENROLLING: frozenset({NodeState.AVAILABLE, NodeState.OFFLINE}),
    NodeState.AVAILABLE: frozenset({NodeState.DRAINING, NodeState.OFFLINE}),
    NodeState.DRAINING: frozenset({NodeState.AVAILABLE, NodeState.MAINTENANCE, NodeState.OFFLINE}),
    NodeState.MAINTENANCE: frozenset({NodeState.AVAILABLE, NodeState.OFFLINE}),
    NodeState.OFFLINE: frozenset({NodeState.AVAILABLE, NodeState.MAINTENANCE}),
}


class Node(models.Model):
    """A GPU host. ``accelerator_type`` and ``gpu_count`` summarise its GPUs; they are written only by
    the inventory service together with the Gpu rows, so placement can filter on indexed columns."""

    rack = models.ForeignKey(Rack, on_delete=models.PROTECT, related_name="nodes")
    hostname = models.CharField(max_length=253, unique=True)
    state = models.CharField(max_length=16, choices=NodeState.choices, default=NodeState.ENROLLING)
    state_changed_at = models.DateTimeField(auto_now_add=True)
    accelerator_type = models.ForeignKey(
        AcceleratorType, on_delete=models.PROTECT, null=True, blank=True, related_name="nodes"
    )
    gpu_count = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    # What its agent last said (docs/agent-protocol.md).
    last_seen_at = models.DateTimeField(null=True, blank=True, help_text="Last frame from its agent.")
    agent_version = models.CharField(max_length=32, blank=True)
    driver_version = models.CharField(max_length=32, blank=True)

    class Meta:
        ordering = ["hostname"]
        indexes = [models.Index(fields=["accelerator_type", "state"], name="node_type_state_idx")]
        constraints = [
            models.CheckConstraint(condition=models.Q(state__in=NodeState.values), name="node_state_valid"),
        ]

    def __str__(self) -> str:
        return self.hostname


class NodeStateChange(models.Model):
    """History of lifecycle moves: who moved a node, from what, to what, and why."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="state_changes")
    from_state = models.CharField(max_length=16, choices=NodeState.choices)
    to_state = models.CharField(max_length=16, choices=NodeState.choices)
    # Who moved it, as text ("ops@example.com", "heartbeat sweeper"): kept readable after users go.
    actor = models.CharField(max_length=254, blank=True)
    reason = models.CharField(max_length=200, blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.node}: {self.from_state} → {self.to_state}"


class Gpu(models.Model):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField()
    uuid = models.CharField("UUID", max_length=64, unique=True)
    accelerator_type = models.ForeignKey(AcceleratorType, on_delete=models.PROTECT, related_name="gpus")
    memory_mib = models.PositiveIntegerField("memory (MiB)")

    class Meta:
        ordering = ["node", "index"]
        verbose_name = "GPU"
        constraints = [
            models.UniqueConstraint(fields=["node", "index"], name="gpu_index_unique_per_node"),
        ]

    def __str__(self) -> str:
        return f"{self.node.hostname}#{self.index}"
