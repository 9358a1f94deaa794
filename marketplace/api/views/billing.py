"""REST endpoints of billing: the balance, rated usage, invoices (finalized, the month in progress and
CSV), spend alerts and billing notices. Thin: parse, call one selector or service, render. Every read is
tenant-scoped (another tenant's id is 404); writes are refused by the services for roles that may not
make them (403)."""

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from console.kernel.api import error_responses, expensive_read_action, idempotency_key_parameter
from console.kernel.throttling import expensive_read_throttles
from marketplace.api.boundary import TenantRowsMixin, TenantScopedMixin
from marketplace.api.idempotency import idempotent_response
from marketplace.api.serializers.billing import (
    CURRENCY,
    BalanceSerializer,
    InvoiceDetailSerializer,
    InvoicePreviewSerializer,
    InvoiceSerializer,
    NoticeQuerySerializer,
    NoticeSerializer,
    SpendAlertCreateSerializer,
    SpendAlertSerializer,
    UsageQuerySerializer,
    UsageSerializer,
)
from marketplace.exports import invoice_csv_response
from marketplace.models import Invoice, SpendAlert
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
        summary="Rated usage in a window, per reservation and per inference endpoint",
        description="Usage records overlapping [start, end), summed per reservation; a record is counted "
        "whole (records never cross a month boundary, so whole months are exact). An inference endpoint's "
        "replicas are summed per endpoint in `endpoints`, with their energy and the requests and input tokens "
        "its gateways answered in the window. Usage is rated every minute or so, and at once when a "
        "reservation ends.",
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
    @expensive_read_action(detail=False)
    def current(self, request):
        now = timezone.now()
        preview = invoice_preview(tenant=self.tenant, now=now)
        return Response(
            InvoicePreviewSerializer({**preview, "status": "draft", "currency": CURRENCY, "as_of": now}).data
        )

    @extend_schema(
        summary="A finalized invoice as CSV",
        description="Columns: reservation, description, gpu_count, gpu_hours, price_per_gpu_hour, amount, "
        "energy_kwh, endpoint, replica_hours, requests, input_tokens (a reservation's line leaves the last four "
        "empty, an endpoint's the reservation); the last row holds the totals.",
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="The invoice, one row per line."),
            **error_responses(403, 404),
        },
    )
    @expensive_read_action()
    def csv(self, request, pk=None):
        return invoice_csv_response(self.get_object())


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
