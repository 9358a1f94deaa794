"""The portal shows provisioning as it happens: real Chromium on daphne, with the worker, beat and a
simulated agent doing the work (the processes are tests/e2e's ``stack``)."""

import pytest
from django.test import Client

from marketplace.models import Reservation
from tests.e2e.conftest import stack, wait_for  # noqa: F401 - stack: the processes' fixture (requested below)
from tests.e2e.test_provisioning import api_for_new_tenant, connected, fleet_of
from tests.factories import PASSWORD

pytestmark = [pytest.mark.slow]


def test_the_reservation_page_follows_provisioning_live(stack, tmp_path, request):  # noqa: F811 - the fixture
    nodes, offer, tokens = fleet_of(1)
    stack.start_daphne()
    stack.start_worker()
    stack.start_beat(tmp_path / "beat-schedule")
    stack.start_agents(tokens, tmp_path / "agents", "--speed", "0.4")  # slow enough to watch
    wait_for(lambda: connected(nodes), timeout=60, what="the agent to connect")
    api = api_for_new_tenant(stack)
    status, body = api.call("POST", "/api/v1/reservations/", {"offer": offer.id, "duration_hours": 1})
    assert status == 201, body
    member = Reservation.objects.get(pk=body["id"]).created_by

    # The browser last: its event loop runs on this thread from here on (see conftest.py).
    browser = request.getfixturevalue("chromium")
    context = browser.new_context(base_url=stack.base)
    page = context.new_page()
    page.set_default_timeout(60_000)  # CI machines are small and busy: generous, never a timing assertion
    # Signed in with a session made here (the sign-in form itself is covered by test_portal).
    session = Client()
    assert session.login(username=member.email, password=PASSWORD)
    context.add_cookies([{"name": "sessionid", "value": session.cookies["sessionid"].value, "url": stack.base}])
    page.goto(f"/reservations/{body['id']}/")
    page.wait_for_function("document.body.dataset.live === 'on'")
    page.evaluate("window.sameDocument = true")
    row = page.locator(f'tr[data-node="{nodes[0].hostname}"]')
    # Progress arrives over the WebSocket: the percentage grows without a reload.
    page.wait_for_function(
        """([host]) => { const cell = document.querySelector(`tr[data-node="${host}"] .pct`);
                         return cell && parseInt(cell.textContent) > 0 && parseInt(cell.textContent) < 100; }""",
        arg=[nodes[0].hostname],
    )
    assert page.evaluate("window.sameDocument") is True
    page.screenshot(path=str(tmp_path / "provisioning.png"), full_page=True)
    assert "provision" in row.inner_text()
    page.locator("#reservation-state", has_text="active").wait_for(timeout=90_000)
    # Active (the page reloads once): the GPUs' charts follow the node's telemetry, tick by tick.
    page.locator('[data-telemetry-live="on"]').wait_for()
    page.wait_for_function("parseInt(document.querySelector('[data-telemetry]').dataset.frames) >= 3")
    assert page.locator("[data-gpu]").count() == 8
    page.screenshot(path=str(tmp_path / "active.png"), full_page=True)
    context.close()
