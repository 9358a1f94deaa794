"""Tenant resolution for the portal: once per request, from the organization the user picked."""

from marketplace.selectors.billing import ledger_balance
from marketplace.selectors.tenancy import membership_list_for_user, tenant_context_for_user
from marketplace.tenant_context import SESSION_KEY

# The API resolves its tenant itself, after DRF authentication (marketplace.api.boundary.TenantScopedMixin).
_SKIP_PREFIXES = ("/api/", "/static/", "/healthz", "/metrics", "/agent/")


class TenantMiddleware:
    """Sets ``request.tenant``: a TenantContext for a signed-in member, else None."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.tenant = None
        if not request.path.startswith(_SKIP_PREFIXES) and request.user.is_authenticated:
            request.tenant = tenant_context_for_user(
                user=request.user, organization_id=request.session.get(SESSION_KEY)
            )
        return self.get_response(request)


def tenant_context(request) -> dict:
    """Template context: the current tenant, the organizations the user can switch to, and the
    tenant's balance for the header."""
    tenant = getattr(request, "tenant", None)
    if tenant is None:
        return {"tenant": None}

    return {
        "tenant": tenant,
        "memberships": membership_list_for_user(user=request.user),
        # The header's balance: a callable, so the sum runs only where a template shows it (templates
        # call what they are given); live pages then move it.
        "nav_balance": lambda: ledger_balance(organization_id=tenant.organization.pk),
    }
