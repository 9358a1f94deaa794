"""Query filters of the REST API (django-filter), which the portal reuses: offers, reservations, endpoints."""

import django_filters
from django import forms
from django.db.models import F, Q

from marketplace.choices import OfferKind, OfferShape, ReservationState
from marketplace.models import Endpoint, EndpointState, Offer, Reservation
from marketplace.selectors.catalog import offer_filter
from provisioning.choices import Purpose, SiteKind, Vendor


class IntegerFilter(django_filters.NumberFilter):
    """A whole number (django-filter's NumberFilter takes decimals: ``1.5`` GPUs is refused, not empty)."""

    field_class = forms.IntegerField


# SQL for each kind (Offer.kind): a slice holds fewer GPUs than its node has.
KIND_FILTERS = {
    OfferKind.SLICE: Q(shape=OfferShape.NODE, gpus_per_instance__lt=F("gpus_per_node")),
    OfferKind.NODE: Q(shape=OfferShape.NODE, gpus_per_instance=F("gpus_per_node")),
    OfferKind.RACK: Q(shape=OfferShape.RACK),
}


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
    kind = django_filters.ChoiceFilter(
        choices=OfferKind.choices,
        method="filter_kind",
        empty_label="Any",
        help_text="What one instance is: a slice of a node, a whole node or a whole rack.",
    )
    gpus_per_instance = IntegerFilter(
        min_value=1, help_text="GPUs one instance holds, exactly (1, 2, 4, 8 for slices; a node's GPUs for a node)."
    )
    min_gpus = IntegerFilter(
        field_name="gpus_per_instance",
        lookup_expr="gte",
        min_value=1,
        help_text="Instances of at least this many GPUs (a rack offer's: those of one of its nodes).",
    )
    min_price = django_filters.NumberFilter(
        field_name="price_per_gpu_hour", lookup_expr="gte", help_text="Lowest on-demand price per GPU-hour."
    )
    max_price = django_filters.NumberFilter(
        field_name="price_per_gpu_hour", lookup_expr="lte", help_text="Highest on-demand price per GPU-hour."
    )
    available = django_filters.BooleanFilter(method="filter_available", help_text="Only offers with capacity free now.")
    ordering = django_filters.OrderingFilter(
        fields=(
            ("price_per_gpu_hour", "price"),
            ("gpus_per_instance", "gpus_per_instance"),
            ("available_instances", "available_instances"),
            ("available_nodes", "available_nodes"),
            ("id", "id"),
        )
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
            "kind",
            "gpus_per_instance",
            "min_gpus",
            "min_price",
            "max_price",
            "available",
        ]

    def filter_purpose(self, queryset, name, value: str):
        return queryset.filter(Q(accelerator_type__purpose=value) | Q(accelerator_type__purpose=Purpose.BOTH))

    def filter_kind(self, queryset, name, value: str):
        return queryset.filter(KIND_FILTERS[value])

    def filter_available(self, queryset, name, value):
        return offer_filter(queryset, available_only=True) if value else queryset


class ReservationFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=ReservationState.choices)

    class Meta:
        model = Reservation
        fields = ["state"]


class EndpointFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(
        choices=EndpointState.choices, help_text="Omitted: every endpoint but the deleted ones."
    )

    class Meta:
        model = Endpoint
        fields = ["state"]
