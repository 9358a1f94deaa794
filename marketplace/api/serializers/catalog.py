"""Serializers of the catalog: offers, their term discounts and their availability."""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.choices import OfferKind
from marketplace.models import Image, Offer, OfferTermDiscount
from provisioning.api.serializers import AcceleratorTypeSerializer, SiteSummarySerializer


class TermDiscountSerializer(serializers.ModelSerializer):
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4, read_only=True)

    class Meta:
        model = OfferTermDiscount
        fields = ["term_months", "percent_off", "price_per_gpu_hour"]


class AvailabilitySerializer(serializers.Serializer):
    total_instances = serializers.IntegerField(
        help_text="Instances of this size on nodes that can take work (a whole node is one; a rack offer's: its nodes)."
    )
    available_instances = serializers.IntegerField(help_text="Those whose GPUs no reservation holds now.")
    total_nodes = serializers.IntegerField()
    available_nodes = serializers.IntegerField()
    total_racks = serializers.IntegerField()
    available_racks = serializers.IntegerField()


class OfferSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="__str__", read_only=True)
    kind = serializers.ChoiceField(
        choices=OfferKind.choices,
        read_only=True,
        help_text="What one instance is: `slice` (gpus_per_instance of one node's GPUs), `node` (a whole node) "
        "or `rack` (every node of one rack).",
    )
    site = SiteSummarySerializer(read_only=True)
    accelerator_type = AcceleratorTypeSerializer(read_only=True)
    price_per_instance_hour = serializers.DecimalField(
        max_digits=12, decimal_places=4, read_only=True, help_text="price_per_gpu_hour × gpus_per_instance."
    )
    term_discounts = TermDiscountSerializer(many=True, read_only=True)
    availability = serializers.SerializerMethodField()

    class Meta:
        model = Offer
        fields = [
            "id",
            "name",
            "shape",
            "kind",
            "site",
            "accelerator_type",
            "gpus_per_instance",
            "gpus_per_node",
            "price_per_gpu_hour",
            "price_per_instance_hour",
            "term_discounts",
            "max_duration_hours",
            "availability",
        ]

    @extend_schema_field(AvailabilitySerializer)
    def get_availability(self, offer: Offer) -> dict:
        return AvailabilitySerializer(offer).data


class HourlyAvailabilitySerializer(serializers.Serializer):
    hour = serializers.DateTimeField()
    free = serializers.IntegerField(help_text="Instances (racks, for a rack offer) free for the whole hour.")
    total = serializers.IntegerField()
    free_gpus = serializers.IntegerField(help_text="The GPUs of those: free × gpus_per_instance (a rack's GPUs).")
    total_gpus = serializers.IntegerField()


class OfferAvailabilitySerializer(serializers.Serializer):
    offer = serializers.IntegerField()
    unit = serializers.ChoiceField(
        choices=["instances", "racks"], help_text="What `free` counts: instances (a whole node is one) or racks."
    )
    gpus_per_instance = serializers.IntegerField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    hours = HourlyAvailabilitySerializer(many=True)


class AvailabilityQuerySerializer(serializers.Serializer):
    start = serializers.DateTimeField(required=False, help_text="Default: this hour.")
    end = serializers.DateTimeField(required=False, help_text="Default: 24 hours after start; at most 14 days.")


class ImageSerializer(serializers.ModelSerializer):
    """What a node or slice boots into, and the steps its host driver runs to prepare it."""

    accelerator_types = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)
    default_for = serializers.SerializerMethodField(help_text="The accelerator types that get it when none is named.")
    steps = serializers.SerializerMethodField()

    class Meta:
        model = Image
        fields = ["slug", "name", "description", "accelerator_types", "default_for", "steps"]
        read_only_fields = fields

    def get_default_for(self, image: Image) -> list[str]:
        return sorted(default.accelerator_type.slug for default in image.defaults.all())

    def get_steps(self, image: Image) -> list[str]:
        return [step["name"] for step in image.steps]
