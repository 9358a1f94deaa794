"""Portal page of SSH keys: add (pasted from a .pub file), list with fingerprints, remove."""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from console.kernel.errors import DomainError
from console.portal.access import tenant_required
from console.portal.forms import SshKeyForm
from marketplace.selectors.tenancy import ssh_key_get, ssh_key_list
from marketplace.services.tenancy.ssh_keys import ssh_key_add, ssh_key_remove


@tenant_required
def ssh_keys(request):
    tenant = request.tenant
    form = SshKeyForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        try:
            key = ssh_key_add(tenant=tenant, **form.cleaned_data)
        except DomainError as error:
            form.add_error("public_key" if "public_key" in (error.fields or {}) else None, error.message)
            status = error.status_code
        else:
            messages.success(request, f"Added {key.name} ({key.fingerprint}).")
            return redirect("portal:ssh-keys")
    elif request.method == "POST":
        status = 400
    return render(request, "portal/ssh_keys.html", {"form": form, "keys": ssh_key_list(tenant=tenant)}, status=status)


@tenant_required
@require_POST
def ssh_key_remove_view(request, key_id):
    key = ssh_key_get(tenant=request.tenant, key_id=key_id)
    ssh_key_remove(tenant=request.tenant, key=key)
    messages.success(request, f"Removed {key.name} ({key.fingerprint}).")
    return redirect("portal:ssh-keys")
