"""Operators' view of reservations and their allocations: read-only history (the lifecycle writes
them), with force-release through marketplace.services.reservations."""

from django.contrib import admin, messages
from django.db.models import Prefetch

from console.kernel.admin import ReadOnlyAdmin
from marketplace.choices import FINISHED_STATES
from marketplace.models import (
    Allocation,
    Reservation,
)
from marketplace.services.reservations.provisioning import reservation_force_release


class AllocationInline(admin.TabularInline):
    model = Allocation
    extra = 0
    fields = ["node", "gpu_range", "period", "live"]
    readonly_fields = fields
    can_delete = False

    @admin.display(description="GPUs")
    def gpu_range(self, obj):
        return obj.gpu_label

    def has_add_permission(self, request, obj=None):
        return False  # allocations are made by placement only


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    """Tenants reserve through the portal or the API; reservations are history, their states the
    lifecycle's. Force-release frees the nodes."""

    list_display = [
        "short_id",
        "organization",
        "offer",
        "state",
        "node_count",
        "gpu_count",
        "held",
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

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .prefetch_related(
                Prefetch("allocations", queryset=Allocation.objects.select_related("node").order_by("node__hostname"))
            )
        )

    @admin.display(description="holds")
    def held(self, obj):
        """Which GPUs of which node (``node-12 · GPUs 4–5``); for several nodes, how many."""
        allocations = list(obj.allocations.all())
        if len(allocations) == 1:
            return f"{allocations[0].node.hostname} · {allocations[0].gpu_label}"
        return f"{len(allocations)} whole nodes" if allocations else "—"

    def has_force_release_permission(self, request):
        return request.user.has_perm("marketplace.change_reservation")

    @admin.display(description="reservation", ordering="id")
    def short_id(self, obj):
        return obj.id.hex[:8]

    @admin.display(ordering="period")
    def start(self, obj):
        return obj.start

    @admin.display()
    def end(self, obj):
        return obj.end

    @admin.action(
        description="Force-release selected reservations (free their nodes now)", permissions=["force_release"]
    )
    def force_release(self, request, queryset):
        released = 0
        for reservation in queryset:
            if reservation.state in FINISHED_STATES:
                self.message_user(
                    request, f"{reservation.id.hex[:8]} is already {reservation.state}.", messages.WARNING
                )
                continue
            reservation_force_release(reservation=reservation, actor=request.user.email)
            released += 1
        if released:
            self.message_user(request, f"Released {released} reservation(s); their nodes are free.", messages.SUCCESS)


@admin.register(Allocation)
class AllocationAdmin(ReadOnlyAdmin):  # made by placement only
    list_display = ["node", "gpu_range", "reservation", "period", "live"]
    list_filter = ["live", "node__rack__site"]
    search_fields = ["node__hostname", "reservation__id", "reservation__organization__name"]
    list_select_related = ["node", "reservation"]
    readonly_fields = ["reservation", "node", "gpu_range", "period", "live"]

    @admin.display(description="GPUs", ordering="gpus")
    def gpu_range(self, obj):
        return obj.gpu_label
