"""Serializers of the catalog: offers, their term discounts and their availability."""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.models import Offer, OfferTermDiscount
from provisioning.api.serializers import AcceleratorTypeSerializer, SiteSummarySerializer


class TermDiscountSerializer(serializers.ModelSerializer):
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4, read_only=True)

    class Meta:
        model = OfferTermDiscount
        fields = ["term_months", "percent_off", "price_per_gpu_hour"]


class AvailabilitySerializer(serializers.Serializer):
    total_nodes = serializers.IntegerField()
    available_nodes = serializers.IntegerField()
    total_racks = serializers.IntegerField()
    available_racks = serializers.IntegerField()


class OfferSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="__str__", read_only=True)
    site = SiteSummarySerializer(read_only=True)
    accelerator_type = AcceleratorTypeSerializer(read_only=True)
    price_per_instance_hour = serializers.DecimalField(max_digits=12, decimal_places=4, read_only=True)
    term_discounts = TermDiscountSerializer(many=True, read_only=True)
    availability = serializers.SerializerMethodField()

    class Meta:
        model = Offer
        fields = [
            "id",
            "name",
            "shape",
            "site",
            "accelerator_type",
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
    free = serializers.IntegerField()
    total = serializers.IntegerField()


class OfferAvailabilitySerializer(serializers.Serializer):
    offer = serializers.IntegerField()
    unit = serializers.ChoiceField(choices=["nodes", "racks"])
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    hours = HourlyAvailabilitySerializer(many=True)


class AvailabilityQuerySerializer(serializers.Serializer):
    start = serializers.DateTimeField(required=False, help_text="Default: this hour.")
    end = serializers.DateTimeField(required=False, help_text="Default: 24 hours after start; at most 14 days.")
