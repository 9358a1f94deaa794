"""Operators' view of inference endpoints: the served models, written through
marketplace.services.endpoints.models; endpoints and their replicas read-only (tenants make them, the
lifecycle and the agents move them)."""

from django.contrib import admin
from django.db.models import Count, Prefetch, Q
from django.urls import reverse
from django.utils.html import format_html

from console.kernel.admin import ReadOnlyAdmin, ServiceAdmin, values
from marketplace.choices import LIVE_REPLICA_STATES, ReplicaState
from marketplace.models import Allocation, Endpoint, Replica, ServedModel
from marketplace.services.endpoints.models import served_model_create, served_model_delete, served_model_update

SERVED_MODEL_FIELDS = [
    "slug",
    "name",
    "task",
    "description",
    "server_program",
    "weights",
    "gpus_per_replica",
    "gpu_memory_gib",
    "dimensions",
    "is_active",
]


@admin.register(ServedModel)
class ServedModelAdmin(ServiceAdmin):
    list_display = ["name", "slug", "task", "gpus_per_replica", "dimensions", "accelerators", "is_active"]
    list_filter = ["is_active", "task", "accelerator_types"]
    search_fields = ["name", "slug"]
    fields = [*SERVED_MODEL_FIELDS, "accelerator_types"]
    filter_horizontal = ["accelerator_types"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("accelerator_types")

    @admin.display(description="accelerator types")
    def accelerators(self, obj):
        return ", ".join(t.slug for t in obj.accelerator_types.all()) or "—"

    def create(self, request, form):
        return served_model_create(
            accelerator_types=form.cleaned_data["accelerator_types"], **values(None, form, SERVED_MODEL_FIELDS)
        )

    def update(self, request, obj, form):
        return served_model_update(
            model=obj,
            accelerator_types=form.cleaned_data.get("accelerator_types"),
            **values(obj, form, SERVED_MODEL_FIELDS),
        )

    def delete(self, request, obj):
        served_model_delete(model=obj)

    def save_related(self, request, form, formsets, change):
        # The service set the accelerator types; the form's save_m2m would write them a second time itself.
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)


def _holding(replica: Replica) -> str:
    allocations = list(replica.reservation.allocations.all())
    if not allocations:
        return "—"
    allocation = allocations[0]
    return f"{allocation.node.rack.site.slug} · {allocation.node.hostname} · {allocation.gpu_label}"


def _with_slices(replicas):
    return replicas.select_related("reservation").prefetch_related(
        Prefetch("reservation__allocations", queryset=Allocation.objects.select_related("node__rack__site"))
    )


class ReplicaInline(admin.TabularInline):
    model = Replica
    extra = 0
    fields = ["replica", "state", "address", "holds", "ready_at", "stopped_at", "failure_reason"]
    readonly_fields = fields
    can_delete = False

    def get_queryset(self, request):
        return _with_slices(super().get_queryset(request))

    @admin.display(description="replica")
    def replica(self, obj):
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:marketplace_replica_change", args=[obj.pk]), obj.id.hex[:8]
        )

    @admin.display(description="site · node · GPUs")
    def holds(self, obj):
        return _holding(obj)

    def has_add_permission(self, request, obj=None):
        return False  # replicas are started by the endpoint services only


@admin.register(Endpoint)
class EndpointAdmin(ReadOnlyAdmin):
    """Tenants deploy, rescale and delete endpoints through the portal or the API; the lifecycle moves
    their states from their replicas'."""

    list_display = [
        "name",
        "organization",
        "model",
        "state",
        "region",
        "placement",
        "min_replicas",
        "max_replicas",
        "live_replicas",
        "ready_replicas",
        "created_at",
    ]
    list_filter = ["state", "placement", "region", "model"]
    search_fields = ["id", "name", "organization__name", "organization__slug", "model__slug"]
    list_select_related = ["organization", "model"]
    readonly_fields = [f.name for f in Endpoint._meta.fields] + ["accelerator_types", "pinned_sites"]
    inlines = [ReplicaInline]
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                live_count=Count("replicas", filter=Q(replicas__state__in=LIVE_REPLICA_STATES)),
                ready_count=Count("replicas", filter=Q(replicas__state=ReplicaState.READY)),
            )
        )

    @admin.display(description="replicas", ordering="live_count")
    def live_replicas(self, obj):
        return obj.live_count

    @admin.display(description="ready", ordering="ready_count")
    def ready_replicas(self, obj):
        return obj.ready_count


@admin.register(Replica)
class ReplicaAdmin(ReadOnlyAdmin):
    """A replica's model server and the slice reservation it runs on (its billing, placement and
    provisioning are the reservation's)."""

    list_display = ["short_id", "endpoint", "state", "reservation_link", "address", "holds", "ready_at", "created_at"]
    list_filter = ["state", "endpoint__organization"]
    search_fields = ["id", "endpoint__name", "address", "reservation__allocations__node__hostname"]
    list_select_related = ["endpoint", "reservation"]
    readonly_fields = [f.name for f in Replica._meta.fields] + ["reservation_link", "holds"]

    def get_queryset(self, request):
        return _with_slices(super().get_queryset(request))

    @admin.display(description="id")
    def short_id(self, obj):
        return obj.id.hex[:8]

    @admin.display(description="reservation")
    def reservation_link(self, obj):
        url = reverse("admin:marketplace_reservation_change", args=[obj.reservation_id])
        return format_html('<a href="{}">{}</a>', url, obj.reservation_id.hex[:8])

    @admin.display(description="site · node · GPUs")
    def holds(self, obj):
        return _holding(obj)
