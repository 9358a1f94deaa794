"""REST endpoints of inference endpoints: the served models, and an organization's endpoints made,
read, rescaled and deleted. Thin: parse, call one service or selector, render."""

import logging

import redis
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.response import Response

from console.kernel.api import error_responses, expensive_read_action, idempotency_key_parameter
from marketplace.api.boundary import TenantRowsMixin
from marketplace.api.filters import EndpointFilter
from marketplace.api.idempotency import idempotent_response
from marketplace.api.serializers.endpoints import (
    EndpointCreateSerializer,
    EndpointDetailSerializer,
    EndpointMetricsQuerySerializer,
    EndpointMetricsSerializer,
    EndpointScaleSerializer,
    EndpointSerializer,
    ServedModelSerializer,
)
from marketplace.models import Endpoint, ServedModel
from marketplace.selectors.endpoints import (
    accelerator_types_by_slug,
    endpoint_get,
    endpoint_list,
    endpoint_timeline,
    served_model_for_endpoint,
    served_model_list,
    sites_by_slug,
)
from marketplace.services.endpoints.concurrency import KEEP_SECONDS, concurrency_series
from marketplace.services.endpoints.lifecycle import endpoint_create, endpoint_delete, endpoint_scale

logger = logging.getLogger(__name__)


@extend_schema_view(
    list=extend_schema(
        summary="Models served as endpoints", responses={200: ServedModelSerializer(many=True), **error_responses()}
    ),
    retrieve=extend_schema(summary="A served model", responses={200: ServedModelSerializer, **error_responses(404)}),
)
class ServedModelViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = ServedModelSerializer
    queryset = ServedModel.objects.none()  # the schema's model; requests read through served_model_list
    lookup_field = "slug"

    def get_queryset(self):
        return served_model_list()


@extend_schema_view(
    list=extend_schema(
        summary="Your organization's inference endpoints",
        responses={200: EndpointSerializer(many=True), **error_responses(400, 403)},
    ),
    retrieve=extend_schema(
        summary="An endpoint: its state, base_url, replicas, requests and cost so far",
        responses={200: EndpointDetailSerializer, **error_responses(403, 404)},
    ),
)
class EndpointViewSet(TenantRowsMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = EndpointSerializer
    queryset = Endpoint.objects.none()  # the schema's model; requests read through endpoint_list
    filterset_class = EndpointFilter

    def get_serializer_class(self):
        return EndpointDetailSerializer if self.action == "retrieve" else EndpointSerializer

    def rows(self, tenant):
        # Deleted endpoints only when asked for by state (EndpointFilter validates it and documents it).
        return endpoint_list(tenant=tenant, state=self.request.query_params.get("state") or None)

    def row(self, tenant, pk):
        return endpoint_get(tenant=tenant, endpoint_id=pk)

    def _rendered(self, endpoint: Endpoint) -> dict:
        return EndpointSerializer(endpoint_get(tenant=self.tenant, endpoint_id=endpoint.pk)).data

    @extend_schema(
        summary="Deploy a model as an endpoint, its first min_replicas replicas placed now",
        description="Each replica is a GPU slice reserved for the endpoint (quota, capacity and balance "
        "checked as for any reservation): all are placed, or nothing is made (409 when there is no room "
        "where the endpoint may run, 402 when the balance cannot hold them). Send `Idempotency-Key` to make "
        "retries safe.",
        request=EndpointCreateSerializer,
        parameters=[idempotency_key_parameter()],
        responses={201: EndpointSerializer, **error_responses(400, 402, 403, 409, 422)},
    )
    def create(self, request):
        def perform():
            params = EndpointCreateSerializer(data=request.data)
            params.is_valid(raise_exception=True)
            data = params.validated_data
            endpoint = endpoint_create(
                tenant=self.tenant,
                name=data["name"],
                model=served_model_for_endpoint(slug=data["model"]),
                region=data["region"],
                placement=data["placement"],
                accelerator_types=accelerator_types_by_slug(slugs=data.get("accelerator_types", [])),
                pinned_sites=sites_by_slug(slugs=data.get("pinned_sites", [])),
                min_replicas=data["min_replicas"],
                max_replicas=data["max_replicas"],
                target_concurrency=data["target_concurrency"],
            )
            return status.HTTP_201_CREATED, self._rendered(endpoint)

        return idempotent_response(request, tenant=self.tenant, perform=perform)

    @extend_schema(
        summary="Change its scaling bounds",
        description="Raising `min_replicas` places the new replicas now (refused as a whole, changing "
        "nothing, when one cannot be placed); lowering `max_replicas` stops the extra ones.",
        request=EndpointScaleSerializer,
        responses={200: EndpointSerializer, **error_responses(400, 402, 403, 404, 409)},
    )
    def partial_update(self, request, pk=None):
        params = EndpointScaleSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        endpoint = endpoint_scale(tenant=self.tenant, endpoint=self.get_object(), **params.validated_data)
        return Response(self._rendered(endpoint))

    @extend_schema(
        summary="Delete: stop its replicas and free its name",
        description="Answers at once with the endpoint `deleting`; it is `deleted` once its last replica is down.",
        request=None,
        responses={202: EndpointSerializer, **error_responses(403, 404)},
    )
    def destroy(self, request, pk=None):
        endpoint = endpoint_delete(tenant=self.tenant, endpoint=self.get_object())
        return Response(self._rendered(endpoint), status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Its last hour, live: requests, latency, in flight, replicas and scale events, cold starts, GPUs, cost",
        description="Per minute (from what the gateways counted, collected every few seconds): requests by "
        "outcome and per second, input tokens, p50/p99 and mean latency at the gateway, and the average in "
        "flight. `live`: the last 5 minutes per second as the gateways report them (null while they cannot be "
        "read). Replicas ready and running and the autoscaler's ask at each change, with its scale events; each "
        "replica placed in the window and how long it took to answer; its replicas' GPU utilization, only "
        "the GPUs they held while they were active; the cost so far and per hour now. The portal's endpoint "
        "page draws it and fetches it again on the tenant feed's `endpoint.*` events.",
        parameters=[EndpointMetricsQuerySerializer],
        responses={200: EndpointMetricsSerializer, **error_responses(400, 403, 404)},
    )
    @expensive_read_action()
    def metrics(self, request, pk=None):
        query = EndpointMetricsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        endpoint = self.get_object()
        now = timezone.now()
        try:
            concurrency = concurrency_series([endpoint.pk], seconds=KEEP_SECONDS, now=now.timestamp())[str(endpoint.pk)]
        except redis.RedisError:  # Redis holds nothing that matters: the minutes are PostgreSQL's
            logger.warning("Endpoint %s: the gateways' concurrency could not be read", endpoint.pk, exc_info=True)
            concurrency = None
        data = endpoint_timeline(
            endpoint=endpoint, minutes=query.validated_data["minutes"], now=now, concurrency=concurrency
        )
        return Response(EndpointMetricsSerializer(data).data)
