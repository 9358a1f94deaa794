"""Portal pages about money: the tenant dashboard, billing (balance, spend chart, invoices, spend
alerts, notices) and invoices to print or download, plus the money helpers the reservation pages
share. Thin like the other views: reads from selectors, writes from services."""

from datetime import datetime
from decimal import Decimal

from django import forms
from django.contrib import messages
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from console.kernel.errors import DomainError
from console.portal.access import tenant_required
from console.portal.forms import SpendAlertForm
from marketplace.choices import NoticeKind, ReservationState
from marketplace.exports import invoice_csv_response
from marketplace.money import cents, month_start
from marketplace.selectors.billing import (
    balance_of,
    cost_ticks,
    daily_spend,
    invoice_get,
    invoice_list,
    invoice_preview,
    notice_list,
    reservation_cost,
    spend_alert_get,
    spend_alert_list,
)
from marketplace.selectors.reservations import reservation_list
from marketplace.services.billing.spend import spend_alert_create, spend_alert_delete

# --- Money on pages ---------------------------------------------------------------------------------


def money(value) -> str:
    """``$1,234.56`` (``-$12.00`` below zero), as the browser's Intl formatter writes it (billing.js)."""
    value = cents(Decimal(value))
    return f"{'-' if value < 0 else ''}${abs(value):,.2f}"


def wallet_of(tenant, *, now: datetime) -> dict:
    """The tenant's balance for a page, with the live ticker's first values (the shape of the
    ``billing.cost`` push), so the page is right before the first push arrives."""
    organization_id = tenant.organization.pk
    balance = balance_of(organization_id=organization_id, now=now)
    tick = cost_ticks(now=now, organization_id=organization_id).get(organization_id)
    if tick is None:  # nothing active: nothing accrues, the ledger balance is the balance
        tick = {
            "as_of": now.isoformat(),
            "balance": str(cents(balance["balance"])),
            "unrated": "0.00",
            "per_hour": "0",
            "reservations": {},
        }
    spendable = balance["available"] + balance["credit_limit"]
    # The balance on screen is the sum of the figures beside it, each rounded as shown, so the page
    # adds up to the cent: available + held - running usage not yet rated.
    tick = {**tick, "balance": str(cents(balance["available"]) + cents(balance["held"]) - Decimal(tick["unrated"]))}
    return {
        "balance": balance,
        "tick": tick,
        "money": {
            "balance": money(tick["balance"]),
            "per_hour": money(tick["per_hour"]),
            "held": money(balance["held"]),
            "unrated": money(tick["unrated"]),
            "available": money(balance["available"]),
            "credit_limit": money(balance["credit_limit"]),
            "spent_this_month": money(balance["spent_this_month"]),
            "spendable": money(spendable),
        },
        "spendable": spendable,
        "banner": _banner(tenant, balance),
    }


def running_cost(reservation, tick: dict, *, now: datetime) -> Decimal:
    """What ``reservation`` has cost so far: the ticker's figure where it is active (so the page and
    the first push agree), else from its active interval."""
    ticked = tick["reservations"].get(str(reservation.pk))
    return Decimal(ticked["cost"]) if ticked else reservation_cost(reservation=reservation, now=now)


def _banner(tenant, balance: dict) -> str | None:
    """While the balance is out: the notice that says what will happen and when."""
    if balance["depleted_at"] is None:
        return None
    for notice in notice_list(tenant=tenant, limit=20):
        if notice.kind == NoticeKind.BALANCE_DEPLETED:
            return notice.message
    return "Your balance has run out. Add credit, or your active on-demand reservations will be released."


@tenant_required
def dashboard(request):
    """The tenant's overview: money (live), what runs now and what it costs, what starts next."""
    tenant, now = request.tenant, timezone.now()
    wallet = wallet_of(tenant, now=now)
    running = [
        {
            "reservation": r,
            "cost": money(running_cost(r, wallet["tick"], now=now)),
            "per_hour": money(r.price_per_gpu_hour * r.gpu_count),
        }
        for r in reservation_list(tenant=tenant, state=ReservationState.ACTIVE).order_by("activated_at")[:50]
    ]
    upcoming = (
        reservation_list(tenant=tenant)
        .filter(state__in=[ReservationState.PENDING, ReservationState.PROVISIONING])
        .order_by("period")[:5]
    )
    return render(
        request,
        "portal/dashboard.html",
        {**wallet, "running": running, "upcoming": upcoming, "notices": notice_list(tenant=tenant, limit=5)},
    )


def _form_refusal(form: forms.Form, error: DomainError) -> None:
    """A service's refusal on the form: on its fields where it names them, else above the form."""
    named = {name: problems for name, problems in (error.fields or {}).items() if name in form.fields}
    for name, problems in named.items():
        form.add_error(name, problems)
    if not named:
        form.add_error(None, error.message)


def _spend_chart(tenant, *, now: datetime) -> dict:
    """This month's rated spend per UTC day, for the chart (cents as strings: JSON has no Decimal)."""
    days = daily_spend(tenant=tenant, month=month_start(now), now=now)
    return {"days": [d["day"].isoformat() for d in days], "amounts": [str(cents(d["amount"])) for d in days]}


@tenant_required
def billing(request):
    """Balance (live), this month's spend per day and its invoice so far, finalized invoices, spend
    alerts (admins add and remove them) and the latest notices."""
    tenant, now = request.tenant, timezone.now()
    form = SpendAlertForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                alert = spend_alert_create(tenant=tenant, threshold=form.cleaned_data["threshold"])
            except DomainError as error:
                _form_refusal(form, error)
                status = error.status_code
            else:
                messages.success(request, f"You will be told when this month's spend reaches {money(alert.threshold)}.")
                return redirect("portal:billing")
        else:
            status = 400
    wallet = wallet_of(tenant, now=now)
    return render(
        request,
        "portal/billing.html",
        {
            **wallet,
            "chart": _spend_chart(tenant, now=now),
            "preview": invoice_preview(tenant=tenant, now=now),
            "invoices": invoice_list(tenant=tenant),
            "alerts": spend_alert_list(tenant=tenant),
            "alert_form": form,
            "notices": notice_list(tenant=tenant, limit=20),
        },
        status=status,
    )


@tenant_required
@require_POST
def spend_alert_remove(request, alert_id):
    alert = spend_alert_get(tenant=request.tenant, alert_id=alert_id)  # another tenant's: 404
    try:
        spend_alert_delete(tenant=request.tenant, alert=alert)
    except DomainError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Removed the {money(alert.threshold)} alert.")
    return redirect("portal:billing")


@tenant_required
def invoice_detail(request, invoice_id):
    """A finalized invoice, laid out to print (or save as PDF) on A4."""
    invoice = invoice_get(tenant=request.tenant, invoice_id=invoice_id)
    return render(request, "portal/invoice.html", {"invoice": invoice, "lines": list(invoice.lines.all())})


@tenant_required
def invoice_csv(request, invoice_id):
    """The invoice's lines for spreadsheets: one row per line, then the totals row."""
    return invoice_csv_response(invoice_get(tenant=request.tenant, invoice_id=invoice_id))
