"""Portal pages around the tenant's work: health, home, where signing in lands, switching organization."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.db import connection
from django.http import HttpResponseRedirect, JsonResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from console.portal.billing import dashboard
from console.portal.boundary import SESSION_KEY
from marketplace.selectors.tenancy import tenant_context_for_user


def healthz(request):
    """Liveness and readiness: PostgreSQL and Redis both answer."""
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["postgres"] = f"error: {exc.__class__.__name__}"
    try:
        cache.set("healthz", "1", 5)
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"error: {exc.__class__.__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if healthy else "degraded", **checks}, status=200 if healthy else 503)


def home(request):
    """Signed in: the tenant's dashboard (an operator of no organization: the fleet). Anonymous: the
    sign-in page (no ``next``: after signing in, see ``signed_in``)."""
    if not request.user.is_authenticated:
        return redirect("portal:login")
    if request.tenant is None and request.user.is_staff:
        return redirect("portal:fleet")
    return dashboard(request)


@login_required
def signed_in(request):
    """Where signing in lands (settings.LOGIN_REDIRECT_URL): a member, the catalog; an operator who is
    a member of no organization, the operators' pages (the fleet, which links to the admin), not the
    tenant pages' "no organization" refusal."""
    if request.tenant is None and request.user.is_staff:
        return redirect("portal:fleet")
    return redirect("portal:catalog")


@login_required
@require_POST
def organization_switch(request):
    tenant = tenant_context_for_user(user=request.user, organization_id=request.POST.get("organization"))
    if tenant is not None and str(tenant.organization.pk) == request.POST.get("organization"):
        request.session[SESSION_KEY] = str(tenant.organization.pk)
        messages.success(request, f"Now working in {tenant.organization.name}.")
    else:
        messages.error(request, "You are not a member of that organization.")
    target = request.POST.get("next") or reverse("portal:catalog")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse("portal:catalog")
    return HttpResponseRedirect(target)
