"""Operators' view of the fleet. Every write goes through provisioning.services (fleet, agents): a
node's state changes only by a lifecycle move (node_transition), from its page or an action."""

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, Q
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse

from console.kernel.admin import ReadOnlyAdmin, ServiceAdmin, ServiceInline, values
from console.kernel.admin_columns import annotated_column
from console.kernel.errors import DomainError
from provisioning.choices import NodeState
from provisioning.models import (
    AcceleratorType,
    Gpu,
    Node,
    NodeCommand,
    NodeStateChange,
    Rack,
    RegionSiteLatency,
    Site,
)
from provisioning.selectors.fleet import node_gpu_occupancy
from provisioning.services.agents import bootstrap_token_create, node_delete, node_secret_revoke, node_secret_rotate
from provisioning.services.fleet import (
    accelerator_type_create,
    accelerator_type_delete,
    accelerator_type_update,
    node_enrol,
    node_transition,
    node_update,
    rack_create,
    rack_delete,
    rack_update,
    region_latency_delete,
    region_latency_set,
    region_latency_update,
    site_create,
    site_delete,
    site_update,
)

ACCELERATOR_FIELDS = ["slug", "vendor", "model", "memory_gib", "tdp_watts", "interconnect", "purpose", "device_name"]
SITE_FIELDS = ["slug", "name", "region", "kind", "location", "power_capacity_mw"]
RACK_FIELDS = ["site", "name", "power_budget_kw", "nvlink_domain_size"]
LATENCY_FIELDS = ["region", "site", "rtt_ms", "source"]


@admin.register(AcceleratorType)
class AcceleratorTypeAdmin(ServiceAdmin):
    list_display = ["slug", "vendor", "model", "memory_gib", "tdp_watts", "interconnect", "purpose", "gpu_total"]
    list_filter = ["vendor", "purpose"]
    search_fields = ["slug", "model", "device_name"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(gpu_total=Count("gpus"))

    gpu_total = annotated_column("gpu_total", "GPUs")

    def create(self, request, form):
        return accelerator_type_create(**values(None, form, ACCELERATOR_FIELDS))

    def update(self, request, obj, form):
        return accelerator_type_update(accelerator_type=obj, **values(obj, form, ACCELERATOR_FIELDS))

    def delete(self, request, obj):
        accelerator_type_delete(accelerator_type=obj)


class RackInline(ServiceInline, admin.TabularInline):
    model = Rack
    extra = 0
    fields = ["name", "nvlink_domain_size", "power_budget_kw"]
    show_change_link = True

    def create(self, request, parent, form):
        return rack_create(site=parent, **values(None, form, RACK_FIELDS[1:]))

    def update(self, request, obj, form):
        return rack_update(rack=obj, **values(obj, form, RACK_FIELDS))

    def delete(self, request, obj):
        rack_delete(rack=obj)


@admin.register(Site)
class SiteAdmin(ServiceAdmin):
    list_display = [
        "name",
        "slug",
        "region",
        "kind",
        "location",
        "power_capacity_mw",
        "rack_total",
        "node_total",
        "available_total",
    ]
    list_filter = ["kind", "region"]
    search_fields = ["name", "slug", "location", "region"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [RackInline]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                rack_total=Count("racks", distinct=True),
                node_total=Count("racks__nodes", distinct=True),
                available_total=Count("racks__nodes", filter=Q(racks__nodes__state=NodeState.AVAILABLE), distinct=True),
            )
        )

    rack_total = annotated_column("rack_total", "racks")
    node_total = annotated_column("node_total", "nodes")
    available_total = annotated_column("available_total", "available")

    def create(self, request, form):
        return site_create(**values(None, form, SITE_FIELDS))

    def update(self, request, obj, form):
        return site_update(site=obj, **values(obj, form, SITE_FIELDS))

    def delete(self, request, obj):
        site_delete(site=obj)


class NodeInline(ServiceInline, admin.TabularInline):
    model = Node
    extra = 0
    fields = ["hostname", "state", "accelerator_type", "gpu_count"]
    readonly_fields = ["state", "accelerator_type", "gpu_count"]
    show_change_link = True

    def create(self, request, parent, form):
        return node_enrol(rack=parent, hostname=form.cleaned_data["hostname"])

    def update(self, request, obj, form):
        return node_update(node=obj, rack=obj.rack, hostname=form.cleaned_data["hostname"])

    def delete(self, request, obj):
        node_delete(node=obj, actor=request.user.email)


@admin.register(Rack)
class RackAdmin(ServiceAdmin):
    list_display = ["__str__", "site", "nvlink_domain_size", "power_budget_kw", "node_total"]
    list_filter = ["site__kind", "site"]
    search_fields = ["name", "site__name", "site__slug"]
    list_select_related = ["site"]
    inlines = [NodeInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(node_total=Count("nodes"))

    node_total = annotated_column("node_total", "nodes")

    def create(self, request, form):
        return rack_create(**values(None, form, RACK_FIELDS))

    def update(self, request, obj, form):
        return rack_update(rack=obj, **values(obj, form, RACK_FIELDS))

    def delete(self, request, obj):
        rack_delete(rack=obj)


@admin.register(RegionSiteLatency)
class RegionSiteLatencyAdmin(ServiceAdmin):
    """The round trips an endpoint's ``nearest`` placement orders sites by: from each region's users to
    each site. A site with no row for a region comes after those with one."""

    list_display = ["region", "site", "site_kind", "rtt_ms", "source"]
    list_filter = ["region", "site__kind", "site"]
    search_fields = ["region", "site__name", "site__slug", "source"]
    list_select_related = ["site"]

    @admin.display(description="kind", ordering="site__kind")
    def site_kind(self, obj):
        return obj.site.get_kind_display()

    def create(self, request, form):
        return region_latency_set(**values(None, form, LATENCY_FIELDS))

    def update(self, request, obj, form):
        return region_latency_update(latency=obj, **values(obj, form, LATENCY_FIELDS))

    def delete(self, request, obj):
        region_latency_delete(latency=obj)


class GpuInline(admin.TabularInline):
    model = Gpu
    extra = 0
    fields = ["index", "uuid", "accelerator_type", "memory_mib"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False  # GPUs come from inventory reports (node_set_inventory), not by hand


class NodeStateChangeInline(admin.TabularInline):
    model = NodeStateChange
    extra = 0
    fields = ["at", "from_state", "to_state", "actor", "reason"]
    readonly_fields = fields
    can_delete = False
    max_num = 0
    ordering = ["-at"]


def _change_url(row) -> str:
    """The admin page of a row of any app (a holding's reservation), or "" if it has none."""
    if row is None or not hasattr(row, "_meta"):
        return ""
    try:
        return reverse(f"admin:{row._meta.app_label}_{row._meta.model_name}_change", args=[row.pk])
    except NoReverseMatch:
        return ""


def _move(target: str, verb: str):
    def action(modeladmin, request, queryset):
        moved, refused = 0, []
        for node in queryset:
            try:
                node_transition(node=node, target=target, actor=request.user.email, reason=f"admin: {verb}")
                moved += 1
            except DomainError as error:
                refused.append(f"{node.hostname}: {error.message}")
        if moved:
            modeladmin.message_user(request, f"{verb.capitalize()}: {moved} node(s) now {target}.", messages.SUCCESS)
        for line in refused:
            modeladmin.message_user(request, line, messages.ERROR)

    action.__name__ = f"move_to_{target}"
    return admin.action(description=f"{verb.capitalize()} selected nodes (→ {target})")(action)


class NodeCommandInline(admin.TabularInline):
    model = NodeCommand
    extra = 0
    fields = ["created_at", "kind", "state", "progress_step", "progress_percent", "deadline", "send_count", "error"]
    readonly_fields = fields
    can_delete = False
    max_num = 0
    ordering = ["-created_at"]


@admin.register(Node)
class NodeAdmin(ServiceAdmin):
    list_display = [
        "hostname",
        "state",
        "site",
        "rack",
        "accelerator_type",
        "gpu_count",
        "agent",
        "last_seen_at",
        "agent_version",
    ]
    list_filter = ["state", "rack__site", "rack__site__kind", "accelerator_type"]
    search_fields = ["hostname", "rack__name", "rack__site__name", "gpus__uuid"]
    list_select_related = ["rack__site", "accelerator_type"]
    readonly_fields = [
        "state_changed_at",
        "accelerator_type",
        "gpu_count",
        "created_at",
        "last_seen_at",
        "agent_version",
        "driver_version",
    ]
    fields = ["hostname", "rack", "state", *readonly_fields]
    inlines = [GpuInline, NodeStateChangeInline, NodeCommandInline]
    actions = [
        _move(NodeState.AVAILABLE, "mark available / recover"),
        _move(NodeState.DRAINING, "drain"),
        _move(NodeState.MAINTENANCE, "start maintenance"),
        _move(NodeState.OFFLINE, "mark offline"),
        "create_bootstrap_tokens",
        "rotate_secrets",
        "revoke_secrets",
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("credential")

    def get_readonly_fields(self, request, obj=None):
        # A new node is enrolling; a node's later states are lifecycle moves, chosen on its page.
        return ["state", *self.readonly_fields] if obj is None else [*self.readonly_fields, "gpu_occupancy"]

    def get_fieldsets(self, request, obj=None):
        fieldsets = [(None, {"fields": self.fields})]
        if obj is not None:
            fieldsets.append(("GPU occupancy", {"fields": ["gpu_occupancy"]}))
        return fieldsets

    @admin.display(description="held GPUs")
    def gpu_occupancy(self, obj):
        """Who holds which of its GPUs when, two days back and two weeks ahead (node_gpu_occupancy), each
        holding linked to its own admin page."""
        occupancy = node_gpu_occupancy(node=obj)
        for entry in occupancy["entries"]:
            entry["url"] = _change_url(entry["holding"].holder)
        return render_to_string("admin/provisioning/node_occupancy.html", {"occupancy": occupancy})

    def get_form(self, request, obj=None, change=False, **kwargs):
        help_texts = {"state": "A change is a lifecycle move, recorded below; moves the lifecycle forbids are refused."}
        return super().get_form(request, obj, change, help_texts=help_texts, **kwargs)

    def create(self, request, form):
        return node_enrol(rack=form.cleaned_data["rack"], hostname=form.cleaned_data["hostname"])

    def update(self, request, obj, form):
        target = form.cleaned_data.get("state", obj.state)
        if target != obj.state:
            node_transition(node=obj, target=target, actor=request.user.email, reason="admin: node page")
        return node_update(node=obj, rack=form.cleaned_data["rack"], hostname=form.cleaned_data["hostname"])

    def delete(self, request, obj):
        node_delete(node=obj, actor=request.user.email)

    @admin.display(description="agent")
    def agent(self, obj):
        credential = getattr(obj, "credential", None)
        if credential is None:
            return "not enrolled"
        if credential.revoked_at:
            return "revoked"
        return "enrolled"

    @admin.action(description="Create bootstrap tokens (shown once)")
    def create_bootstrap_tokens(self, request, queryset):
        tokens = [(node.hostname, bootstrap_token_create(node=node, actor=request.user.email)) for node in queryset]
        # Rendered in this response only: never stored, never put in a message cookie.
        return TemplateResponse(
            request,
            "admin/provisioning/bootstrap_tokens.html",
            {
                **self.admin_site.each_context(request),
                "title": "Bootstrap tokens",
                "tokens": tokens,
                "hours": settings.BOOTSTRAP_TOKEN_HOURS,
            },
        )

    @admin.action(description="Rotate agent secrets (connected agents receive the new one)")
    def rotate_secrets(self, request, queryset):
        rotated = [node.hostname for node in queryset if node_secret_rotate(node=node, actor=request.user.email)]
        self.message_user(
            request,
            f"Rotation sent to {len(rotated)} agent(s); the old secret works until each agent confirms.",
            messages.SUCCESS,
        )

    @admin.action(description="Revoke agent secrets (disconnect and refuse them)")
    def revoke_secrets(self, request, queryset):
        for node in queryset:
            node_secret_revoke(node=node, actor=request.user.email)
        self.message_user(request, f"Revoked the secrets of {queryset.count()} node(s).", messages.SUCCESS)

    @admin.display(ordering="rack__site__name")
    def site(self, obj):
        return obj.rack.site


@admin.register(Gpu)
class GpuAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "uuid", "accelerator_type", "memory_mib", "node_state"]
    list_filter = ["accelerator_type", "node__rack__site", "node__state"]
    search_fields = ["uuid", "node__hostname"]
    list_select_related = ["node", "accelerator_type"]
    readonly_fields = ["node", "index", "uuid", "accelerator_type", "memory_mib"]  # from inventory reports

    @admin.display(description="node state", ordering="node__state")
    def node_state(self, obj):
        return obj.node.state


@admin.register(NodeCommand)
class NodeCommandAdmin(ReadOnlyAdmin):  # commands are made by provisioning, not by hand
    list_display = ["id", "node", "kind", "state", "progress_percent", "created_at", "deadline", "send_count"]
    list_filter = ["state", "kind", "node__rack__site"]
    search_fields = ["id", "node__hostname", "correlation_id"]
    list_select_related = ["node"]
    readonly_fields = [f.name for f in NodeCommand._meta.fields]
