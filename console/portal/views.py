"""Portal pages. Thin: the tenant comes from TenantMiddleware, reads from selectors, writes from services."""

import uuid
from datetime import timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.db import connection
from django.http import HttpResponseRedirect, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from console.kernel.errors import DomainError, Forbidden
from console.portal.access import tenant_required
from console.portal.billing import dashboard, money, running_cost, wallet_of
from console.portal.boundary import SESSION_KEY
from console.portal.forms import ApiKeyForm, ExtendForm, ReserveForm
from marketplace.api.filters import OfferFilter
from marketplace.choices import ROLE_RANK, ReservationState, Role
from marketplace.money import cents, term_price
from marketplace.selectors.billing import (
    hold_remaining,
    spendable,
)
from marketplace.selectors.capacity import availability_by_hour, availability_window
from marketplace.selectors.catalog import offer_get, offer_list, price_in_force
from marketplace.selectors.reservations import (
    reservation_billed,
    reservation_energy_kwh,
    reservation_get,
    reservation_gpus_now,
    reservation_list,
    reservation_progress,
)
from marketplace.selectors.tenancy import api_key_get, api_key_list, tenant_context_for_user
from marketplace.services.idempotency import idempotent
from marketplace.services.reservations.lifecycle import (
    reservation_cancel,
    reservation_check,
    reservation_create,
    reservation_extend,
    reservation_quote,
)
from marketplace.services.tenancy.api_keys import api_key_create, api_key_revoke
from provisioning.selectors.fleet import accelerator_type_list, fleet_overview, site_regions


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


def _calendar(offer, hours: int = 48) -> dict:
    start, end = availability_window(end=timezone.now() + timedelta(hours=hours))
    rows = availability_by_hour(offer=offer, start=start, end=end)
    peak = max((row.total for row in rows), default=0)
    return {"hours": rows, "peak": peak, "unit": "racks" if offer.shape == "rack" else "nodes"}


def _term_choices(offer) -> list[tuple]:
    """The reserve form's terms: on demand at the price in force, then each reserved term the offer
    has at its discounted price (as reservation_quote computes it)."""
    price = price_in_force(offer=offer)
    choices = [("", f"On demand · ${cents(price)}/GPU-h")]
    for discount in offer.term_discounts.order_by("term_months"):
        discounted = term_price(price, discount.percent_off)
        choices.append(
            (
                discount.term_months,
                f"{discount.term_months} month{'s' if discount.term_months > 1 else ''} · "
                f"${cents(discounted)}/GPU-h (−{discount.percent_off:.0f}%)",
            )
        )
    return choices


def _form_field(form: forms.Form, error: DomainError) -> str | None:
    """The form's field a refusal names, so it is shown there; None (the whole form) if none."""
    return next((name for name in error.fields or {} if name in form.fields), None)


@tenant_required
def reserve(request, offer_id):
    """Reserve from an offer: fill in, see the price and the hold, confirm."""
    offer = offer_get(offer_id=offer_id)
    form = ReserveForm(request.POST or None, initial={"idempotency_key": uuid.uuid4().hex})
    form.fields["term_months"].choices = _term_choices(offer)
    quote, status = None, 200
    if offer.shape == "rack":
        form.fields["quantity"].widget = forms.HiddenInput()
        form.fields["quantity"].initial = 1
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        start = data["start"] or timezone.now()
        term = data["term_months"]
        # A reserved term ends when its months do; on demand ends after the hours asked for.
        hours = None if term else data["duration_hours"]
        try:
            if "confirm" not in request.POST:
                asked = {
                    "offer": offer,
                    "quantity": data["quantity"],
                    "start": start,
                    "end": None,
                    "duration_hours": hours,
                    "term_months": term,
                }
                quote = reservation_quote(**asked)  # shown even when refused below: what it would cost
                # Refused here as the confirm step would refuse it (role, quota, capacity, hold).
                quote = reservation_check(tenant=request.tenant, **asked)
            else:
                key = data["idempotency_key"] or uuid.uuid4().hex

                def perform():
                    made = reservation_create(
                        tenant=request.tenant,
                        offer=offer,
                        quantity=data["quantity"],
                        start=start,
                        end=None,
                        duration_hours=hours,
                        term_months=term,
                        idempotency_key=key,
                    )
                    return 201, {"id": str(made.id)}

                _status, body, _replayed = idempotent(
                    tenant=request.tenant,
                    key=key,
                    endpoint=f"portal reserve {offer.pk}",
                    payload={k: str(v) for k, v in data.items() if k != "idempotency_key"},
                    perform=perform,
                )
                messages.success(request, "Reserved. It will be provisioned when its start comes.")
                return redirect("portal:reservation", reservation_id=body["id"])
        except DomainError as error:
            form.add_error(_form_field(form, error), error.message)
            status = error.status_code
    elif request.method == "POST":
        status = 400
    can_hold = spendable(organization_id=request.tenant.organization.pk)
    return render(
        request,
        "portal/reserve.html",
        {
            "offer": offer,
            "form": form,
            "quote": quote,
            "calendar": _calendar(offer),
            "has_terms": len(form.fields["term_months"].choices) > 1,
            "spendable": money(can_hold),
            # Confirm is offered only for what the check let through, and never to a viewer.
            "can_confirm": quote is not None and status == 200 and request.tenant.can_spend,
            "term_chosen": form.is_bound and bool(form.data.get("term_months")),
            "insufficient": status == 402,
        },
        status=status,
    )


def _billed(reservation) -> str:
    billed = reservation_billed(reservation=reservation)
    return money(billed or 0)


def _so_far(reservation, tick: dict, *, now) -> str | None:
    return money(running_cost(reservation, tick, now=now)) if reservation.activated_at else None


@tenant_required
def reservations(request):
    state = request.GET.get("state") or None
    if state not in ReservationState.values:
        state = None
    now = timezone.now()
    wallet = wallet_of(request.tenant, now=now)
    rows = [
        # A finished one shows what was billed; one that runs, its cost so far (live).
        {"reservation": r, "cost": _billed(r) if r.is_finished else _so_far(r, wallet["tick"], now=now)}
        for r in reservation_list(tenant=request.tenant, state=state)[:200]
    ]
    return render(
        request,
        "portal/reservations.html",
        {
            "rows": rows,
            "states": ReservationState.choices,
            "state": state,
            "tick": wallet["tick"],
            "banner": wallet["banner"],
        },
    )


@tenant_required
def reservation_detail(request, reservation_id):
    reservation = reservation_get(tenant=request.tenant, reservation_id=reservation_id)
    extend_form = ExtendForm()
    status = 200
    if request.method == "POST":
        try:
            if request.POST.get("action") == "cancel":
                reservation_cancel(tenant=request.tenant, reservation=reservation)
                messages.success(request, "Cancelled." if reservation.state == "cancelled" else "Releasing its nodes.")
                return redirect("portal:reservation", reservation_id=reservation.pk)
            if request.POST.get("action") == "extend":
                extend_form = ExtendForm(request.POST)
                if extend_form.is_valid():
                    reservation_extend(
                        tenant=request.tenant,
                        reservation=reservation,
                        end=extend_form.cleaned_data["end"],
                        duration_hours=extend_form.cleaned_data["duration_hours"],
                    )
                    messages.success(request, "Extended.")
                    return redirect("portal:reservation", reservation_id=reservation.pk)
                status = 400
        except DomainError as error:
            field = _form_field(extend_form, error) if extend_form.is_bound else None
            if field:
                extend_form.add_error(field, error.message)
            else:
                messages.error(request, error.message)
            status = error.status_code
        reservation = reservation_get(tenant=request.tenant, reservation_id=reservation_id)
    now = timezone.now()
    wallet = wallet_of(request.tenant, now=now)
    active = reservation.state == ReservationState.ACTIVE
    return render(
        request,
        "portal/reservation.html",
        {
            **wallet,
            "reservation": reservation,
            "extend_form": extend_form,
            "progress": reservation_progress(reservation=reservation),
            "telemetry_gpus": reservation_gpus_now(reservation=reservation),
            "energy_kwh": reservation_energy_kwh(reservation=reservation),
            "can_cancel": reservation.can_cancel,
            "finished": reservation.is_finished,
            "billed": _billed(reservation),
            "cost_so_far": money(running_cost(reservation, wallet["tick"], now=now)),
            "cost_per_hour": money(reservation.price_per_gpu_hour * reservation.gpu_count if active else 0),
            "hold_left": money(hold_remaining(reservation_ids=[reservation.pk]).get(reservation.pk, 0)),
        },
        status=status,
    )


@login_required
def fleet(request):
    """The operators' live fleet view (staff only: tenants never see other tenants' nodes)."""
    if not request.user.is_staff:
        raise Forbidden("The fleet view is for operators.")
    return render(request, "portal/fleet.html", fleet_overview())
