"""Read-only fleet endpoints that the catalog exposes to tenants: sites and accelerator types."""

import django_filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import viewsets

from console.kernel.api import error_responses
from provisioning.api.serializers import AcceleratorTypeSerializer, SiteSerializer
from provisioning.choices import Purpose, SiteKind, Vendor
from provisioning.models import AcceleratorType, Site
from provisioning.selectors.fleet import accelerator_type_list, site_list


class SiteFilter(django_filters.FilterSet):
    region = django_filters.CharFilter()
    kind = django_filters.ChoiceFilter(choices=SiteKind.choices)

    class Meta:
        model = Site
        fields = ["region", "kind"]


@extend_schema_view(
    list=extend_schema(summary="List sites", responses={200: SiteSerializer(many=True), **error_responses(400)}),
    retrieve=extend_schema(summary="A site", responses={200: SiteSerializer, **error_responses(404)}),
)
class SiteViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = SiteSerializer
    filterset_class = SiteFilter
    lookup_field = "slug"

    def get_queryset(self):
        return site_list()


class AcceleratorTypeFilter(django_filters.FilterSet):
    vendor = django_filters.ChoiceFilter(choices=Vendor.choices)
    purpose = django_filters.ChoiceFilter(choices=Purpose.choices)

    class Meta:
        model = AcceleratorType
        fields = ["vendor", "purpose"]


@extend_schema_view(
    list=extend_schema(
        summary="List accelerator types", responses={200: AcceleratorTypeSerializer(many=True), **error_responses(400)}
    ),
    retrieve=extend_schema(
        summary="An accelerator type", responses={200: AcceleratorTypeSerializer, **error_responses(404)}
    ),
)
class AcceleratorTypeViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = AcceleratorTypeSerializer
    filterset_class = AcceleratorTypeFilter
    lookup_field = "slug"

    def get_queryset(self):
        return accelerator_type_list()
