"""Portal pages of reservations: the list and one reservation (progress, telemetry, cost; cancel and extend)."""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.utils import timezone

from console.kernel.errors import DomainError
from console.portal.access import tenant_required
from console.portal.billing import money, running_cost, wallet_of
from console.portal.catalog import per_instance_hour
from console.portal.forms import ExtendForm, refused_field
from marketplace.choices import ReservationState
from marketplace.selectors.access import reservation_access
from marketplace.selectors.billing import (
    hold_remaining,
)
from marketplace.selectors.reservations import (
    reservation_billed,
    reservation_energy_kwh,
    reservation_get,
    reservation_gpus_now,
    reservation_list,
    reservation_progress,
)
from marketplace.selectors.tenancy import ssh_key_get, ssh_key_list
from marketplace.services.reservations.access import reservation_key_add, reservation_key_remove
from marketplace.services.reservations.lifecycle import (
    reservation_cancel,
    reservation_extend,
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
            action = request.POST.get("action")
            if action in ("key_add", "key_remove"):
                _change_keys(request, reservation, action)
                return redirect("portal:reservation", reservation_id=reservation.pk)
            if action == "cancel":
                reservation_cancel(tenant=request.tenant, reservation=reservation)
                messages.success(request, "Cancelled." if reservation.state == "cancelled" else "Releasing its nodes.")
                return redirect("portal:reservation", reservation_id=reservation.pk)
            if action == "extend":
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
            field = refused_field(extend_form, error) if extend_form.is_bound else None
            if field:
                extend_form.add_error(field, error.message)
            else:
                messages.error(request, error.message)
            status = error.status_code
        reservation = reservation_get(tenant=request.tenant, reservation_id=reservation_id)
    now = timezone.now()
    wallet = wallet_of(request.tenant, now=now)
    active = reservation.state == ReservationState.ACTIVE
    access = reservation_access(reservation=reservation)
    installed = {key["id"] for key in access["keys"]}
    return render(
        request,
        "portal/reservation.html",
        {
            **wallet,
            "reservation": reservation,
            "extend_form": extend_form,
            "progress": reservation_progress(reservation=reservation),
            "access": access,
            "keys_to_add": [key for key in ssh_key_list(tenant=request.tenant) if str(key.pk) not in installed],
            "telemetry_gpus": reservation_gpus_now(reservation=reservation),
            "energy_kwh": reservation_energy_kwh(reservation=reservation),
            "can_cancel": reservation.can_cancel,
            "finished": reservation.is_finished,
            "billed": _billed(reservation),
            "cost_so_far": money(running_cost(reservation, wallet["tick"], now=now)),
            "cost_per_hour": money(reservation.price_per_gpu_hour * reservation.gpu_count if active else 0),
            "per_instance_hour": per_instance_hour(reservation),
            "hold_left": money(hold_remaining(reservation_ids=[reservation.pk]).get(reservation.pk, 0)),
        },
        status=status,
    )


def _change_keys(request, reservation, action: str) -> None:
    """Let a key in, or take one out (services.reservations.access); its nodes follow within seconds."""
    key_id = request.POST.get("key", "")
    if action == "key_add":
        key = ssh_key_get(tenant=request.tenant, key_id=key_id)
        reservation_key_add(tenant=request.tenant, reservation=reservation, key=key)
        messages.success(request, f"{key.name} is let in; its nodes take it within seconds.")
    else:
        reservation_key_remove(tenant=request.tenant, reservation=reservation, key_id=key_id)
        messages.success(request, "Key taken out; its nodes refuse it within seconds (open sessions stay).")
