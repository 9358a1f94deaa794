"""Operators' view of the catalog: offers and their term discounts, written through
marketplace.services.catalog; prices through the billing price book (marketplace.admin.billing)."""

from django.contrib import admin

from console.kernel.admin import ServiceAdmin, ServiceInline, values
from marketplace.admin.billing import OfferPriceAddInline, OfferPriceHistoryInline
from marketplace.models import (
    Offer,
    OfferTermDiscount,
)
from marketplace.services.catalog.offers import (
    offer_create,
    offer_delete,
    offer_update,
    term_discount_remove,
    term_discount_set,
)

OFFER_FIELDS = [
    "site",
    "accelerator_type",
    "shape",
    "gpus_per_node",
    "gpus_per_instance",
    "max_duration_hours",
    "is_active",
]


class OfferTermDiscountInline(ServiceInline, admin.TabularInline):
    model = OfferTermDiscount
    extra = 0

    def create(self, request, parent, form):
        data = form.cleaned_data
        return term_discount_set(offer=parent, term_months=data["term_months"], percent_off=data["percent_off"])

    def update(self, request, obj, form):
        data = form.cleaned_data
        if data["term_months"] != obj.term_months:
            term_discount_remove(offer=obj.offer, term_months=obj.term_months)
        return term_discount_set(offer=obj.offer, term_months=data["term_months"], percent_off=data["percent_off"])

    def delete(self, request, obj):
        term_discount_remove(offer=obj.offer, term_months=obj.term_months)


@admin.register(Offer)
class OfferAdmin(ServiceAdmin):
    list_display = [
        "__str__",
        "site",
        "accelerator_type",
        "shape",
        "gpus_per_instance",
        "gpus_per_node",
        "price_per_gpu_hour",
        "is_active",
    ]
    list_filter = [
        "is_active",
        "shape",
        "gpus_per_instance",
        "site__kind",
        "site",
        "accelerator_type__vendor",
        "accelerator_type",
    ]
    search_fields = ["site__name", "accelerator_type__model", "accelerator_type__slug"]
    list_editable = ["is_active"]
    list_select_related = ["site", "accelerator_type"]
    inlines = [OfferPriceHistoryInline, OfferPriceAddInline, OfferTermDiscountInline]

    def get_readonly_fields(self, request, obj=None):
        # Once sold, the price changes only through the price book (effective-dated, below).
        return ["price_per_gpu_hour"] if obj is not None else []

    def create(self, request, form):
        return offer_create(
            price_per_gpu_hour=form.cleaned_data["price_per_gpu_hour"], **values(None, form, OFFER_FIELDS)
        )

    def update(self, request, obj, form):
        return offer_update(offer=obj, **values(obj, form, OFFER_FIELDS))

    def delete(self, request, obj):
        offer_delete(offer=obj)
