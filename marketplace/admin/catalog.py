"""Operators' view of the catalog: offers and their term discounts, and the images nodes boot into,
written through marketplace.services.catalog; prices through the billing price book (marketplace.admin.billing)."""

from django import forms
from django.contrib import admin

from console.kernel.admin import ServiceAdmin, ServiceInline, values
from marketplace.admin.billing import OfferPriceAddInline, OfferPriceHistoryInline
from marketplace.models import (
    Image,
    ImageDefault,
    Offer,
    OfferTermDiscount,
)
from marketplace.services.catalog.images import (
    IMAGE_FIELDS,
    image_default_remove,
    image_default_set,
    image_delete,
    image_save,
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


class ImageDefaultForm(forms.ModelForm):
    class Meta:
        model = ImageDefault
        fields = ["accelerator_type"]

    def validate_unique(self):
        """A type that has another default gets this one instead (image_default_set moves it)."""


class ImageDefaultInline(ServiceInline, admin.TabularInline):
    model = ImageDefault
    form = ImageDefaultForm
    extra = 0
    verbose_name = "default for"
    verbose_name_plural = "default for (reservations of these types that name no image get it)"

    def create(self, request, parent, form):
        return image_default_set(accelerator_type=form.cleaned_data["accelerator_type"], image=parent)

    def update(self, request, obj, form):
        if form.cleaned_data["accelerator_type"] != obj.accelerator_type:
            image_default_remove(accelerator_type=obj.accelerator_type)
        return image_default_set(accelerator_type=form.cleaned_data["accelerator_type"], image=obj.image)

    def delete(self, request, obj):
        image_default_remove(accelerator_type=obj.accelerator_type)


@admin.register(Image)
class ImageAdmin(ServiceAdmin):
    """The catalog of what nodes boot into. ``steps`` is a JSON list of ``{"name", "run", "seconds"}``
    (docs/access.md)."""

    list_display = ["name", "slug", "is_active", "created_at"]
    list_filter = ["is_active", "accelerator_types"]
    search_fields = ["name", "slug", "description"]
    list_editable = ["is_active"]
    filter_horizontal = ["accelerator_types"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [ImageDefaultInline]

    def create(self, request, form):
        data = form.cleaned_data
        return image_save(accelerator_types=data["accelerator_types"], **values(None, form, IMAGE_FIELDS))

    def update(self, request, obj, form):
        types = form.cleaned_data.get("accelerator_types", obj.accelerator_types.all())
        return image_save(image=obj, accelerator_types=types, **values(obj, form, IMAGE_FIELDS))

    def delete(self, request, obj):
        image_delete(image=obj)

    def save_related(self, request, form, formsets, change):
        # The service set the accelerator types; only the inline's rows are left (through their hooks).
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)
