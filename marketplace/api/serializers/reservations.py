"""Serializers of reservations: made, extended and read, with their price, progress and the telemetry of their GPUs."""

from decimal import Decimal

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.api.fields import MoneyField
from marketplace.choices import AccessStatus, OfferKind, TermMonths
from marketplace.models import Reservation
from marketplace.selectors.access import reservation_access
from marketplace.selectors.billing import reservation_cost
from marketplace.selectors.reservations import reservation_billed, reservation_energy_kwh, reservation_progress
from marketplace.services.reservations.lifecycle import MAX_DURATION_HOURS
from provisioning.choices import CommandKind, CommandState


class AllocationSerializer(serializers.Serializer):
    """The GPUs of one node a reservation holds: all of them for a whole node or a rack, a slice's
    aligned range otherwise."""

    node = serializers.CharField(source="node.hostname")
    rack = serializers.CharField(source="node.rack.name")
    site = serializers.CharField(source="node.rack.site.slug")
    gpus = serializers.ListField(
        child=serializers.IntegerField(min_value=0),
        source="gpu_indices",
        help_text="The node's GPU indices held (as the node's agent numbers them), in order.",
    )
    gpu_label = serializers.CharField(help_text="The same for people: `GPU 3` or `GPUs 4–7`.")
    start = serializers.DateTimeField(source="period.lower")
    end = serializers.DateTimeField(source="period.upper")
    live = serializers.BooleanField()


class PriceSerializer(serializers.Serializer):
    currency = serializers.CharField()
    per_gpu_hour = serializers.DecimalField(max_digits=10, decimal_places=4)
    instances = serializers.IntegerField(help_text="Instances held: the quantity (one whole rack for a rack offer).")
    gpus_per_instance = serializers.IntegerField()
    per_instance_hour = serializers.DecimalField(
        max_digits=14, decimal_places=4, help_text="per_gpu_hour × gpus_per_instance."
    )
    gpu_count = serializers.IntegerField(help_text="GPUs held in all: instances × gpus_per_instance.")
    hours = serializers.DecimalField(max_digits=12, decimal_places=4)
    estimated_total = MoneyField()


class OfferRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField(source="__str__")
    kind = serializers.ChoiceField(choices=OfferKind.choices)
    gpus_per_instance = serializers.IntegerField()


class NodeAccessSerializer(serializers.Serializer):
    node = serializers.CharField()
    ready = serializers.BooleanField(
        help_text="Its SSH server is up; until then host, port, user and command are null."
    )
    host = serializers.CharField(allow_null=True)
    port = serializers.IntegerField(allow_null=True)
    user = serializers.CharField(allow_null=True)
    command = serializers.CharField(allow_null=True, help_text="`ssh -p <port> <user>@<host>`, to copy.")
    host_key = serializers.CharField(
        allow_null=True, help_text="The SHA256 fingerprint of its SSH server's host key, to check on first connect."
    )
    message = serializers.CharField()


class InstalledKeySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    fingerprint = serializers.CharField()
    owner = serializers.EmailField(allow_null=True, help_text="Null: shared by the organization.")


class ImageRefSerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()


class AccessSerializer(serializers.Serializer):
    """How to get into a reservation (docs/access.md)."""

    status = serializers.ChoiceField(
        choices=AccessStatus.choices,
        help_text="none: no SSH access (an endpoint's replica); waiting: not set up yet; ready; ended.",
    )
    message = serializers.CharField()
    image = ImageRefSerializer(allow_null=True)
    keys = InstalledKeySerializer(many=True, help_text="The keys its SSH access lets in.")
    nodes = NodeAccessSerializer(many=True, help_text="Per node, once provisioning has started.")


class ReservationSerializer(serializers.ModelSerializer):
    offer = OfferRefSerializer(read_only=True)
    start = serializers.DateTimeField(source="period.lower", read_only=True)
    end = serializers.DateTimeField(source="period.upper", read_only=True)
    rack = serializers.CharField(source="rack.name", allow_null=True, read_only=True)
    price = serializers.SerializerMethodField()
    allocations = AllocationSerializer(many=True, read_only=True)
    created_by = serializers.EmailField(source="created_by.email", allow_null=True, read_only=True)
    image = serializers.CharField(
        source="image.slug", allow_null=True, read_only=True, help_text="What its nodes boot into (GET /images/)."
    )
    ended_at = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="When it really ended: the end of its active time (release, cancel or its end), or, never "
        "active, when it was cancelled or failed. Null while it has not ended. `end` stays the booked end.",
    )
    billed = serializers.SerializerMethodField(
        help_text="What its rated usage has cost, in USD with cents, as a string: final once it is finished "
        "(completed, cancelled, failed), growing each rating run while active. Null while nothing is rated "
        "(never active, or not yet rated). Compare `price.estimated_total`, the booked window's estimate."
    )

    class Meta:
        model = Reservation
        fields = [
            "id",
            "offer",
            "shape",
            "quantity",
            "rack",
            "node_count",
            "gpu_count",
            "start",
            "end",
            "ended_at",
            "billed",
            "state",
            "state_changed_at",
            "term_months",
            "price",
            "allocations",
            "image",
            "failure_reason",
            "idempotency_key",
            "created_by",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(PriceSerializer)
    def get_price(self, reservation: Reservation) -> dict:
        return PriceSerializer(price_of(reservation)).data

    @extend_schema_field(MoneyField(allow_null=True))
    def get_billed(self, reservation: Reservation) -> str | None:
        billed = reservation_billed(reservation=reservation)
        return None if billed is None else MoneyField().to_representation(billed)


def price_of(item) -> dict:
    """The price block of a reservation or a quote (both have the same attributes). An instance is a
    slice, a node or (for a rack offer, quantity 1) the whole rack, so its GPUs are the GPUs held over
    the quantity."""
    gpus_per_instance = item.gpu_count // item.quantity
    return {
        "currency": "USD",
        "per_gpu_hour": item.price_per_gpu_hour,
        "instances": item.quantity,
        "gpus_per_instance": gpus_per_instance,
        "per_instance_hour": item.price_per_gpu_hour * gpus_per_instance,
        "gpu_count": item.gpu_count,
        "hours": item.hours.quantize(Decimal("0.0001")),
        "estimated_total": item.estimated_cost,
    }


class QuoteSerializer(serializers.Serializer):
    """What a reservation would hold and cost (``reservation_check``), before it is made."""

    offer = OfferRefSerializer()
    quantity = serializers.IntegerField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    node_count = serializers.IntegerField()
    gpu_count = serializers.IntegerField()
    term_months = serializers.IntegerField(allow_null=True)
    price = serializers.SerializerMethodField()

    @extend_schema_field(PriceSerializer)
    def get_price(self, quote) -> dict:
        return PriceSerializer(price_of(quote)).data


class NodeProgressSerializer(serializers.Serializer):
    node = serializers.CharField()
    kind = serializers.ChoiceField(choices=CommandKind.choices)
    state = serializers.ChoiceField(choices=CommandState.choices)
    step = serializers.CharField()
    percent = serializers.IntegerField()
    error = serializers.CharField()


class ReservationDetailSerializer(ReservationSerializer):
    """A reservation with what its nodes' agents last reported, and the energy it has drawn."""

    progress = serializers.SerializerMethodField()
    access = serializers.SerializerMethodField(help_text="How to connect to each node, once it is ready.")
    energy_kwh = serializers.SerializerMethodField()
    cost_so_far = serializers.SerializerMethodField(help_text="Its active seconds at its price, rated or not yet.")

    class Meta(ReservationSerializer.Meta):
        fields = [
            *ReservationSerializer.Meta.fields,
            "activated_at",
            "deactivated_at",
            "released_early_at",
            "cost_so_far",
            "energy_kwh",
            "progress",
            "access",
        ]
        read_only_fields = fields

    @extend_schema_field(AccessSerializer)
    def get_access(self, reservation: Reservation) -> dict:
        return AccessSerializer(reservation_access(reservation=reservation)).data

    @extend_schema_field(MoneyField())
    def get_cost_so_far(self, reservation: Reservation) -> str:
        return MoneyField().to_representation(reservation_cost(reservation=reservation))

    @extend_schema_field(serializers.DecimalField(max_digits=14, decimal_places=4, allow_null=True))
    def get_energy_kwh(self, reservation: Reservation):
        energy = reservation_energy_kwh(reservation=reservation)
        return None if energy is None else str(energy)

    @extend_schema_field(NodeProgressSerializer(many=True))
    def get_progress(self, reservation: Reservation) -> list[dict]:
        return reservation_progress(reservation=reservation)


MIN_HOURS = Decimal("0.02")


def hours_field(**kwargs) -> serializers.DecimalField:
    """A number of hours, bounded by value rather than by digits, and refused in hours: the service
    then holds it to what the offer allows (``reservation_quote``)."""
    return serializers.DecimalField(
        max_digits=None,
        decimal_places=None,
        min_value=MIN_HOURS,
        max_value=Decimal(MAX_DURATION_HOURS),
        required=False,
        error_messages={
            "invalid": "A number of hours, e.g. 1.5.",
            "max_string_length": "A number of hours, e.g. 1.5.",
            "min_value": f"At least {MIN_HOURS} hours.",
            "max_value": f"At most {MAX_DURATION_HOURS:,} hours.",
        },
        **kwargs,
    )


class ReservationCreateSerializer(serializers.Serializer):
    offer = serializers.IntegerField(min_value=1)
    quantity = serializers.IntegerField(
        min_value=1,
        max_value=10_000,
        default=1,
        help_text="Instances: whole nodes for a node offer; 1 for a slice (its GPUs of one node) and for a rack "
        "offer (one whole rack).",
    )
    start = serializers.DateTimeField(required=False, allow_null=True, help_text="Omit for now.")
    end = serializers.DateTimeField(required=False, help_text="Either end or duration_hours.")
    duration_hours = hours_field(help_text="Either end or this; at most the offer's max_duration_hours.")
    term_months = serializers.ChoiceField(
        choices=TermMonths.choices,
        required=False,
        help_text="A reserved term at the offer's discount for it, instead of end or duration_hours. "
        "A commitment: cancel it free before it starts; released early, the rest of the term is still billed.",
    )
    image = serializers.RegexField(
        r"^[a-z0-9][a-z0-9._-]*$",
        required=False,
        max_length=64,
        help_text="What its nodes boot into (GET /images/); omit for the default.",
    )
    ssh_keys = serializers.ListField(
        child=serializers.UUIDField(),
        required=False,
        max_length=32,
        help_text="Ids of the SSH keys to let in (yours or shared ones); omit for all of your own keys.",
    )

    def validate(self, attrs):
        given = [name for name in ("end", "duration_hours", "term_months") if name in attrs]
        if len(given) != 1:
            message = "Give exactly one of end, duration_hours (on demand) or term_months (a reserved term)."
            raise serializers.ValidationError({name: [message] for name in given or ["end"]})
        return attrs


class ReservationKeySerializer(serializers.Serializer):
    key = serializers.UUIDField(help_text="The id of an SSH key (GET /ssh-keys/) to let in.")


class ReservationExtendSerializer(serializers.Serializer):
    end = serializers.DateTimeField(required=False, help_text="The new end; either this or duration_hours.")
    duration_hours = hours_field(help_text="Hours to add to the current end; either this or end.")

    def validate(self, attrs):
        if ("end" in attrs) == ("duration_hours" in attrs):
            raise serializers.ValidationError({"end": ["Give either a new end or the hours to add (duration_hours)."]})
        return attrs


class RollupSerializer(serializers.Serializer):
    minute = serializers.DateTimeField()
    uuid = serializers.CharField()
    util_mean = serializers.FloatField(allow_null=True)
    util_max = serializers.FloatField(allow_null=True)
    power_mean = serializers.FloatField(allow_null=True)
    power_max = serializers.FloatField(allow_null=True)
    temp_max = serializers.FloatField(allow_null=True)
    fb_used_max = serializers.FloatField(allow_null=True, help_text="MiB")
    energy_j = serializers.FloatField()


class TelemetryGpuSerializer(serializers.Serializer):
    uuid = serializers.CharField()
    index = serializers.IntegerField()
    node = serializers.CharField()


class ReservationTelemetrySerializer(serializers.Serializer):
    gpus = TelemetryGpuSerializer(many=True)
    rollups = RollupSerializer(many=True)
    latest = serializers.ListField(
        child=serializers.DictField(),
        help_text="Each node's latest batch, as on the WebSocket /ws/reservations/{id}/ (dcgm-exporter field names).",
    )


class TelemetryQuerySerializer(serializers.Serializer):
    minutes = serializers.IntegerField(min_value=1, max_value=7 * 24 * 60, default=60)
