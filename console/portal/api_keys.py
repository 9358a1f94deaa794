"""Portal pages of API keys: create (shown once), list, revoke."""

from datetime import timedelta

from django.contrib import messages
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from console.kernel.errors import DomainError
from console.portal.access import tenant_required
from console.portal.forms import ApiKeyForm
from marketplace.choices import ROLE_RANK, Role
from marketplace.selectors.tenancy import api_key_get, api_key_list
from marketplace.services.tenancy.api_keys import api_key_create, api_key_revoke


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
