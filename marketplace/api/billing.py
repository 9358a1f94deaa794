"""REST endpoints of billing: the balance, rated usage, invoices (finalized, the month in progress and
CSV), spend alerts and billing notices. Thin like the rest of the API: parse, call one selector or
service, render. Every read is tenant-scoped (another tenant's id is 404); writes are refused by the
services for roles that may not make them (403).

Money leaves as decimal strings, never floats: cents where people read it, and the ledger's ten
decimal places where a client wants to reconcile (``amount_exact``)."""

from datetime import UTC, datetime, timedelta

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from console.kernel.api import error_responses, idempotency_key_parameter
from console.kernel.throttling import expensive_read_throttles
from marketplace.api.boundary import TenantRowsMixin, TenantScopedMixin
from marketplace.api.idempotency import idempotent_response
from marketplace.api.serializers import MoneyField
from marketplace.exports import invoice_csv_response
from marketplace.models import Invoice, SpendAlert
from marketplace.money import month_start
from marketplace.selectors.billing import (
    balance_json,
    balance_of,
    invoice_get,
    invoice_list,
    invoice_preview,
    notice_list,
    spend_alert_get,
    spend_alert_list,
    usage_of,
)
from marketplace.services.billing.spend import spend_alert_create, spend_alert_delete

CURRENCY = "USD"
MAX_USAGE_WINDOW = timedelta(days=400)  # about 13 months: a year compared with the month before it


def _money(**kwargs) -> MoneyField:
    """Dollars and cents, as a string (sums over months: two digits more than a reservation's)."""
    return MoneyField(max_digits=16, **kwargs)


# --- Serializers -----------------------------------------------------------------------------------


class BalanceSerializer(serializers.Serializer):
    currency = serializers.CharField()
    balance = _money(help_text="Prepaid and not spent: what is available plus what is held.")
    available = _money(help_text="Not held for reservations; negative when a credit line is in use.")
    held = _money(help_text="Set aside for reservations' expected cost; released as usage is rated.")
    credit_limit = _money(help_text="How far below zero holds may take the balance (set by operators).")
    spent = _money(help_text="Rated usage, all time.")
    spent_this_month = _money(help_text="Rated usage this calendar month (UTC).")
    depleted_at = serializers.DateTimeField(
        allow_null=True, help_text="When the balance ran out, if it has; on-demand reservations are released later."
    )


class UsageQuerySerializer(serializers.Serializer):
    start = serializers.DateTimeField(required=False, help_text="Default: the first of this month (UTC).")
    end = serializers.DateTimeField(required=False, help_text="Default: now. At most about 13 months after start.")

    def validate(self, attrs):
        now = timezone.now()
        start = attrs.get("start") or datetime.combine(month_start(now), datetime.min.time(), tzinfo=UTC)
        end = attrs.get("end") or now
        # Without an end, the end is now: then the start is what the client can change.
        fault, other = ("end", "the start") if "end" in attrs else ("start", "now (the end when none is given)")
        if end <= start:
            side = "after" if fault == "end" else "before"
            raise serializers.ValidationError({fault: [f"Must be {side} {other}."]})
        if end - start > MAX_USAGE_WINDOW:
            side = "after" if fault == "end" else "before"
            raise serializers.ValidationError({fault: [f"At most {MAX_USAGE_WINDOW.days} days {side} {other}."]})
        return {"start": start, "end": end}


class UsageLineSerializer(serializers.Serializer):
    reservation = serializers.UUIDField(source="reservation.id")
    offer = serializers.CharField(source="reservation.offer.__str__")
    offer_id = serializers.IntegerField(source="reservation.offer_id")
    term_months = serializers.IntegerField(source="reservation.term_months", allow_null=True)
    gpu_count = serializers.IntegerField(source="reservation.gpu_count")
    price_per_gpu_hour = serializers.DecimalField(
        source="reservation.price_per_gpu_hour", max_digits=10, decimal_places=4
    )
    seconds = serializers.DecimalField(max_digits=16, decimal_places=6, help_text="Active seconds rated.")
    gpu_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    amount = _money(help_text="Charged, rounded to cents.")
    amount_exact = serializers.DecimalField(
        source="amount", max_digits=24, decimal_places=10, help_text="Charged, as the ledger holds it."
    )


class UsageSerializer(serializers.Serializer):
    currency = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    seconds = serializers.DecimalField(max_digits=18, decimal_places=6)
    gpu_hours = serializers.DecimalField(max_digits=18, decimal_places=4)
    amount = _money(help_text="The exact total, rounded to cents once.")
    amount_exact = serializers.DecimalField(source="amount", max_digits=24, decimal_places=10)
    lines = UsageLineSerializer(many=True, help_text="Per reservation: its rated usage overlapping the window.")


class InvoiceLineSerializer(serializers.Serializer):
    reservation = serializers.UUIDField(source="reservation_id")
    description = serializers.CharField()
    seconds = serializers.DecimalField(max_digits=16, decimal_places=6)
    gpu_count = serializers.IntegerField()
    gpu_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    price_per_gpu_hour = serializers.DecimalField(max_digits=10, decimal_places=4)
    amount = _money()
    energy_kwh = serializers.DecimalField(max_digits=16, decimal_places=3)


class InvoiceSerializer(serializers.ModelSerializer):
    status = serializers.CharField(read_only=True, help_text='"finalized": written once, never changed.')

    class Meta:
        model = Invoice
        fields = ["id", "number", "month", "status", "currency", "total", "gpu_hours", "energy_kwh", "finalized_at"]
        read_only_fields = fields


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(many=True, read_only=True)

    class Meta(InvoiceSerializer.Meta):
        fields = [*InvoiceSerializer.Meta.fields, "lines"]
        read_only_fields = fields


class InvoicePreviewSerializer(serializers.Serializer):
    month = serializers.DateField()
    status = serializers.CharField(help_text='Always "draft": it changes until the month is finalized.')
    currency = serializers.CharField()
    as_of = serializers.DateTimeField(help_text="Usage rated until about now; the running minute may be missing.")
    total = _money()
    gpu_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    energy_kwh = serializers.DecimalField(max_digits=16, decimal_places=3)
    lines = InvoiceLineSerializer(many=True)


class SpendAlertSerializer(serializers.ModelSerializer):
    threshold = _money(read_only=True)

    class Meta:
        model = SpendAlert
        fields = ["id", "threshold", "last_notified_month", "created_at"]
        read_only_fields = fields


class SpendAlertCreateSerializer(serializers.Serializer):
    # A string, checked by the service (marketplace.money.parse_amount) so that the API and the portal
    # refuse the same inputs with the same words. A JSON number is accepted as well.
    threshold = serializers.CharField(
        max_length=32, help_text='Dollars spent this month, e.g. "250.00": more than 0, at most two decimals.'
    )


class NoticeQuerySerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=100, default=20)


class NoticeSerializer(serializers.Serializer):
    kind = serializers.CharField()
    message = serializers.CharField()
    created_at = serializers.DateTimeField()


# --- Views -----------------------------------------------------------------------------------------


class BalanceView(TenantScopedMixin, APIView):
    @extend_schema(
        summary="Your organization's balance",
        description="The same figures the portal shows and pushes on `billing.balance`; money as strings of cents.",
        responses={200: BalanceSerializer, **error_responses(403)},
    )
    def get(self, request):
        return Response({"currency": CURRENCY, **balance_json(balance_of(organization_id=self.tenant.organization.pk))})


class UsageView(TenantScopedMixin, APIView):
    throttle_classes = expensive_read_throttles()

    @extend_schema(
        summary="Rated usage in a window, per reservation",
        description="Usage records overlapping [start, end), summed per reservation; a record is counted "
        "whole (records never cross a month boundary, so whole months are exact). Usage is rated every minute "
        "or so, and at once when a reservation ends.",
        parameters=[UsageQuerySerializer],
        responses={200: UsageSerializer, **error_responses(400, 403)},
    )
    def get(self, request):
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        usage = usage_of(tenant=self.tenant, **query.validated_data)
        return Response(UsageSerializer({"currency": CURRENCY, **usage}).data)


@extend_schema_view(
    list=extend_schema(
        summary="Your organization's finalized invoices, newest month first",
        responses={200: InvoiceSerializer(many=True), **error_responses(403)},
    ),
    retrieve=extend_schema(
        summary="A finalized invoice with its lines",
        responses={200: InvoiceDetailSerializer, **error_responses(403, 404)},
    ),
)
class InvoiceViewSet(TenantRowsMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Finalized monthly invoices (a month is finalized about an hour after it ends); the month in
    progress is at /invoices/current/."""

    serializer_class = InvoiceSerializer
    detail_serializer_class = InvoiceDetailSerializer
    queryset = Invoice.objects.none()  # the schema's model; requests read through invoice_list
    filterset_class = None

    def rows(self, tenant):
        return invoice_list(tenant=tenant)

    def row(self, tenant, pk):
        return invoice_get(tenant=tenant, invoice_id=pk)

    @extend_schema(
        summary="The month in progress, as its invoice would read if it closed now",
        description="Rated usage of this calendar month (UTC) so far; finalized after the month ends.",
        responses={200: InvoicePreviewSerializer, **error_responses(403)},
    )
    @action(detail=False, methods=["get"], pagination_class=None, throttle_classes=expensive_read_throttles())
    def current(self, request):
        now = timezone.now()
        preview = invoice_preview(tenant=self.tenant, now=now)
        return Response(
            InvoicePreviewSerializer({**preview, "status": "draft", "currency": CURRENCY, "as_of": now}).data
        )

    @extend_schema(
        summary="A finalized invoice as CSV",
        description="Columns: reservation, description, gpu_count, gpu_hours, price_per_gpu_hour, amount, "
        "energy_kwh; the last row holds the totals.",
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="The invoice, one row per line."),
            **error_responses(403, 404),
        },
    )
    @action(detail=True, methods=["get"], pagination_class=None, throttle_classes=expensive_read_throttles())
    def csv(self, request, pk=None):
        invoice = self.get_object()
        response = invoice_csv_response(invoice)
        return response


@extend_schema_view(
    list=extend_schema(
        summary="Your organization's spend alerts",
        responses={200: SpendAlertSerializer(many=True), **error_responses(403)},
    ),
    destroy=extend_schema(
        summary="Remove a spend alert (admins and owners)", responses={204: None, **error_responses(403, 404)}
    ),
)
class SpendAlertViewSet(TenantRowsMixin, mixins.ListModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Spend alerts: the organization is told once a month when its spend reaches a threshold."""

    serializer_class = SpendAlertSerializer
    queryset = SpendAlert.objects.none()  # the schema's model; requests read through spend_alert_list
    filterset_class = None

    def rows(self, tenant):
        return spend_alert_list(tenant=tenant)

    def row(self, tenant, pk):
        return spend_alert_get(tenant=tenant, alert_id=pk)

    @extend_schema(
        summary="Be told when this month's spend reaches a threshold (admins and owners)",
        description="A notice (and a push on `billing.notice`) once a month, when rated usage reaches it. Send "
        "`Idempotency-Key` to make retries safe.",
        request=SpendAlertCreateSerializer,
        parameters=[idempotency_key_parameter()],
        responses={201: SpendAlertSerializer, **error_responses(400, 403, 409, 422)},
    )
    def create(self, request):
        def perform():
            params = SpendAlertCreateSerializer(data=request.data)
            params.is_valid(raise_exception=True)
            alert = spend_alert_create(tenant=self.tenant, threshold=params.validated_data["threshold"])
            return status.HTTP_201_CREATED, SpendAlertSerializer(alert).data

        return idempotent_response(request, tenant=self.tenant, perform=perform)

    def perform_destroy(self, instance):
        spend_alert_delete(tenant=self.tenant, alert=instance)


class BillingNoticeView(TenantScopedMixin, APIView):
    @extend_schema(
        summary="What your organization was last told about its money, newest first",
        description="Spend alerts reached, balance ran out or came back, releases for an unpaid balance, "
        "credit added. Each was also pushed on `billing.notice` when it happened.",
        parameters=[NoticeQuerySerializer],
        responses={200: NoticeSerializer(many=True), **error_responses(400, 403)},
    )
    def get(self, request):
        query = NoticeQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        notices = notice_list(tenant=self.tenant, limit=query.validated_data["limit"])
        return Response(NoticeSerializer(notices, many=True).data)
