"""REST endpoints of the marketplace. Thin: parse, call one service or selector, render."""

import django_filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from console.kernel.api import error_responses, idempotency_key_parameter
from console.kernel.throttling import expensive_read_throttles
from marketplace.api.boundary import TenantRowsMixin, TenantScopedMixin
from marketplace.api.filters import OfferFilter
from marketplace.api.idempotency import idempotency_key, idempotent_response
from marketplace.api.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    AvailabilityQuerySerializer,
    MeSerializer,
    OfferAvailabilitySerializer,
    OfferSerializer,
    ReservationCreateSerializer,
    ReservationDetailSerializer,
    ReservationExtendSerializer,
    ReservationSerializer,
    ReservationTelemetrySerializer,
    TelemetryQuerySerializer,
)
from marketplace.choices import ReservationState
from marketplace.models import ApiKey, Reservation
from marketplace.selectors.capacity import availability_by_hour, availability_window
from marketplace.selectors.catalog import offer_for_reservation, offer_get, offer_list
from marketplace.selectors.reservations import reservation_get, reservation_list, reservation_telemetry
from marketplace.selectors.tenancy import api_key_get, api_key_list
from marketplace.services.reservations.lifecycle import reservation_cancel, reservation_create, reservation_extend
from marketplace.services.tenancy.api_keys import api_key_create, api_key_revoke


@extend_schema_view(
    list=extend_schema(
        summary="List offers with their availability",
        responses={200: OfferSerializer(many=True), **error_responses(400)},
    ),
    retrieve=extend_schema(summary="An offer", responses={200: OfferSerializer, **error_responses(404)}),
)
class OfferViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = OfferSerializer
    filterset_class = OfferFilter

    def get_queryset(self):
        return offer_list()

    @extend_schema(
        summary="Free capacity of an offer, hour by hour",
        parameters=[AvailabilityQuerySerializer],
        responses={200: OfferAvailabilitySerializer, **error_responses(400, 404)},
    )
    @action(
        detail=True,
        methods=["get"],
        filterset_class=None,
        pagination_class=None,
        throttle_classes=expensive_read_throttles(),
    )
    def availability(self, request, pk=None):
        query = AvailabilityQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        offer = offer_get(offer_id=pk)
        start, end = availability_window(**query.validated_data)
        return Response(
            OfferAvailabilitySerializer(
                {
                    "offer": offer.pk,
                    "unit": "racks" if offer.shape == "rack" else "nodes",
                    "start": start,
                    "end": end,
                    "hours": availability_by_hour(offer=offer, start=start, end=end),
                }
            ).data
        )


@extend_schema_view(
    list=extend_schema(
        summary="Your organization's API keys",
        description="Admins and owners see every key; others see the keys they created.",
        responses={200: ApiKeySerializer(many=True), **error_responses(403)},
    ),
    retrieve=extend_schema(summary="An API key", responses={200: ApiKeySerializer, **error_responses(403, 404)}),
)
class ApiKeyViewSet(TenantRowsMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ApiKeySerializer
    queryset = ApiKey.objects.none()  # the schema's model; requests read through api_key_list

    def rows(self, tenant):
        return api_key_list(tenant=tenant)

    def row(self, tenant, pk):
        return api_key_get(tenant=tenant, key_id=pk)

    @extend_schema(
        summary="Create an API key",
        request=ApiKeyCreateSerializer,
        description="The response holds the full key, once. Only a digest is stored.",
        responses={201: ApiKeyCreatedSerializer, **error_responses(400, 403)},
    )
    def create(self, request):
        params = ApiKeyCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        key, plaintext = api_key_create(tenant=self.tenant, **params.validated_data)
        key.key = plaintext
        return Response(ApiKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Revoke an API key", request=None, responses={200: ApiKeySerializer, **error_responses(403, 404)}
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        key = api_key_revoke(tenant=self.tenant, key=self.get_object())
        return Response(ApiKeySerializer(key).data)


class ReservationFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=ReservationState.choices)

    class Meta:
        model = Reservation
        fields = ["state"]


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
        summary="Reserve nodes or a whole rack",
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
            )
            return status.HTTP_201_CREATED, ReservationSerializer(
                reservation_get(tenant=self.tenant, reservation_id=reservation.pk)
            ).data

        return idempotent_response(request, tenant=self.tenant, perform=perform)

    @extend_schema(
        summary="One-minute GPU telemetry of its nodes, and their latest batch",
        parameters=[TelemetryQuerySerializer],
        responses={200: ReservationTelemetrySerializer, **error_responses(400, 403, 404)},
    )
    @action(
        detail=True,
        methods=["get"],
        filterset_class=None,
        pagination_class=None,
        throttle_classes=expensive_read_throttles(),
    )
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


class MeView(TenantScopedMixin, APIView):
    @extend_schema(summary="Who this key or session acts as", responses={200: MeSerializer, **error_responses(403)})
    def get(self, request):
        tenant = self.tenant
        org = tenant.organization
        return Response(
            MeSerializer(
                {
                    "email": tenant.user.email,
                    "organization": {"id": str(org.id), "slug": org.slug, "name": org.name},
                    "role": tenant.role,
                    "api_key_prefix": tenant.api_key.prefix if tenant.api_key else None,
                }
            ).data
        )
