"""Shared pieces of the REST API: pagination and the schema of its errors. Tenant resolution at the
boundary is the marketplace's (``marketplace.api.boundary``); the schema generator is in
``console.api_schema``."""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.pagination import PageNumberPagination

from console.kernel.throttling import expensive_read_throttles


class Pagination(PageNumberPagination):
    """Pages numbered from 1: a page that is not such a number is a 400 naming ``page``; one past the
    last page is a 404 (both documented on every paginated list by ``console.api_schema.AutoSchema``)."""

    page_size_query_param = "page_size"
    max_page_size = 200
    invalid_page_message = "There is no page {page_number}: it is past the last page."

    def get_page_number(self, request, paginator):
        raw = request.query_params.get(self.page_query_param) or 1
        if raw in self.last_page_strings:
            return paginator.num_pages
        try:
            number = int(raw)
        except ValueError:
            number = 0
        if number < 1:
            raise serializers.ValidationError({self.page_query_param: ["A page number is a whole number from 1."]})
        return number

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
        return parameters


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Stable, machine-readable reason, e.g. not_found, validation_error.")
    message = serializers.CharField(help_text="What went wrong, for people.")
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="Per-field problems on validation errors.",
    )


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """OpenAPI responses for the error statuses an endpoint can return, all of one shape."""
    text = {
        400: "Invalid input.",
        401: "Missing or invalid API key.",
        402: "Your balance, with your credit line, cannot cover the hold for the expected cost.",
        403: "Your role does not allow this.",
        404: "Not found in your organization.",
        409: "Conflicts with the current state.",
        413: "The request body is larger than the server accepts.",
        415: "The request body is of a media type this operation does not accept.",
        429: "Over this key's (or user's) request budget; retry after the `Retry-After` header's seconds.",
    }
    # 401 and 429 can answer any call: every endpoint needs a credential and has a budget.
    return {code: OpenApiResponse(ErrorSerializer, description=text.get(code, "")) for code in (401, *statuses, 429)}


def idempotency_key_parameter() -> OpenApiParameter:
    """The optional ``Idempotency-Key`` header of POST endpoints (ARCHITECTURE invariant 7), for their schema."""
    return OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER, required=False)


def expensive_read_action(*, detail: bool = True):
    """A GET action that reads much more than a row (telemetry, availability, a month's invoice, a
    CSV): one document, so neither paginated nor filtered, and counted against the expensive-read
    budget on top of the read budget."""
    return action(
        detail=detail,
        methods=["get"],
        filterset_class=None,
        pagination_class=None,
        throttle_classes=expensive_read_throttles(),
    )
