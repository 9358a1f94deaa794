"""Serializers of inference endpoints: the served models, an endpoint made, rescaled and read with its
replicas, and what an OpenAI client needs to call it."""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.choices import ReplicaState
from marketplace.models import Endpoint, EndpointState, ModelTask, PlacementPreference, Replica, ServedModel
from marketplace.models.endpoints import MAX_REPLICAS
from marketplace.money import cents
from marketplace.selectors.endpoints import TIMELINE_MAX_MINUTES, endpoint_cost, endpoint_traffic_summary
from marketplace.services.endpoints.lifecycle import endpoint_base_url


class ServedModelSerializer(serializers.ModelSerializer):
    task = serializers.ChoiceField(choices=ModelTask.choices)
    accelerator_types = serializers.SlugRelatedField(
        slug_field="slug", many=True, read_only=True, help_text="Accelerator types a replica of it runs on."
    )

    class Meta:
        model = ServedModel
        fields = ["slug", "name", "task", "description", "dimensions", "gpus_per_replica", "accelerator_types"]
        read_only_fields = fields


class ServedModelRefSerializer(serializers.Serializer):
    slug = serializers.SlugField()
    name = serializers.CharField()


class ReplicaSerializer(serializers.ModelSerializer):
    """One model server of the endpoint, on the slice its reservation holds. Its address is the
    gateway's to know, not the tenant's: clients call the endpoint's base_url."""

    state = serializers.ChoiceField(choices=ReplicaState.choices)
    reservation = serializers.UUIDField(source="reservation_id")
    site = serializers.SerializerMethodField()
    node = serializers.SerializerMethodField(help_text="The node's hostname.")
    gpus = serializers.SerializerMethodField(help_text="The node's GPU indices the replica holds.")
    gpu_label = serializers.SerializerMethodField(help_text="The same for people: `GPU 3` or `GPUs 4–7`.")

    class Meta:
        model = Replica
        fields = ["id", "state", "site", "node", "gpus", "gpu_label", "ready_at", "reservation", "created_at"]
        read_only_fields = fields

    def _allocation(self, replica: Replica):
        allocations = list(replica.reservation.allocations.all())  # a slice: one node's GPUs
        return allocations[0] if allocations else None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_site(self, replica: Replica) -> str | None:
        allocation = self._allocation(replica)
        return allocation.node.rack.site.slug if allocation else None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_node(self, replica: Replica) -> str | None:
        allocation = self._allocation(replica)
        return allocation.node.hostname if allocation else None

    @extend_schema_field(serializers.ListField(child=serializers.IntegerField(min_value=0)))
    def get_gpus(self, replica: Replica) -> list[int]:
        allocation = self._allocation(replica)
        return list(allocation.gpu_indices) if allocation else []

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_gpu_label(self, replica: Replica) -> str | None:
        allocation = self._allocation(replica)
        return allocation.gpu_label if allocation else None


class OpenAIUsageSerializer(serializers.Serializer):
    base_url = serializers.URLField(help_text="What an OpenAI client takes as base_url.")
    model = serializers.CharField(help_text="What it sends as `model`: the endpoint's name.")


class EndpointSerializer(serializers.ModelSerializer):
    model = ServedModelRefSerializer(read_only=True)
    accelerator_types = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)
    pinned_sites = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)
    placement = serializers.ChoiceField(choices=PlacementPreference.choices)
    state = serializers.ChoiceField(choices=EndpointState.choices)
    base_url = serializers.SerializerMethodField(help_text="The gateway's OpenAI-compatible URL, ending in /v1.")
    openai = serializers.SerializerMethodField(help_text="How an OpenAI client calls it.")
    replica_count = serializers.IntegerField(source="live_replica_count", help_text="Replicas not stopped.")
    ready_replica_count = serializers.IntegerField(help_text="Replicas answering.")
    replicas = serializers.SerializerMethodField(help_text="Its replicas not stopped, oldest first.")

    class Meta:
        model = Endpoint
        fields = [
            "id",
            "name",
            "model",
            "accelerator_types",
            "region",
            "placement",
            "pinned_sites",
            "min_replicas",
            "max_replicas",
            "target_concurrency",
            "state",
            "state_changed_at",
            "base_url",
            "openai",
            "replica_count",
            "ready_replica_count",
            "replicas",
            "created_at",
        ]
        read_only_fields = fields

    def get_base_url(self, endpoint: Endpoint) -> str:
        return endpoint_base_url(endpoint)

    @extend_schema_field(OpenAIUsageSerializer)
    def get_openai(self, endpoint: Endpoint) -> dict:
        return {"base_url": endpoint_base_url(endpoint), "model": endpoint.name}

    @extend_schema_field(ReplicaSerializer(many=True))
    def get_replicas(self, endpoint: Endpoint) -> list[dict]:
        live = endpoint.current_replicas
        return ReplicaSerializer(live, many=True).data


def _slugs(help_text: str) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.SlugField(max_length=64), required=False, max_length=32, help_text=help_text
    )


class EndpointCreateSerializer(serializers.Serializer):
    name = serializers.SlugField(max_length=64, help_text="What clients send as `model`; unique in the organization.")
    model = serializers.SlugField(max_length=64, help_text="A served model's slug (GET /api/v1/models/).")
    region = serializers.CharField(max_length=32, help_text="Where the endpoint's users are, e.g. eu-central.")
    placement = serializers.ChoiceField(choices=PlacementPreference.choices, default=PlacementPreference.NEAREST)
    accelerator_types = _slugs("Allowed accelerator types (slugs); none: any the model runs on.")
    pinned_sites = _slugs("Site slugs, for pinned placement only.")
    min_replicas = serializers.IntegerField(
        min_value=0, max_value=MAX_REPLICAS, default=1, help_text="0: scale to zero when idle."
    )
    max_replicas = serializers.IntegerField(min_value=1, max_value=MAX_REPLICAS, default=1)
    target_concurrency = serializers.IntegerField(
        min_value=1, max_value=1000, default=8, help_text="Requests in flight per replica."
    )


class EndpointScaleSerializer(serializers.Serializer):
    """New scaling bounds; what is omitted stays."""

    min_replicas = serializers.IntegerField(min_value=0, max_value=MAX_REPLICAS, required=False)
    max_replicas = serializers.IntegerField(min_value=1, max_value=MAX_REPLICAS, required=False)
    target_concurrency = serializers.IntegerField(min_value=1, max_value=1000, required=False)


class EndpointTrafficSerializer(serializers.Serializer):
    requests = serializers.IntegerField(help_text="Requests the gateways answered for it, every outcome.")
    ok = serializers.IntegerField(help_text="Answered (2xx).")
    client_errors = serializers.IntegerField(help_text="Refused (4xx): a bad request, too large, ...")
    server_errors = serializers.IntegerField(help_text="Failed (5xx): no replica ready, none answering.")
    input_tokens = serializers.IntegerField()
    mean_ms = serializers.FloatField(allow_null=True)
    p50_ms = serializers.FloatField(allow_null=True, help_text="From the gateways' latency buckets.")
    p99_ms = serializers.FloatField(allow_null=True)


class EndpointDetailSerializer(EndpointSerializer):
    """One endpoint, with what it answered and cost so far (a query or two more than a list row)."""

    traffic = serializers.SerializerMethodField(help_text="What the gateways answered so far (collected every few s).")
    cost = serializers.SerializerMethodField(help_text="Its replicas' rated usage so far, in USD.")

    class Meta(EndpointSerializer.Meta):
        fields = [*EndpointSerializer.Meta.fields, "traffic", "cost"]
        read_only_fields = fields

    @extend_schema_field(EndpointTrafficSerializer)
    def get_traffic(self, endpoint: Endpoint) -> dict:
        return endpoint_traffic_summary(endpoint=endpoint)

    @extend_schema_field(serializers.DecimalField(max_digits=14, decimal_places=2))
    def get_cost(self, endpoint: Endpoint) -> str:
        return str(cents(endpoint_cost(endpoint=endpoint)))


# --- The last hour of an endpoint (GET /api/v1/endpoints/{id}/metrics/) --------------------------------


class EndpointMetricsQuerySerializer(serializers.Serializer):
    minutes = serializers.IntegerField(
        min_value=1,
        max_value=TIMELINE_MAX_MINUTES,
        default=60,
        help_text="How many minutes back, the current one included.",
    )


class EndpointMinuteSerializer(EndpointTrafficSerializer):
    minute = serializers.DateTimeField(
        help_text="The minute's start (UTC); requests count in the minute they finished."
    )
    seconds = serializers.FloatField(help_text="Seconds of the minute counted: 60, or those gone in the current one.")
    requests_per_s = serializers.FloatField()
    errors_per_s = serializers.FloatField(help_text="Refused and failed requests per second.")
    in_flight = serializers.FloatField(
        help_text="Average requests in flight over the minute: their latencies at the gateway over its seconds."
    )


class EndpointSecondsSerializer(serializers.Serializer):
    start = serializers.DateTimeField(help_text="The first second's start; one value a second from it, oldest first.")
    in_flight = serializers.ListField(child=serializers.FloatField(), help_text="Average requests in flight.")
    arrivals = serializers.ListField(child=serializers.IntegerField(), help_text="Requests that arrived.")


class EndpointLiveSerializer(serializers.Serializer):
    in_flight = serializers.FloatField(help_text="Requests in flight now (the last 5 s' average, all gateways).")
    requests_per_s = serializers.FloatField(help_text="Requests arriving per second (the last 10 s).")
    seconds = EndpointSecondsSerializer(help_text="The last 5 minutes, per second, as the gateways report them.")


class ReplicaStepSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    ready = serializers.IntegerField(help_text="Replicas answering.")
    running = serializers.IntegerField(help_text="Replicas holding their slice: starting, answering or draining.")
    asked = serializers.IntegerField(help_text="Replicas the autoscaler asked for.")


class EndpointReplicasTimelineSerializer(serializers.Serializer):
    ready = serializers.IntegerField()
    running = serializers.IntegerField()
    target = serializers.IntegerField(help_text="Replicas it should run now: the autoscaler's ask within the bounds.")
    min = serializers.IntegerField()
    max = serializers.IntegerField()
    reservations = serializers.ListField(
        child=serializers.UUIDField(),
        help_text="The reservations of its replicas not stopped (their events move them).",
    )
    steps = ReplicaStepSerializer(many=True, help_text="At the window's start, at each change, and now.")


class ScaleEventSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    from_replicas = serializers.IntegerField()
    to_replicas = serializers.IntegerField()
    reason = serializers.CharField()
    panic = serializers.BooleanField(help_text="The autoscaler was in panic mode (a burst: no scaling down).")


class ColdStartSerializer(serializers.Serializer):
    replica = serializers.UUIDField()
    created_at = serializers.DateTimeField(help_text="Placed (its slice reserved).")
    ready_at = serializers.DateTimeField(allow_null=True, help_text="Answering.")
    seconds = serializers.FloatField(
        allow_null=True, help_text="Placed to answering; while starting, so far; null when it stopped before answering."
    )
    outcome = serializers.ChoiceField(choices=["ready", "starting", "failed"])
    state = serializers.ChoiceField(choices=ReplicaState.choices)
    reason = serializers.CharField(allow_blank=True, help_text="Why it stopped, when it never answered.")


class GpuUtilizationPointSerializer(serializers.Serializer):
    minute = serializers.DateTimeField()
    util = serializers.FloatField(help_text="Mean utilization of its GPUs over the minute (%).")


class GpuUtilizationLatestSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    util = serializers.FloatField(help_text="Mean utilization of its GPUs in the latest reading (%).")


class ReplicaGpuUtilizationSerializer(serializers.Serializer):
    replica = serializers.UUIDField()
    node = serializers.CharField(allow_null=True, help_text="The node's hostname.")
    gpu_label = serializers.CharField(allow_null=True)
    minutes = GpuUtilizationPointSerializer(many=True, help_text="Whole minutes its reservation was active only.")
    latest = GpuUtilizationLatestSerializer(allow_null=True)


class EndpointCostNowSerializer(serializers.Serializer):
    so_far = serializers.DecimalField(
        max_digits=24,
        decimal_places=10,
        help_text="Its replicas' slices at their price for the time they were active, rated or not yet (USD).",
    )
    per_hour = serializers.DecimalField(
        max_digits=14, decimal_places=4, help_text="What the slices active now cost an hour."
    )
    as_of = serializers.DateTimeField()


class EndpointMetricsSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=EndpointState.choices)
    now = serializers.DateTimeField()
    since = serializers.DateTimeField(help_text="The first minute's start.")
    minutes = EndpointMinuteSerializer(many=True, help_text="Every minute of the window, oldest first.")
    totals = EndpointTrafficSerializer(help_text="The window's requests and latency.")
    recent = EndpointTrafficSerializer(help_text="The last 5 minutes' requests and latency.")
    live = EndpointLiveSerializer(allow_null=True, help_text="null when the gateways' counts cannot be read now.")
    replicas = EndpointReplicasTimelineSerializer()
    scale_events = ScaleEventSerializer(many=True, help_text="The autoscaler's changed asks in the window.")
    cold_starts = ColdStartSerializer(many=True, help_text="Replicas placed in the window, newest first.")
    gpus = ReplicaGpuUtilizationSerializer(many=True, help_text="Its replicas' GPUs, sealed in time and per GPU.")
    cost = EndpointCostNowSerializer()
