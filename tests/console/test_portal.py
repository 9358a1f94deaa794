import re
from decimal import Decimal

import pytest
from django.test import Client

from marketplace.choices import Role
from marketplace.models import ApiKey, OfferTermDiscount
from marketplace.services.reservations.lifecycle import reservation_create
from marketplace.services.tenancy.api_keys import api_key_authenticate
from tests.factories import PASSWORD, AcceleratorTypeFactory, OfferFactory, RackFactory, make_node, make_tenant

pytestmark = pytest.mark.django_db


def signed_in(tenant) -> Client:
    browser = Client()
    response = browser.post("/login/", {"username": tenant.user.email, "password": PASSWORD})
    assert response.status_code == 302, response.content
    return browser


def test_sign_in_with_a_wrong_password_says_so(tenant):
    response = Client().post("/login/", {"username": tenant.user.email, "password": "wrong"})
    assert response.status_code == 200 and b"correct email" in response.content


def test_pages_need_a_signed_in_user():
    for path in ["/catalog/", "/api-keys/"]:
        response = Client().get(path)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_catalog_lists_offers_with_availability_and_filters(tenant):
    rack = RackFactory()
    make_node(rack=rack)
    make_node(rack=rack, state="draining")
    h100 = OfferFactory(site=rack.site)
    l40s = OfferFactory(site=rack.site, accelerator_type=AcceleratorTypeFactory(slug="l40s-48gb", model="L40S"))
    browser = signed_in(tenant)
    page = browser.get("/catalog/").content.decode()
    assert f'data-offer="{h100.id}"' in page and f'data-offer="{l40s.id}"' in page
    assert "1 / 2 nodes" in page and "0 / 0 nodes" in page
    filtered = browser.get("/catalog/?accelerator=l40s-48gb").content.decode()
    assert f'data-offer="{l40s.id}"' in filtered and f'data-offer="{h100.id}"' not in filtered
    bad = browser.get("/catalog/?max_price=lots").content.decode()
    assert "Enter a number" in bad


def test_the_catalog_lists_instances_and_filters_by_their_size(tenant):
    rack = RackFactory()
    for _ in range(3):
        make_node(rack=rack)
    node = OfferFactory(site=rack.site)
    one = OfferFactory(site=rack.site, gpus_per_instance=1)
    two = OfferFactory(site=rack.site, gpus_per_instance=2)
    reservation_create(tenant=tenant, offer=one, quantity=1, start=None, end=None, duration_hours=1)
    browser = signed_in(tenant)
    page = browser.get("/catalog/").content.decode()
    row = re.search(rf'<tr data-offer="{one.id}">(.+?)</tr>', page, re.S).group(1)
    assert "1× H100 SXM" in row and "Slice of a node" in row and "1 of the 8 GPUs of a node" in row
    assert row.count('<td class="num">2.49</td>') == 2  # per GPU-hour and per instance-hour
    assert "23 / 24 instances" in row  # one GPU of one node is held
    assert "4.98" in re.search(rf'<tr data-offer="{two.id}">(.+?)</tr>', page, re.S).group(1)
    whole = re.search(rf'<tr data-offer="{node.id}">(.+?)</tr>', page, re.S).group(1)
    assert "8× H100 SXM" in whole and "Whole node" in whole and "19.92" in whole and "2 / 3 nodes" in whole
    sizes = re.search(r'<select name="gpus_per_instance">(.+?)</select>', page, re.S).group(1)
    assert re.findall(r'<option value="(\d+)"', sizes) == ["1", "2", "8"]
    filtered = browser.get("/catalog/?gpus_per_instance=1").content.decode()
    assert f'data-offer="{one.id}"' in filtered and f'data-offer="{two.id}"' not in filtered
    assert f'data-offer="{node.id}"' not in filtered and '<option value="1" selected>' in filtered
    slices = browser.get("/catalog/?kind=slice").content.decode()
    assert f'data-offer="{two.id}"' in slices and f'data-offer="{node.id}"' not in slices


def test_a_price_is_rounded_to_the_cent_alike_on_the_catalog_and_the_reserve_page(tenant):
    """One rounding for money (marketplace.money.cents, half to even, as invoices round): a price of
    $2.4850 reads $2.48 wherever a page shows it in cents, never $2.49 on one page and $2.48 on another."""
    offer = OfferFactory(price_per_gpu_hour=Decimal("2.4850"))
    OfferTermDiscount.objects.create(offer=offer, term_months=1, percent_off=Decimal("10"))  # terms: a choice
    browser = signed_in(tenant)
    row = re.search(rf'<tr data-offer="{offer.id}">(.+?)</tr>', browser.get("/catalog/").content.decode(), re.S)
    assert '<td class="num">2.48</td>' in row.group(1) and "2.49" not in row.group(1)
    reserve = browser.get(f"/offers/{offer.id}/reserve/").content.decode()
    assert "$2.48 per GPU-hour" in reserve and "On demand · $2.48/GPU-h" in reserve and "$2.49" not in reserve


def test_an_api_key_is_shown_once_then_only_its_prefix(tenant):
    browser = signed_in(tenant)
    response = browser.post("/api-keys/", {"name": "laptop", "role": "member"})
    assert response.status_code == 200
    page = response.content.decode()
    plaintext = re.search(r'<code id="new-key">([^<]+)</code>', page).group(1)
    key = api_key_authenticate(raw_key=plaintext)
    assert key.name == "laptop" and key.created_by == tenant.user
    later = browser.get("/api-keys/").content.decode()
    assert plaintext not in later and f"nck_{key.prefix}_…" in later
    assert plaintext not in str(dict(browser.session))  # never parked in the session


def test_revoke_from_the_portal(tenant):
    browser = signed_in(tenant)
    browser.post("/api-keys/", {"name": "old"})
    key = ApiKey.objects.get(name="old")
    response = browser.post(f"/api-keys/{key.id}/revoke/", follow=True)
    assert "Revoked old" in response.content.decode()
    key.refresh_from_db()
    assert key.status == "revoked"


def test_a_viewer_is_offered_only_viewer_keys_and_cannot_forge_more():
    viewer = make_tenant(role=Role.VIEWER)
    browser = signed_in(viewer)
    page = browser.get("/api-keys/").content.decode()
    assert 'value="viewer"' in page and 'value="member"' not in page
    response = browser.post("/api-keys/", {"name": "sneaky", "role": "owner"})
    assert response.status_code == 400 and not ApiKey.objects.exists()


def test_invalid_key_form_changes_nothing(tenant):
    browser = signed_in(tenant)
    response = browser.post("/api-keys/", {"name": "", "expires_in_days": "-3"})
    assert response.status_code == 400 and not ApiKey.objects.exists()
