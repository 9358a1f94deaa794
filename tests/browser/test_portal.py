import os

import pytest

from marketplace.models import ApiKey, Endpoint, OfferTermDiscount, Reservation
from marketplace.services.tenancy.api_keys import api_key_authenticate
from tests.factories import PASSWORD, OfferFactory, RackFactory, make_node, make_served_model

pytestmark = pytest.mark.django_db(transaction=True)


def sign_in(page, email):
    page.goto("/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/catalog/")


def test_a_member_browses_the_catalog_and_manages_an_api_key(page, tenant, tmp_path):
    rack = RackFactory()
    make_node(rack=rack)
    make_node(rack=rack, state="maintenance")
    offer = OfferFactory(site=rack.site)

    sign_in(page, tenant.user.email)
    row = page.locator(f'tr[data-offer="{offer.id}"]')
    assert "1 / 2 nodes" in row.inner_text()
    assert tenant.organization.name in page.locator("#org-select").inner_text()
    page.screenshot(path=os.environ.get("SCREENSHOT_DIR", str(tmp_path)) + "/catalog.png", full_page=True)

    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Name").fill("notebook")
    page.get_by_role("button", name="Create key").click()
    plaintext = page.locator("#new-key").inner_text()
    assert api_key_authenticate(raw_key=plaintext).name == "notebook"
    page.screenshot(path=os.environ.get("SCREENSHOT_DIR", str(tmp_path)) + "/api-keys.png", full_page=True)

    page.goto("/api-keys/")
    assert plaintext not in page.content()  # shown once only
    key = ApiKey.objects.get(name="notebook")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f'tr[data-key="{key.prefix}"]').get_by_role("button", name="Revoke").click()
    page.get_by_text("Revoked notebook").wait_for()
    assert "revoked" in page.locator(f'tr[data-key="{key.prefix}"]').inner_text()
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_a_member_reserves_from_the_catalog_seeing_the_price_first(page, tenant, tmp_path):
    """Whole nodes, then a 1-GPU instance of the node left: the same steps, without a number to choose."""

    rack = RackFactory()
    for _ in range(3):
        make_node(rack=rack)
    offer = OfferFactory(site=rack.site)
    one_gpu = OfferFactory(site=rack.site, gpus_per_instance=1)
    shots = os.environ.get("SCREENSHOT_DIR", str(tmp_path))

    sign_in(page, tenant.user.email)
    page.locator(f'tr[data-offer="{offer.id}"]').get_by_role("link", name="Reserve").click()
    page.get_by_role("spinbutton", name="Nodes").fill("2")
    page.get_by_label("Duration (hours)").fill("4")
    page.get_by_role("button", name="See the price").click()
    assert "$159.36" in page.locator("table.quote").inner_text()  # 16 GPUs x 4 h x $2.49
    page.screenshot(path=f"{shots}/reserve.png", full_page=True)
    page.get_by_role("button", name="Confirm reservation").click()
    page.wait_for_url("**/reservations/*/")
    assert page.locator("#reservation-state").inner_text() == "pending"
    reservation = Reservation.objects.get()
    assert reservation.node_count == 2 and reservation.created_by == tenant.user
    page.screenshot(path=f"{shots}/reservation.png", full_page=True)

    page.get_by_role("link", name="Catalog").click()
    row = page.locator(f'tr[data-offer="{one_gpu.id}"]')
    assert "Slice of a node" in row.inner_text() and "8 / 24 instances" in row.inner_text()  # one node is left
    row.get_by_role("link", name="Reserve").click()
    assert page.get_by_role("spinbutton", name="Nodes").count() == 0  # one instance: nothing to count
    assert page.get_by_text("One instance: 1 GPU of one 8-GPU node.").is_visible()
    page.get_by_label("Duration (hours)").fill("4")
    page.get_by_role("button", name="See the price").click()
    quote = page.locator("table.quote").inner_text()
    assert "1 instance · 1 GPU of one 8-GPU node" in quote and "$2.49/h per instance" in quote
    assert "$9.96" in quote  # 1 GPU x 4 h x $2.49
    page.get_by_role("button", name="Confirm reservation").click()
    page.wait_for_url("**/reservations/*/")
    instance = Reservation.objects.get(offer=one_gpu)
    allocation = instance.allocations.get()
    assert allocation.node_id not in set(reservation.allocations.values_list("node_id", flat=True))
    assert page.locator("[data-capacity]").inner_text().startswith(f"{allocation.node.hostname} · GPU 0")
    page.screenshot(path=f"{shots}/reservation-instance.png", full_page=True)


def test_choosing_a_reserved_term_hides_the_duration(page, tenant):
    rack = RackFactory()
    make_node(rack=rack)
    offer = OfferFactory(site=rack.site)
    OfferTermDiscount.objects.create(offer=offer, term_months=3, percent_off=20)

    sign_in(page, tenant.user.email)
    page.goto(f"/offers/{offer.id}/reserve/")
    duration = page.get_by_label("Duration (hours)")
    assert duration.is_visible() and page.get_by_text("Leave empty to start now.").is_visible()
    page.get_by_label("Pricing").select_option("3")
    duration.wait_for(state="hidden")
    page.get_by_label("Pricing").select_option("")
    duration.wait_for(state="visible")


def test_a_member_deploys_an_endpoint_and_sees_its_replicas(page, tenant, tmp_path):
    make_served_model(region="eu-central")
    sign_in(page, tenant.user.email)
    page.get_by_role("link", name="Endpoints").click()
    page.get_by_role("link", name="Deploy an endpoint").click()
    page.get_by_role("textbox", name="Name").fill("embed")
    assert not page.get_by_label("Pinned sites").is_visible()  # pinned placement only
    page.locator("select[name=placement]").select_option("pinned")
    assert page.get_by_label("Pinned sites").is_visible()
    page.locator("select[name=placement]").select_option("nearest")
    page.get_by_label("Min replicas").fill("2")
    page.get_by_label("Max replicas").fill("2")
    shots = os.environ.get("SCREENSHOT_DIR", str(tmp_path))
    page.screenshot(path=f"{shots}/endpoint-new.png", full_page=True)
    page.get_by_role("button", name="Deploy").click()
    page.wait_for_url("**/endpoints/*/")
    endpoint = Endpoint.objects.get()
    assert page.locator("#endpoint-state").inner_text() == "deploying"
    rows = page.locator("table.replicas tbody tr[data-replica]")
    assert rows.count() == 2
    hostname = endpoint.replicas.first().reservation.allocations.get().node.hostname
    assert hostname in rows.first.inner_text() and "starting" in rows.first.inner_text()
    assert 'model="embed"' in page.locator("#snippet-python").inner_text()
    page.screenshot(path=f"{shots}/endpoint.png", full_page=True)
