"""Portal pages of the catalog: offers with their availability, and reserving one (the price step, then confirm)."""

import uuid
from datetime import timedelta

from django import forms
from django.contrib import messages
from django.shortcuts import redirect, render
from django.utils import timezone

from console.kernel.errors import DomainError
from console.portal.access import tenant_required
from console.portal.billing import money
from console.portal.forms import ReserveForm, refused_field
from marketplace.api.filters import OfferFilter
from marketplace.choices import OfferKind
from marketplace.money import cents, term_price
from marketplace.selectors.access import image_for, image_list
from marketplace.selectors.billing import (
    spendable,
)
from marketplace.selectors.capacity import availability_by_hour, availability_window
from marketplace.selectors.catalog import instance_sizes, offer_get, offer_list, price_in_force
from marketplace.selectors.tenancy import ssh_key_list
from marketplace.services.idempotency import idempotent
from marketplace.services.reservations.lifecycle import (
    quote_check,
    reservation_create,
    reservation_quote,
)
from provisioning.selectors.fleet import accelerator_type_list, site_regions


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
            "instance_sizes": instance_sizes(),
        },
    )


def _unit(offer) -> str:
    """What the offer's availability counts, in the words of its page: racks, nodes, or instances (slices)."""
    return {OfferKind.RACK: "racks", OfferKind.NODE: "nodes"}.get(offer.kind, "instances")


def _calendar(offer, hours: int = 48) -> dict:
    start, end = availability_window(end=timezone.now() + timedelta(hours=hours))
    rows = availability_by_hour(offer=offer, start=start, end=end)
    peak = max((row.total for row in rows), default=0)
    return {"hours": rows, "peak": peak, "unit": _unit(offer)}


def per_instance_hour(item):
    """A quote's or a reservation's price per instance-hour: an instance holds its GPUs over its
    quantity (a slice's, a node's, or the whole rack's)."""
    return item.price_per_gpu_hour * (item.gpu_count // item.quantity)


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


@tenant_required
def reserve(request, offer_id):
    """Reserve from an offer: fill in, see the price and the hold, confirm."""
    offer = offer_get(offer_id=offer_id)
    images = list(image_list(accelerator_type_id=offer.accelerator_type_id))
    default_image = image_for(offer=offer, slug=None)
    keys = list(ssh_key_list(tenant=request.tenant))
    initial = {
        "idempotency_key": uuid.uuid4().hex,
        "image": default_image.slug if default_image else "",
        "ssh_keys": [str(key.pk) for key in keys if key.owner_id == request.tenant.user.pk],
    }
    form = ReserveForm(request.POST or None, initial=initial)
    form.fields["term_months"].choices = _term_choices(offer)
    form.fields["image"].choices = [(image.slug, image.name) for image in images]
    form.fields["ssh_keys"].choices = [
        (str(key.pk), f"{key.name} · {key.fingerprint[:20]}…{'' if key.owner_id else ' (shared)'}") for key in keys
    ]
    quote, status = None, 200
    if offer.kind != OfferKind.NODE:  # one slice or one whole rack per reservation (reservation_quote says so)
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
                # Shown even when refused below: what it would cost.
                quote = reservation_quote(
                    offer=offer,
                    quantity=data["quantity"],
                    start=start,
                    end=None,
                    duration_hours=hours,
                    term_months=term,
                )
                # Refused here as the confirm step would refuse it (role, quota, capacity, hold).
                quote = quote_check(tenant=request.tenant, quote=quote)
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
                        image=data["image"] or None,
                        ssh_keys=data["ssh_keys"],
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
            form.add_error(refused_field(form, error), error.message)
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
            "per_instance_hour": per_instance_hour(quote) if quote else None,
            "calendar": _calendar(offer),
            "has_terms": len(form.fields["term_months"].choices) > 1,
            "spendable": money(can_hold),
            # Confirm is offered only for what the check let through, and never to a viewer.
            "can_confirm": quote is not None and status == 200 and request.tenant.can_spend,
            "term_chosen": form.is_bound and bool(form.data.get("term_months")),
            "insufficient": status == 402,
            "has_keys": bool(keys),
        },
        status=status,
    )
