"""Operators' view of tenants: people, organizations, memberships, API keys and quotas. Every write
goes through marketplace.services.tenancy (console.kernel.admin.ServiceAdmin)."""

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import Count, Q

from console.kernel.admin import ReadOnlyAdmin, ServiceAdmin, ServiceInline, values
from console.kernel.admin_columns import annotated_column
from marketplace.admin.billing import OrganizationBillingMixin
from marketplace.models import (
    ApiKey,
    Membership,
    Organization,
    Quota,
    SshKey,
    User,
)
from marketplace.services.tenancy.api_keys import api_keys_revoke_as_operator
from marketplace.services.tenancy.members import (
    membership_remove,
    membership_set,
    organization_create,
    organization_delete,
    organization_update,
    quota_remove,
    quota_set,
)
from marketplace.services.tenancy.ssh_keys import ssh_keys_remove_as_operator


class MembershipInline(ServiceInline, admin.TabularInline):
    """Memberships change through the tenancy services: a removal closes the member's live feeds."""

    model = Membership
    extra = 0
    autocomplete_fields = ["user"]
    fields = ["user", "role", "created_at"]
    readonly_fields = ["created_at"]

    def create(self, request, parent, form):
        return membership_set(organization=parent, user=form.cleaned_data["user"], role=form.cleaned_data["role"])

    def update(self, request, obj, form):
        user = form.cleaned_data["user"]
        if user != obj.user:  # the row now names someone else: the one it named is out
            membership_remove(organization=obj.organization, user=obj.user)
        return membership_set(organization=obj.organization, user=user, role=form.cleaned_data["role"])

    def delete(self, request, obj):
        membership_remove(organization=obj.organization, user=obj.user)


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


class QuotaInline(ServiceInline, admin.TabularInline):
    model = Quota
    extra = 0

    def create(self, request, parent, form):
        data = form.cleaned_data
        return quota_set(organization=parent, accelerator_type=data["accelerator_type"], max_gpus=data["max_gpus"])

    def update(self, request, obj, form):
        data = form.cleaned_data
        if data["accelerator_type"] != obj.accelerator_type:
            quota_remove(organization=obj.organization, accelerator_type=obj.accelerator_type)
        return quota_set(
            organization=obj.organization, accelerator_type=data["accelerator_type"], max_gpus=data["max_gpus"]
        )

    def delete(self, request, obj):
        quota_remove(organization=obj.organization, accelerator_type=obj.accelerator_type)


@admin.register(Organization)
class OrganizationAdmin(OrganizationBillingMixin, ServiceAdmin):
    list_display = ["name", "slug", "member_total", "active_key_total", "created_at"]
    search_fields = ["name", "slug", "memberships__user__email"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["id", "created_at", "balance_display"]
    inlines = [MembershipInline, ApiKeyInline, QuotaInline]

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

    def create(self, request, form):
        # Its members come from the inline below, each through membership_set.
        return organization_create(name=form.cleaned_data["name"], slug=form.cleaned_data["slug"], owner=None)

    def update(self, request, obj, form):
        return organization_update(organization=obj, **values(obj, form, ["name", "slug"]))

    def delete(self, request, obj):
        organization_delete(organization=obj)


@admin.register(Membership)
class MembershipAdmin(ServiceAdmin):
    list_display = ["user", "organization", "role", "created_at"]
    list_filter = ["role", "organization"]
    search_fields = ["user__email", "organization__name", "organization__slug"]
    autocomplete_fields = ["user", "organization"]
    list_select_related = ["user", "organization"]

    def get_readonly_fields(self, request, obj=None):
        # A membership is one user in one organization; another pair is another membership.
        return ["user", "organization"] if obj is not None else []

    def create(self, request, form):
        data = form.cleaned_data
        return membership_set(organization=data["organization"], user=data["user"], role=data["role"])

    def update(self, request, obj, form):
        return membership_set(organization=obj.organization, user=obj.user, role=form.cleaned_data["role"])

    def delete(self, request, obj):
        membership_remove(organization=obj.organization, user=obj.user)


@admin.register(SshKey)
class SshKeyAdmin(ReadOnlyAdmin):
    """Keys are added by members (portal, API); operators look, and remove one (a leaked key) from every
    reservation it lets into."""

    list_display = ["name", "fingerprint", "key_type", "bits", "organization", "owner", "created_at"]
    list_filter = ["key_type", "organization"]
    search_fields = ["name", "fingerprint", "organization__name", "owner__email"]
    list_select_related = ["organization", "owner"]
    readonly_fields = ["id", "organization", "owner", "name", "key_type", "bits", "public_key", "fingerprint"]
    actions = ["remove"]

    def has_remove_permission(self, request):
        return request.user.has_perm("marketplace.delete_sshkey")

    @admin.action(description="Remove selected keys (from every reservation too)", permissions=["remove"])
    def remove(self, request, queryset):
        count = ssh_keys_remove_as_operator(keys=queryset, actor=request.user.email)
        self.message_user(request, f"Removed {count} key(s).", messages.SUCCESS)


@admin.register(ApiKey)
class ApiKeyAdmin(ReadOnlyAdmin):
    """Keys are made by members (portal, API) or `manage.py create_api_key`, and revoked (with the keys
    made from them), never edited or deleted."""

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

    def has_revoke_permission(self, request):
        return request.user.has_perm("marketplace.change_apikey")

    @admin.action(description="Revoke selected keys", permissions=["revoke"])
    def revoke(self, request, queryset):
        count = api_keys_revoke_as_operator(keys=queryset, actor=request.user.email)
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)


@admin.register(Quota)
class QuotaAdmin(ServiceAdmin):
    list_display = ["organization", "accelerator_type", "max_gpus"]
    list_filter = ["accelerator_type"]
    search_fields = ["organization__name", "organization__slug"]
    autocomplete_fields = ["organization"]
    list_editable = ["max_gpus"]
    list_select_related = ["organization", "accelerator_type"]

    def get_readonly_fields(self, request, obj=None):
        # A quota is one tenant's limit on one type; another pair is another quota.
        return ["organization", "accelerator_type"] if obj is not None else []

    def create(self, request, form):
        return quota_set(**values(None, form, ["organization", "accelerator_type", "max_gpus"]))

    def update(self, request, obj, form):
        return quota_set(
            organization=obj.organization, accelerator_type=obj.accelerator_type, max_gpus=form.cleaned_data["max_gpus"]
        )

    def delete(self, request, obj):
        quota_remove(organization=obj.organization, accelerator_type=obj.accelerator_type)
