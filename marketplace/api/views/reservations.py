"""REST endpoints of reservations: the price step, reserve, read, cancel, extend, and the telemetry of
their GPUs. Thin: parse, call one service or selector, render."""

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from console.kernel.api import error_responses, expensive_read_action, idempotency_key_parameter
from marketplace.api.boundary import TenantRowsMixin
from marketplace.api.filters import ReservationFilter
from marketplace.api.idempotency import idempotency_key, idempotent_response
from marketplace.api.serializers.reservations import (
    QuoteSerializer,
    ReservationCreateSerializer,
    ReservationDetailSerializer,
    ReservationExtendSerializer,
    ReservationKeySerializer,
    ReservationSerializer,
    ReservationTelemetrySerializer,
    TelemetryQuerySerializer,
)
from marketplace.models import Reservation
from marketplace.selectors.catalog import offer_for_reservation
from marketplace.selectors.reservations import reservation_get, reservation_list, reservation_telemetry
from marketplace.selectors.tenancy import ssh_key_get
from marketplace.services.reservations.access import reservation_key_add, reservation_key_remove
from marketplace.services.reservations.lifecycle import (
    reservation_cancel,
    reservation_check,
    reservation_create,
    reservation_extend,
)


@extend_schema_view(
    list=extend_schema(
        summary="Your organization's reservations",
        responses={200: ReservationSerializer(many=True), **error_responses(400, 403)},
    ),
    retrieve=extend_schema(
        summary="A reservation, with its allocations, price and provisioning progress",
        responses={200: ReservationDetailSerializer, **error_responses(403, 404)},
    ),
)
class ReservationViewSet(TenantRowsMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ReservationSerializer
    detail_serializer_class = ReservationDetailSerializer
    queryset = Reservation.objects.none()  # the schema's model; requests read through reservation_list
    filterset_class = ReservationFilter

    def rows(self, tenant):
        return reservation_list(tenant=tenant)

    def row(self, tenant, pk):
        return reservation_get(tenant=tenant, reservation_id=pk)

    @extend_schema(
        summary="Reserve instances: a slice of a node, whole nodes or a whole rack",
        description="Send `Idempotency-Key` to make retries safe: a repeat returns the first response; "
        "the same key with another body is refused with 422.",
        request=ReservationCreateSerializer,
        parameters=[idempotency_key_parameter()],
        responses={201: ReservationSerializer, **error_responses(400, 402, 403, 409, 422)},
    )
    def create(self, request):
        def perform():
            params = ReservationCreateSerializer(data=request.data)
            params.is_valid(raise_exception=True)
            data = params.validated_data
            offer = offer_for_reservation(offer_id=data["offer"])
            reservation = reservation_create(
                tenant=self.tenant,
                offer=offer,
                quantity=data["quantity"],
                start=data.get("start"),
                end=data.get("end"),
                duration_hours=data.get("duration_hours"),
                term_months=data.get("term_months"),
                idempotency_key=idempotency_key(request),
                image=data.get("image"),
                ssh_keys=data.get("ssh_keys"),
            )
            return status.HTTP_201_CREATED, ReservationSerializer(
                reservation_get(tenant=self.tenant, reservation_id=reservation.pk)
            ).data

        return idempotent_response(request, tenant=self.tenant, perform=perform)

    @extend_schema(
        summary="The price step: what a reservation would hold and cost, without making it",
        description="Takes the body a reservation takes and makes nothing: the instances and GPUs it would "
        "hold, and the price per GPU-hour and per instance-hour. Refused as reserving would be refused now "
        "(the role 403, the window 400, the quota and the capacity 409 with the earliest window that fits, "
        "the hold 402); reserving checks again, and decides.",
        request=ReservationCreateSerializer,
        responses={200: QuoteSerializer, **error_responses(400, 402, 403, 409)},
    )
    @action(detail=False, methods=["post"])
    def quote(self, request):
        params = ReservationCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        quote = reservation_check(
            tenant=self.tenant,
            offer=offer_for_reservation(offer_id=data["offer"]),
            quantity=data["quantity"],
            start=data.get("start"),
            end=data.get("end"),
            duration_hours=data.get("duration_hours"),
            term_months=data.get("term_months"),
        )
        return Response(QuoteSerializer(quote).data)

    @extend_schema(
        summary="One-minute GPU telemetry of its nodes, and their latest batch",
        parameters=[TelemetryQuerySerializer],
        responses={200: ReservationTelemetrySerializer, **error_responses(400, 403, 404)},
    )
    @expensive_read_action()
    def telemetry(self, request, pk=None):
        query = TelemetryQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        data = reservation_telemetry(reservation=self.get_object(), minutes=query.validated_data["minutes"])
        return Response(ReservationTelemetrySerializer(data).data)

    @extend_schema(
        summary="Cancel (before start) or release (after)",
        description="Before its start: cancelled, nothing billed, the hold returned. After: its nodes are "
        "released and torn down, and billing stops -- except for a reserved term, which is a commitment: "
        "released before its end, the rest of the term is still billed at the term's price as it elapses "
        "(`released_early_at` on the reservation).",
        request=None,
        responses={200: ReservationSerializer, **error_responses(403, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        reservation = reservation_cancel(tenant=self.tenant, reservation=self.get_object())
        return Response(ReservationSerializer(reservation_get(tenant=self.tenant, reservation_id=reservation.pk)).data)

    @extend_schema(
        summary="Move the end later, while its nodes stay free",
        description="Send a new `end`, or `duration_hours` to add to the current end.",
        request=ReservationExtendSerializer,
        responses={200: ReservationSerializer, **error_responses(400, 402, 403, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def extend(self, request, pk=None):
        params = ReservationExtendSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        reservation = reservation_extend(
            tenant=self.tenant,
            reservation=self.get_object(),
            end=params.validated_data.get("end"),
            duration_hours=params.validated_data.get("duration_hours"),
        )
        return Response(ReservationSerializer(reservation_get(tenant=self.tenant, reservation_id=reservation.pk)).data)

    @extend_schema(
        summary="Let one more SSH key in",
        description="Reaches its running nodes within seconds (a command to each node's agent). Your own or a "
        "shared key; admins may install any member's.",
        request=ReservationKeySerializer,
        responses={200: ReservationDetailSerializer, **error_responses(400, 403, 404, 409)},
    )
    @action(detail=True, methods=["post"], url_path="ssh-keys")
    def ssh_keys(self, request, pk=None):
        params = ReservationKeySerializer(data=request.data)
        params.is_valid(raise_exception=True)
        reservation = self.get_object()
        key = ssh_key_get(tenant=self.tenant, key_id=params.validated_data["key"])
        reservation_key_add(tenant=self.tenant, reservation=reservation, key=key)
        return Response(ReservationDetailSerializer(reservation_get(tenant=self.tenant, reservation_id=pk)).data)

    @extend_schema(
        summary="Take an SSH key out",
        description="Its running nodes refuse the key within seconds; sessions already open stay open.",
        request=None,
        responses={200: ReservationDetailSerializer, **error_responses(403, 404, 409)},
    )
    @action(detail=True, methods=["delete"], url_path=r"ssh-keys/(?P<key_id>[0-9a-fA-F-]{32,36})")
    def ssh_key_remove(self, request, pk=None, key_id=None):
        reservation_key_remove(tenant=self.tenant, reservation=self.get_object(), key_id=key_id)
        return Response(ReservationDetailSerializer(reservation_get(tenant=self.tenant, reservation_id=pk)).data)
