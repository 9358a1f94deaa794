"""Shared pieces of the REST API: pagination, the schema of its errors and tenant resolution at the
boundary. The schema generator is in ``console.api_schema``."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.pagination import PageNumberPagination

from console.errors import Forbidden


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


class TenantScopedMixin:
    """Resolves the tenant once, before the handler runs (Sentry's convert_args pattern).

    ``request.auth`` is the ApiKey when the client sent one; then the key decides the tenant. For
    session users (the browser), the organization chosen in the portal decides it."""

    tenant = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        from marketplace.models import ApiKey
        from marketplace.selectors.tenancy import tenant_context_for_api_key, tenant_context_for_user

        if isinstance(request.auth, ApiKey):
            self.tenant = tenant_context_for_api_key(key=request.auth)
        else:
            from console.tenancy import SESSION_KEY

            self.tenant = tenant_context_for_user(
                user=request.user,
                organization_id=request.session.get(SESSION_KEY) if hasattr(request, "session") else None,
            )
        if self.tenant is None:
            raise Forbidden("You are not a member of any organization.", code="no_organization")


class TenantRowsMixin(TenantScopedMixin):
    """A viewset over one kind of tenant row, read only through its tenant-scoped selectors:
    ``rows(tenant)`` lists them and ``row(tenant, pk)`` finds one (404 for another tenant's).
    ``detail_serializer_class``, when set, renders a single row."""

    lookup_value_regex = "[^/]+"
    detail_serializer_class = None

    def rows(self, tenant):
        raise NotImplementedError

    def row(self, tenant, pk):
        raise NotImplementedError

    def get_queryset(self):
        return self.rows(self.tenant)

    def get_object(self):
        return self.row(self.tenant, self.kwargs["pk"])

    def get_serializer_class(self):
        if self.action == "retrieve" and self.detail_serializer_class is not None:
            return self.detail_serializer_class
        return self.serializer_class


__all__ = ["ErrorSerializer", "Pagination", "TenantScopedMixin", "error_responses", "extend_schema"]


def idempotency_key_parameter():
    """The optional ``Idempotency-Key`` header of POST endpoints (ARCHITECTURE invariant 7), for their schema."""
    from drf_spectacular.utils import OpenApiParameter

    return OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER, required=False)
