"""Portal pages of inference endpoints: the list, deploying one (the form), and one endpoint (how to
call it, its replicas, what it has cost; rescale and delete; its last hour, live: static/js/endpoint.js
draws GET /api/v1/endpoints/<id>/metrics/)."""

import uuid

from django.contrib import messages
from django.shortcuts import redirect, render

from console.kernel.errors import DomainError
from console.portal.access import tenant_required
from console.portal.billing import money
from console.portal.forms import EndpointForm, EndpointScaleForm, refused_field
from marketplace.models import EndpointState
from marketplace.selectors.endpoints import (
    endpoint_cost_now,
    endpoint_get,
    endpoint_list,
    endpoint_traffic_summary,
    served_model_list,
)
from marketplace.services.endpoints.lifecycle import endpoint_base_url, endpoint_create, endpoint_delete, endpoint_scale
from marketplace.services.idempotency import idempotent
from provisioning.selectors.fleet import accelerator_type_list, site_list, site_regions


@tenant_required
def endpoints(request):
    return render(request, "portal/endpoints.html", {"endpoints": endpoint_list(tenant=request.tenant)[:200]})


def _deploy_form(data=None) -> EndpointForm:
    form = EndpointForm(data, initial={"idempotency_key": uuid.uuid4().hex})
    form.fields["model"].queryset = served_model_list()
    form.fields["region"].choices = [(region, region) for region in site_regions()]
    form.fields["pinned_sites"].queryset = site_list().order_by("name")
    form.fields["accelerator_types"].queryset = accelerator_type_list().order_by("slug")
    return form


@tenant_required
def endpoint_new(request):
    """Deploy: the service places the first replicas at once, so a refusal (capacity, quota, balance,
    a taken name) is shown here, on the form; a double click replays the first answer (the form's key)."""
    form = _deploy_form(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        key = data["idempotency_key"] or uuid.uuid4().hex

        def perform():
            made = endpoint_create(
                tenant=request.tenant,
                name=data["name"],
                model=data["model"],
                region=data["region"],
                placement=data["placement"],
                accelerator_types=list(data["accelerator_types"]),
                pinned_sites=list(data["pinned_sites"]),
                min_replicas=data["min_replicas"],
                max_replicas=data["max_replicas"],
                target_concurrency=data["target_concurrency"],
            )
            return 201, {"id": str(made.id)}

        payload = {
            **{k: str(v) for k, v in data.items() if k not in ("idempotency_key", "model", "accelerator_types")},
            "model": data["model"].slug,
            "accelerator_types": sorted(t.slug for t in data["accelerator_types"]),
            "pinned_sites": sorted(s.slug for s in data["pinned_sites"]),
        }
        try:
            _status, body, _replayed = idempotent(
                tenant=request.tenant, key=key, endpoint="portal endpoint create", payload=payload, perform=perform
            )
        except DomainError as error:
            form.add_error(refused_field(form, error), error.message)
            status = error.status_code
        else:
            messages.success(request, "Deploying. Its replicas start on their GPUs now.")
            return redirect("portal:endpoint", endpoint_id=body["id"])
    elif request.method == "POST":
        status = 400
    return render(request, "portal/endpoint_new.html", {"form": form}, status=status)


@tenant_required
def endpoint_detail(request, endpoint_id):
    endpoint = endpoint_get(tenant=request.tenant, endpoint_id=endpoint_id)
    bounds = {
        "min_replicas": endpoint.min_replicas,
        "max_replicas": endpoint.max_replicas,
        "target_concurrency": endpoint.target_concurrency,
    }
    scale_form = EndpointScaleForm(initial=bounds)
    status = 200
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "delete":
                endpoint_delete(tenant=request.tenant, endpoint=endpoint)
                messages.success(request, "Deleting: its replicas are being stopped.")
                return redirect("portal:endpoint", endpoint_id=endpoint.pk)
            if action == "scale":
                scale_form = EndpointScaleForm(request.POST)
                if scale_form.is_valid():
                    endpoint_scale(tenant=request.tenant, endpoint=endpoint, **scale_form.cleaned_data)
                    messages.success(request, "Scaling bounds changed.")
                    return redirect("portal:endpoint", endpoint_id=endpoint.pk)
                status = 400
            else:
                status = 400
        except DomainError as error:
            field = refused_field(scale_form, error) if scale_form.is_bound else None
            if field:
                scale_form.add_error(field, error.message)
            else:
                messages.error(request, error.message)
            status = error.status_code
        endpoint = endpoint_get(tenant=request.tenant, endpoint_id=endpoint_id)
    gone = endpoint.state in (EndpointState.DELETING, EndpointState.DELETED)
    cost = endpoint_cost_now(endpoint=endpoint)
    return render(
        request,
        "portal/endpoint.html",
        {
            "endpoint": endpoint,
            "base_url": endpoint_base_url(endpoint),
            "replicas": endpoint.current_replicas,
            "cost": money(cost["so_far"]),
            "traffic": endpoint_traffic_summary(endpoint=endpoint),
            "scale_form": scale_form,
            "can_change": request.tenant.can_spend and not gone,
            "gone": gone,
        },
        status=status,
    )
