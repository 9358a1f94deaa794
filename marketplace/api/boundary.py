"""The API's tenant boundary: the tenant resolved once per request, before the handler runs, and
viewsets that read a tenant's rows only through its selectors."""

from console.kernel.errors import Forbidden
from marketplace.models import ApiKey
from marketplace.selectors.tenancy import tenant_context_for_api_key, tenant_context_for_user
from marketplace.tenant_context import SESSION_KEY


class TenantScopedMixin:
    """Resolves the tenant once, before the handler runs (Sentry's convert_args pattern).

    ``request.auth`` is the ApiKey when the client sent one; then the key decides the tenant. For
    session users (the browser), the organization chosen in the portal decides it."""

    tenant = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        if isinstance(request.auth, ApiKey):
            self.tenant = tenant_context_for_api_key(key=request.auth)
        else:
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
