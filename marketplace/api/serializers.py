from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketplace.choices import Role
from marketplace.models import ApiKey, Offer, OfferTermDiscount
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
    price_per_node_hour = serializers.DecimalField(max_digits=12, decimal_places=4, read_only=True)
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
            "price_per_node_hour",
            "term_discounts",
            "max_duration_hours",
            "availability",
        ]

    @extend_schema_field(AvailabilitySerializer)
    def get_availability(self, offer: Offer) -> dict:
        return AvailabilitySerializer(offer).data


class ApiKeySerializer(serializers.ModelSerializer):
    created_by = serializers.EmailField(source="created_by.email", read_only=True)
    status = serializers.ChoiceField(choices=["active", "expired", "revoked"], read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "role",
            "prefix",
            "status",
            "created_by",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        ]
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    role = serializers.ChoiceField(
        choices=Role.choices,
        required=False,
        help_text="At most your own role. Defaults to member (viewer for viewers).",
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The full key. Shown only in this response; store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class MeSerializer(serializers.Serializer):
    email = serializers.EmailField()
    organization = serializers.DictField()
    role = serializers.ChoiceField(choices=Role.choices)
    api_key_prefix = serializers.CharField(allow_null=True)
