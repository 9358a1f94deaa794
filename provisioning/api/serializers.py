from rest_framework import serializers

from provisioning.models import AcceleratorType, Site


class AcceleratorTypeSerializer(serializers.ModelSerializer):
    class Meta:
        model = AcceleratorType
        fields = ["slug", "vendor", "model", "memory_gib", "tdp_watts", "interconnect", "purpose"]


class SiteSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = Site
        fields = ["slug", "name", "region", "kind", "location"]


class SiteSerializer(SiteSummarySerializer):
    rack_count = serializers.IntegerField(read_only=True)
    node_count = serializers.IntegerField(read_only=True)
    available_node_count = serializers.IntegerField(read_only=True)

    class Meta(SiteSummarySerializer.Meta):
        fields = [
            *SiteSummarySerializer.Meta.fields,
            "power_capacity_mw",
            "rack_count",
            "node_count",
            "available_node_count",
        ]
