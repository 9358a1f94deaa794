"""Operators' view of tenants and the catalog."""

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import Count, Q

from console.kernel.admin_columns import annotated_column
from marketplace.billing_admin import (
    OfferPriceAddInline,
    OfferPriceHistoryInline,
    OrganizationBillingMixin,
    save_offer_prices,
)
from marketplace.models import (
    Allocation,
    ApiKey,
    Membership,
    Offer,
    OfferPrice,
    OfferTermDiscount,
    Organization,
    Quota,
    Reservation,
    User,
)
from marketplace.services.reservations.provisioning import reservation_force_release
from marketplace.services.tenancy.api_keys import api_keys_revoke_as_operator
from marketplace.services.tenancy.members import membership_remove, membership_set


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]
    fields = ["user", "role", "created_at"]
    readonly_fields = ["created_at"]


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ["name", "prefix", "role", "created_by", "created_at", "expires_at", "revoked_at", "last_used_at"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False  # keys are created by members (portal, API) or `manage.py create_api_key`


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    ordering = ["email"]
    list_display = ["email", "first_name", "last_name", "is_staff", "is_active", "last_login", "organization_total"]
    list_filter = ["is_staff", "is_superuser", "is_active"]
    search_fields = ["email", "first_name", "last_name"]
    fieldsets = [
        (None, {"fields": ["email", "password"]}),
        ("Personal info", {"fields": ["first_name", "last_name"]}),
        ("Permissions", {"fields": ["is_active", "is_staff", "is_superuser", "groups", "user_permissions"]}),
        ("Dates", {"fields": ["last_login", "date_joined"]}),
    ]
    add_fieldsets = [(None, {"classes": ["wide"], "fields": ["email", "password1", "password2"]})]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(organization_total=Count("memberships"))

    organization_total = annotated_column("organization_total", "organizations")


@admin.register(Organization)
class OrganizationAdmin(OrganizationBillingMixin, admin.ModelAdmin):
    list_display = ["name", "slug", "member_total", "active_key_total", "created_at"]
    search_fields = ["name", "slug", "memberships__user__email"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["id", "created_at", "balance_display"]
    inlines = [MembershipInline, ApiKeyInline]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                member_total=Count("memberships", distinct=True),
                active_key_total=Count("api_keys", filter=Q(api_keys__revoked_at__isnull=True), distinct=True),
            )
        )

    member_total = annotated_column("member_total", "members")
    active_key_total = annotated_column("active_key_total", "unrevoked keys")

    def save_formset(self, request, form, formset, change):
        if formset.model is not Membership:
            return super().save_formset(request, form, formset, change)
        # Memberships change through the tenancy services: a removal closes the member's live feeds.
        changed = formset.save(commit=False)
        for membership in formset.deleted_objects:
            membership_remove(organization=form.instance, user=membership.user)
        for membership, fields in formset.changed_objects:
            if "user" in fields:  # the row now names someone else: the one it named is out
                before = Membership.objects.select_related("user").get(pk=membership.pk)
                membership_remove(organization=form.instance, user=before.user)
        for membership in changed:
            membership_set(organization=form.instance, user=membership.user, role=membership.role)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "organization", "role", "created_at"]
    list_filter = ["role", "organization"]
    search_fields = ["user__email", "organization__name", "organization__slug"]
    autocomplete_fields = ["user", "organization"]
    list_select_related = ["user", "organization"]

    def get_readonly_fields(self, request, obj=None):
        # A membership is one user in one organization; another pair is another membership.
        return ["user", "organization"] if obj is not None else []

    def save_model(self, request, obj, form, change):
        obj.pk = membership_set(organization=obj.organization, user=obj.user, role=obj.role).pk

    def delete_model(self, request, obj):
        membership_remove(organization=obj.organization, user=obj.user)

    def delete_queryset(self, request, queryset):
        for membership in queryset.select_related("user", "organization"):
            membership_remove(organization=membership.organization, user=membership.user)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "prefix",
        "organization",
        "created_by",
        "role",
        "status",
        "created_at",
        "expires_at",
        "last_used_at",
    ]
    list_filter = ["role", "organization", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix", "organization__name", "created_by__email"]
    list_select_related = ["organization", "created_by"]
    readonly_fields = [
        "id",
        "organization",
        "created_by",
        "name",
        "role",
        "prefix",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    ]
    exclude = ["secret_hash"]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = api_keys_revoke_as_operator(keys=queryset, actor=request.user.email)
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)


class OfferTermDiscountInline(admin.TabularInline):
    model = OfferTermDiscount
    extra = 0


@admin.register(Offer)
class OfferAdmin(admin.ModelAdmin):
    list_display = ["__str__", "site", "accelerator_type", "shape", "gpus_per_node", "price_per_gpu_hour", "is_active"]
    list_filter = ["is_active", "shape", "site__kind", "site", "accelerator_type__vendor", "accelerator_type"]
    search_fields = ["site__name", "accelerator_type__model", "accelerator_type__slug"]
    list_editable = ["is_active"]
    list_select_related = ["site", "accelerator_type"]
    inlines = [OfferPriceHistoryInline, OfferPriceAddInline, OfferTermDiscountInline]

    def get_readonly_fields(self, request, obj=None):
        # Once sold, the price changes only through the price book (effective-dated, below).
        return ["price_per_gpu_hour"] if obj is not None else []

    def save_formset(self, request, form, formset, change):
        if formset.model is OfferPrice:
            save_offer_prices(request, formset)
        else:
            super().save_formset(request, form, formset, change)


class QuotaInline(admin.TabularInline):
    model = Quota
    extra = 0


OrganizationAdmin.inlines = [*OrganizationAdmin.inlines, QuotaInline]


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ["organization", "accelerator_type", "max_gpus"]
    list_filter = ["accelerator_type"]
    search_fields = ["organization__name", "organization__slug"]
    autocomplete_fields = ["organization"]
    list_editable = ["max_gpus"]


class AllocationInline(admin.TabularInline):
    model = Allocation
    extra = 0
    fields = ["node", "period", "live"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False  # allocations are made by placement only


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):
    list_display = [
        "short_id",
        "organization",
        "offer",
        "state",
        "node_count",
        "gpu_count",
        "start",
        "end",
        "price_per_gpu_hour",
        "created_at",
    ]
    list_filter = ["state", "shape", "offer__site", "offer__accelerator_type"]
    search_fields = [
        "id",
        "organization__name",
        "organization__slug",
        "created_by__email",
        "allocations__node__hostname",
    ]
    list_select_related = ["organization", "offer__site", "offer__accelerator_type"]
    readonly_fields = [f.name for f in Reservation._meta.fields]
    inlines = [AllocationInline]
    actions = ["force_release"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False  # tenants reserve through the portal or the API

    def has_delete_permission(self, request, obj=None):
        return False  # reservations are history; force-release frees the nodes

    @admin.display(description="reservation", ordering="id")
    def short_id(self, obj):
        return obj.id.hex[:8]

    @admin.display(ordering="period")
    def start(self, obj):
        return obj.start

    @admin.display()
    def end(self, obj):
        return obj.end

    @admin.action(description="Force-release selected reservations (free their nodes now)")
    def force_release(self, request, queryset):
        released = 0
        for reservation in queryset:
            if reservation.state in ("completed", "cancelled", "failed"):
                self.message_user(
                    request, f"{reservation.id.hex[:8]} is already {reservation.state}.", messages.WARNING
                )
                continue
            reservation_force_release(reservation=reservation, actor=request.user.email)
            released += 1
        if released:
            self.message_user(request, f"Released {released} reservation(s); their nodes are free.", messages.SUCCESS)


@admin.register(Allocation)
class AllocationAdmin(admin.ModelAdmin):
    list_display = ["node", "reservation", "period", "live"]
    list_filter = ["live", "node__rack__site"]
    search_fields = ["node__hostname", "reservation__id", "reservation__organization__name"]
    list_select_related = ["node", "reservation"]
    readonly_fields = ["reservation", "node", "period", "live"]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
