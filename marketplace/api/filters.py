"""Query filters of the REST API (django-filter), which the portal reuses: offers and reservations."""

import django_filters
from django.db.models import Q

from marketplace.choices import OfferShape, ReservationState
from marketplace.models import Offer, Reservation
from marketplace.selectors.catalog import offer_filter
from provisioning.choices import Purpose, SiteKind, Vendor


class OfferFilter(django_filters.FilterSet):
    accelerator = django_filters.CharFilter(
        field_name="accelerator_type__slug", help_text="Accelerator type slug, e.g. h100-sxm-80gb."
    )
    vendor = django_filters.ChoiceFilter(
        field_name="accelerator_type__vendor", choices=Vendor.choices, empty_label="Any"
    )
    purpose = django_filters.ChoiceFilter(
        field_name="accelerator_type__purpose",
        choices=[(Purpose.TRAINING, "Training"), (Purpose.INFERENCE, "Inference")],
        method="filter_purpose",
        empty_label="Any",
        help_text="Types made for this purpose, including those made for both.",
    )
    site = django_filters.CharFilter(field_name="site__slug", help_text="Site slug.")
    region = django_filters.CharFilter(field_name="site__region")
    site_kind = django_filters.ChoiceFilter(field_name="site__kind", choices=SiteKind.choices, empty_label="Any")
    shape = django_filters.ChoiceFilter(choices=OfferShape.choices, empty_label="Any")
    min_price = django_filters.NumberFilter(
        field_name="price_per_gpu_hour", lookup_expr="gte", help_text="Lowest on-demand price per GPU-hour."
    )
    max_price = django_filters.NumberFilter(
        field_name="price_per_gpu_hour", lookup_expr="lte", help_text="Highest on-demand price per GPU-hour."
    )
    available = django_filters.BooleanFilter(method="filter_available", help_text="Only offers with capacity free now.")
    ordering = django_filters.OrderingFilter(
        fields=(("price_per_gpu_hour", "price"), ("available_nodes", "available_nodes"), ("id", "id"))
    )

    class Meta:
        model = Offer
        fields = [
            "accelerator",
            "vendor",
            "purpose",
            "site",
            "region",
            "site_kind",
            "shape",
            "min_price",
            "max_price",
            "available",
        ]

    def filter_purpose(self, queryset, name, value: str):
        return queryset.filter(Q(accelerator_type__purpose=value) | Q(accelerator_type__purpose=Purpose.BOTH))

    def filter_available(self, queryset, name, value):
        return offer_filter(queryset, available_only=True) if value else queryset


class ReservationFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=ReservationState.choices)

    class Meta:
        model = Reservation
        fields = ["state"]
