"""Portal pages. Thin: the tenant comes from TenantMiddleware, reads from selectors, writes from services."""

from datetime import timedelta
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpResponseRedirect, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from console.errors import DomainError
from console.portal.forms import ApiKeyForm
from console.tenancy import SESSION_KEY
from marketplace.api.filters import OfferFilter
from marketplace.choices import ROLE_RANK, Role
from marketplace.selectors.catalog import offer_list
from marketplace.selectors.tenancy import api_key_get, api_key_list, tenant_context_for_user
from marketplace.services.api_keys import api_key_create, api_key_revoke
from provisioning.selectors.fleet import accelerator_type_list, site_regions


def tenant_required(view):
    """A signed-in member of some organization; others see why they cannot go on."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.tenant is None:
            return render(request, "portal/no_organization.html", status=403)
        return view(request, *args, **kwargs)

    return wrapper


def healthz(request):
    """Liveness and readiness: PostgreSQL and Redis both answer."""
    from django.core.cache import cache

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
    return redirect("portal:catalog" if request.user.is_authenticated else "portal:login")


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


@tenant_required
def catalog(request):
    filters = OfferFilter(request.GET, queryset=offer_list())
    offers = filters.qs if filters.is_valid() else offer_list().none()
    return render(
        request,
        "portal/catalog.html",
        {
            "filters": filters,
            "offers": offers,
            "accelerator_choices": [(t.slug, str(t)) for t in accelerator_type_list()],
            "regions": site_regions(),
        },
    )


@tenant_required
def api_keys(request):
    tenant = request.tenant
    allowed_roles = [(value, label) for value, label in Role.choices if ROLE_RANK[value] <= ROLE_RANK[tenant.role]]
    form = ApiKeyForm(request.POST or None, initial={"role": Role.MEMBER if tenant.can_spend else Role.VIEWER})
    form.fields["role"].choices = allowed_roles
    created = None
    status = 200
    if request.method == "POST" and form.is_valid():
        days = form.cleaned_data.get("expires_in_days")
        try:
            key, plaintext = api_key_create(
                tenant=tenant,
                name=form.cleaned_data["name"],
                role=form.cleaned_data["role"] or None,
                expires_at=timezone.now() + timedelta(days=days) if days else None,
            )
        except DomainError as error:
            form.add_error(None, error.message)
            status = error.status_code
        else:
            # Rendered in this response only (never redirected through the session), so the
            # plaintext is not stored anywhere.
            created = {"key": key, "plaintext": plaintext}
            form = ApiKeyForm(initial={"role": form.cleaned_data["role"]})
            form.fields["role"].choices = allowed_roles
    elif request.method == "POST":
        status = 400
    return render(
        request,
        "portal/api_keys.html",
        {"form": form, "keys": api_key_list(tenant=tenant), "created": created},
        status=status,
    )


@tenant_required
@require_POST
def api_key_revoke_view(request, key_id):
    key = api_key_revoke(tenant=request.tenant, key=api_key_get(tenant=request.tenant, key_id=key_id))
    messages.success(request, f"Revoked {key.name} ({key.prefix}…). Requests with it now get 401.")
    return redirect("portal:api-keys")
