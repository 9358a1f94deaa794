"""REST endpoints of the catalog: offers and their availability hour by hour, and the images nodes boot
into. Thin: parse, call one selector, render."""

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import viewsets
from rest_framework.response import Response

from console.kernel.api import error_responses, expensive_read_action
from marketplace.api.filters import OfferFilter
from marketplace.api.serializers.catalog import (
    AvailabilityQuerySerializer,
    ImageSerializer,
    OfferAvailabilitySerializer,
    OfferSerializer,
)
from marketplace.selectors.access import image_list
from marketplace.selectors.capacity import availability_by_hour, availability_window
from marketplace.selectors.catalog import offer_get, offer_list


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
        summary="Free instances of an offer (and their GPUs), hour by hour",
        parameters=[AvailabilityQuerySerializer],
        responses={200: OfferAvailabilitySerializer, **error_responses(400, 404)},
    )
    @expensive_read_action()
    def availability(self, request, pk=None):
        query = AvailabilityQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        offer = offer_get(offer_id=pk)
        start, end = availability_window(**query.validated_data)
        return Response(
            OfferAvailabilitySerializer(
                {
                    "offer": offer.pk,
                    "unit": "racks" if offer.shape == "rack" else "instances",
                    "gpus_per_instance": offer.gpus_per_instance,
                    "start": start,
                    "end": end,
                    "hours": availability_by_hour(offer=offer, start=start, end=end),
                }
            ).data
        )


@extend_schema_view(
    list=extend_schema(summary="Images a node or slice can boot into", responses={200: ImageSerializer(many=True)}),
    retrieve=extend_schema(summary="An image", responses={200: ImageSerializer, **error_responses(404)}),
)
class ImageViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = ImageSerializer
    lookup_field = "slug"
    lookup_value_regex = r"[a-z0-9][a-z0-9._-]*"

    def get_queryset(self):
        return image_list()
