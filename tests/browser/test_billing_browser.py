"""Live cost in real Chromium on daphne: the figures the tenant feed pushes (billing.cost,
billing.balance, billing.notice) reach the reservation page and the dashboard, and between pushes
the running cost and the balance move on their own at the rate they accrue."""

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone

from console.kernel.events import publish, tenant_group
from marketplace.choices import Role
from marketplace.models import Invoice
from marketplace.money import month_start
from marketplace.services.billing.invoicing import cost_tick, invoice_month
from marketplace.services.billing.metering import usage_rate
from marketplace.services.reservations import lifecycle
from marketplace.services.reservations.lifecycle import reservation_create
from tests.browser.conftest import chromium  # noqa: F401 - the shared browser fixture (requested below)
from tests.e2e.conftest import stack  # noqa: F401 - daphne on the test database (the fixture)
from tests.factories import PASSWORD, OfferFactory, RackFactory, make_node, make_tenant

pytestmark = [pytest.mark.slow]


def off_the_browser_thread(fn, *args, **kwargs):
    """Run ``fn`` on another thread: Playwright keeps an event loop on this one, where Channels'
    async_to_sync (publish) refuses to run. Its database connection is closed after."""

    def run():
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result(timeout=30)


def push(organization_id, event: str, data: dict) -> None:
    off_the_browser_thread(publish, tenant_group(organization_id), event, data)


def money_of(page, selector: str) -> Decimal:
    text = page.locator(selector).first.inner_text()
    sign = -1 if text.startswith("-") else 1
    return sign * Decimal(text.lstrip("-").lstrip("$").replace(",", ""))


def test_running_cost_and_balance_follow_the_pushes_and_tick_in_between(stack, request, tmp_path):  # noqa: F811
    rack = RackFactory()
    make_node(rack=rack)
    offer = OfferFactory(site=rack.site, price_per_gpu_hour=Decimal("2.50"))
    tenant = make_tenant(role=Role.MEMBER)
    org = tenant.organization.pk
    reservation = reservation_create(
        tenant=tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=2)
    )
    lifecycle.reservation_begin(reservation_id=reservation.pk)
    lifecycle.reservation_activate(reservation_id=reservation.pk)
    rid = str(reservation.pk)
    session = Client()
    assert session.login(username=tenant.user.email, password=PASSWORD)
    stack.start_daphne()

    # The browser last: its event loop runs on this thread from here on (see tests/browser/conftest.py).
    browser = request.getfixturevalue("chromium")
    context = browser.new_context(base_url=stack.base, viewport={"width": 1400, "height": 1000})
    context.add_cookies([{"name": "sessionid", "value": session.cookies["sessionid"].value, "url": stack.base}])
    page = context.new_page()
    page.set_default_timeout(60_000)  # small busy machines: generous, never a timing assertion
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    shots = os.environ.get("SCREENSHOT_DIR", str(tmp_path))
    cost = f'[data-live-cost="{rid}"]'

    page.goto(f"/reservations/{rid}/")
    # Rendered by the server before any push: $20/h for 8 GPUs at $2.50, and the balance.
    assert page.locator(f'[data-live-rate="{rid}"]').inner_text() == "$20.00"
    assert money_of(page, "main [data-live-balance]") > Decimal("99000")
    page.wait_for_function("document.body.dataset.live === 'on'")
    page.evaluate("window.sameDocument = true")

    # A push snaps the figures to the server's values (nothing accrues at $0/h: they stay there).
    push(
        org,
        "billing.cost",
        {
            "as_of": timezone.now().isoformat(),
            "balance": "12345.67",
            "unrated": "0.00",
            "per_hour": "0",
            "reservations": {rid: {"cost": "42.00", "per_hour": "0"}},
        },
    )
    page.locator(cost, has_text="$42.00").wait_for()
    page.locator("main [data-live-balance]", has_text="$12,345.67").wait_for()
    page.locator(".nav-balance [data-live-balance]", has_text="$12,345.67").wait_for()  # the header follows too
    assert page.evaluate("document.body.dataset.billingTicks") == "1"

    # At $3,600/h ($1 a second) the figures move between pushes: the cost up, the balance down.
    push(
        org,
        "billing.cost",
        {
            "as_of": timezone.now().isoformat(),
            "balance": "5000.00",
            "unrated": "0.00",
            "per_hour": "3600",
            "reservations": {rid: {"cost": "100.00", "per_hour": "3600"}},
        },
    )
    page.wait_for_function("document.body.dataset.billingTicks === '2'")
    page.wait_for_function(
        """([sel]) => { const text = document.querySelector(sel).textContent;
                        return text.startsWith("$1") && parseFloat(text.slice(1).replace(/,/g, "")) > 100; }""",
        arg=[cost],
    )
    page.wait_for_function(
        "parseFloat(document.querySelector('main [data-live-balance]').textContent.slice(1).replace(/,/g, '')) < 5000"
    )
    assert page.evaluate("document.body.dataset.billingTicks") == "2"  # it moved on its own, not by a push
    assert page.locator("[data-live-burn]").first.inner_text() == "$3,600.00"
    first = money_of(page, cost)
    page.wait_for_function(
        "([sel, seen]) => parseFloat(document.querySelector(sel).textContent.slice(1).replace(/,/g, '')) > seen",
        arg=[cost, float(first)],
    )

    # The ledger changed (billing.balance): the balance snaps to it, the other fields follow.
    push(org, "billing.cost", {"as_of": "", "balance": "1.00", "per_hour": "0", "reservations": {}})
    push(
        org,
        "billing.balance",
        {
            "balance": "777.00",
            "available": "700.00",
            "held": "77.00",
            "credit_limit": "50.00",
            "spent": "10.00",
            "spent_this_month": "10.00",
            "depleted_at": None,
        },
    )
    page.wait_for_function("document.body.dataset.billingBalances === '1'")
    page.locator("main [data-live-balance]", has_text="$777.00").wait_for()

    # A notice arrives as a banner.
    push(
        org,
        "billing.notice",
        {
            "kind": "balance_depleted",
            "message": "Your balance has run out. Add credit before 2030-01-01 10:00 UTC.",
            "at": timezone.now().isoformat(),
        },
    )
    page.locator(".notice-banner.notice-balance_depleted", has_text="Add credit before 2030-01-01").wait_for()

    # The beat's own tick, from the rows: the real running cost (cents of an active minute or so).
    off_the_browser_thread(cost_tick)
    page.wait_for_function("document.body.dataset.billingTicks === '4'")
    assert Decimal("0") <= money_of(page, cost) < Decimal("5")
    assert money_of(page, "main [data-live-balance]") > Decimal("99000")
    assert page.evaluate("window.sameDocument") is True
    page.screenshot(path=f"{shots}/reservation-cost.png", full_page=True)

    # The dashboard shows the same reservation running, and its cost follows the pushes too.
    page.goto("/")
    page.wait_for_function("document.body.dataset.live === 'on'")
    before = page.locator(cost).inner_text()
    push(
        org,
        "billing.cost",
        {
            "as_of": timezone.now().isoformat(),
            "balance": "900.00",
            "per_hour": "3600",
            "reservations": {rid: {"cost": "250.00", "per_hour": "3600"}},
        },
    )
    page.wait_for_function("document.body.dataset.billingTicks === '1'")
    page.wait_for_function(
        "([sel]) => parseFloat(document.querySelector(sel).textContent.slice(1).replace(/,/g, '')) > 250",
        arg=[cost],
    )
    assert before != page.locator(cost).inner_text()
    page.screenshot(path=f"{shots}/dashboard.png", full_page=True)

    # Two hours rated and the month finalized: the billing page charts it, the invoice prints.
    reservation.refresh_from_db()
    off_the_browser_thread(
        usage_rate, now=reservation.activated_at + timedelta(hours=2), reservation_ids=[reservation.pk]
    )
    off_the_browser_thread(invoice_month, month=month_start(reservation.activated_at))
    invoice = Invoice.objects.get(organization_id=org)
    page.goto("/billing/")
    page.locator("[data-spend-chart] canvas").first.wait_for()
    assert invoice.number in page.locator("table.invoices").inner_text()
    page.screenshot(path=f"{shots}/billing.png", full_page=True)
    page.get_by_role("link", name=invoice.number).click()
    page.get_by_role("button", name="Print").wait_for()
    assert "$40.00" in page.locator(".invoice-total").inner_text()
    page.emulate_media(media="print")
    assert page.locator(".topbar").is_hidden() and page.get_by_role("button", name="Print").is_hidden()
    page.screenshot(path=f"{shots}/invoice-print.png", full_page=True)
    page.emulate_media(media="screen")
    page.screenshot(path=f"{shots}/invoice.png", full_page=True)
    assert not errors, errors
    context.close()
