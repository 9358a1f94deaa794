import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.choices import Role
from marketplace.models import OfferTermDiscount, Reservation
from marketplace.services.reservations.lifecycle import reservation_create
from tests.factories import PASSWORD, OfferFactory, make_tenant

pytestmark = pytest.mark.django_db


def browser_for(tenant) -> Client:
    client = Client()
    assert client.login(username=tenant.user.email, password=PASSWORD)
    return client


def test_reserve_shows_the_price_then_confirms_once(tenant, offer):
    browser = browser_for(tenant)
    page = browser.get(f"/offers/{offer.id}/reserve/").content.decode()
    assert "Free nodes per hour" in page
    key = re.search(r'name="idempotency_key" value="([0-9a-f]+)"', page).group(1)
    form = {"quantity": 2, "start": "", "duration_hours": "3", "idempotency_key": key}
    review = browser.post(f"/offers/{offer.id}/reserve/", form).content.decode()
    assert "Estimated total" in review and "$119.52" in review  # 16 GPUs x 3 h x $2.49
    assert not Reservation.objects.exists()
    confirmed = browser.post(f"/offers/{offer.id}/reserve/", {**form, "confirm": "1"})
    reservation = Reservation.objects.get()
    assert confirmed.status_code == 302 and confirmed["Location"] == f"/reservations/{reservation.id}/"
    # A double click sends the same form again: still one reservation, same page.
    again = browser.post(f"/offers/{offer.id}/reserve/", {**form, "confirm": "1"})
    assert again["Location"] == confirmed["Location"] and Reservation.objects.count() == 1
    detail = browser.get(confirmed["Location"]).content.decode()
    assert "pending" in detail and reservation.allocations.first().node.hostname in detail


def test_a_refusal_is_shown_on_the_form(tenant, offer):
    response = browser_for(tenant).post(
        f"/offers/{offer.id}/reserve/", {"quantity": 9, "duration_hours": "1", "confirm": "1"}
    )
    assert response.status_code == 409 and "Only 3 of the 9 nodes" in response.content.decode()


def test_viewers_see_prices_but_cannot_confirm(offer):
    viewer = make_tenant(role=Role.VIEWER)
    browser = browser_for(viewer)
    review = browser.post(f"/offers/{offer.id}/reserve/", {"quantity": 1, "duration_hours": "1"}).content.decode()
    assert "Estimated total" in review and "you can look, not reserve" in review
    refused = browser.post(f"/offers/{offer.id}/reserve/", {"quantity": 1, "duration_hours": "1", "confirm": "1"})
    assert refused.status_code == 403 and not Reservation.objects.exists()


def test_list_filter_cancel_and_extend_from_the_portal(tenant, offer):
    start = timezone.now() + timedelta(hours=2)
    reservation = reservation_create(
        tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=1)
    )
    browser = browser_for(tenant)
    assert f'data-reservation="{reservation.id}"' in browser.get("/reservations/?state=pending").content.decode()
    assert f'data-reservation="{reservation.id}"' not in browser.get("/reservations/?state=active").content.decode()
    new_end = (start + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M")
    extended = browser.post(f"/reservations/{reservation.id}/", {"action": "extend", "end": new_end}, follow=True)
    assert "Extended." in extended.content.decode()
    reservation.refresh_from_db()
    assert reservation.end.strftime("%Y-%m-%dT%H:%M") == new_end
    browser.post(f"/reservations/{reservation.id}/", {"action": "cancel"})
    reservation.refresh_from_db()
    assert reservation.state == "cancelled"
    again = browser.post(f"/reservations/{reservation.id}/", {"action": "cancel"})
    assert again.status_code == 409


def test_another_tenants_reservation_page_is_404(tenant, other_tenant, offer):
    theirs = reservation_create(
        tenant=other_tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=1)
    )
    browser = browser_for(tenant)
    assert browser.get(f"/reservations/{theirs.id}/").status_code == 404
    assert browser.post(f"/reservations/{theirs.id}/", {"action": "cancel"}).status_code == 404
    theirs.refresh_from_db()
    assert theirs.state == "pending"


@pytest.mark.parametrize("confirm", [False, True])
@pytest.mark.parametrize(
    "form,field,words",
    [
        ({"start": "9999-12-31T23:00", "duration_hours": "1"}, "start", "at most 366 days ahead"),
        ({"start": "9999-12-31T23:00", "term_months": "1"}, "start", "at most 366 days ahead"),
        ({"start": "0001-01-01T00:00", "duration_hours": "1"}, "start", "in the past"),
        ({"duration_hours": "99999999999"}, "duration_hours", "At most 43,920 hours."),
        ({"duration_hours": "9000"}, "duration_hours", "at most 2,160 hours"),
        ({"duration_hours": "0.001"}, "duration_hours", "At least 0.02 hours."),
    ],
)
def test_reserve_refusals_at_the_calendar_edges_name_their_field(tenant, offer, form, field, words, confirm):
    OfferTermDiscount.objects.create(offer=offer, term_months=1, percent_off=10)
    response = browser_for(tenant).post(
        f"/offers/{offer.id}/reserve/", {"quantity": 1, **form, **({"confirm": "1"} if confirm else {})}
    )
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert list(errors) == [field] and words in errors[field][0], errors
    assert "digits" not in response.content.decode()
    assert not Reservation.objects.exists()


def test_extend_from_the_portal_by_hours_or_refused_on_its_field(tenant, offer):
    reservation = reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=None, duration_hours=1)
    browser = browser_for(tenant)
    page = browser.get(f"/reservations/{reservation.id}/").content.decode()
    assert 'name="duration_hours"' in page
    extended = browser.post(f"/reservations/{reservation.id}/", {"action": "extend", "duration_hours": "2.5"})
    assert extended.status_code == 302
    old_end = reservation.end
    reservation.refresh_from_db()
    assert reservation.end == old_end + timedelta(hours=2.5)
    for form, field, words in [
        ({"duration_hours": "5000"}, "duration_hours", "at most 2,160 hours"),
        ({"duration_hours": "1e12"}, "duration_hours", "At most 43,920 hours."),
        ({"end": "9999-12-31T23:00"}, "end", "at most 2,160 hours"),
        ({"end": "2030-01-01T00:00", "duration_hours": "1"}, "end", "either a new end or the hours"),
    ]:
        refused = browser.post(f"/reservations/{reservation.id}/", {"action": "extend", **form})
        assert refused.status_code == 400, form
        errors = refused.context["extend_form"].errors
        assert words in errors[field][0], (form, errors)
        assert Reservation.objects.get().end == old_end + timedelta(hours=2.5)


@pytest.fixture
def one_gpu(offer):
    """A 1-GPU instance of the offer's 8-GPU nodes, at its price."""
    return OfferFactory(
        site=offer.site, accelerator_type=offer.accelerator_type, gpus_per_instance=1, price_per_gpu_hour="2.49"
    )


def test_reserve_a_1_gpu_instance_as_a_node_then_see_its_node_and_gpu(tenant, offer, one_gpu):
    browser = browser_for(tenant)
    page = browser.get(f"/offers/{one_gpu.id}/reserve/").content.decode()
    # No number of nodes to choose: one instance, said so; the calendar counts instances of one GPU.
    assert 'type="hidden" name="quantity" value="1"' in page and "One instance: 1 GPU of one 8-GPU node" in page
    assert "Free instances per hour" in page and "(1 GPU each)" in page and "24 instances, 24 GPUs" in page
    key = re.search(r'name="idempotency_key" value="([0-9a-f]+)"', page).group(1)
    form = {"quantity": 1, "start": "", "duration_hours": "4", "idempotency_key": key}
    review = browser.post(f"/offers/{one_gpu.id}/reserve/", form).content.decode()
    capacity = re.search(r"<td data-quote-capacity>(.+?)</td>", review).group(1)
    assert capacity == "1 instance · 1 GPU of one 8-GPU node"
    assert "$2.4900 per GPU-hour · on demand · $2.49/h per instance" in review and "$9.96" in review  # 1 GPU, 4 h
    confirmed = browser.post(f"/offers/{one_gpu.id}/reserve/", {**form, "confirm": "1"})
    reservation = Reservation.objects.get()
    assert confirmed.status_code == 302 and confirmed["Location"] == f"/reservations/{reservation.id}/"
    allocation = reservation.allocations.get()
    assert (reservation.gpu_count, list(allocation.gpu_indices)) == (1, [allocation.gpus.lower])

    detail = browser.get(confirmed["Location"]).content.decode()
    held = f"<code>{allocation.node.hostname}</code> · GPU {allocation.gpus.lower}"
    assert held in re.search(r"<td data-capacity>(.+?)</td>", detail, re.S).group(1)
    assert "(1 of its 8 GPUs)" in detail and "$2.49/h per instance" in detail
    row = re.search(rf'<tr data-allocation="{allocation.node.hostname}">(.+?)</tr>', detail, re.S).group(1)
    assert f"GPU {allocation.gpus.lower}" in row and "of 8" in row
    assert held in browser.get("/reservations/").content.decode()  # the list says it too


def test_a_slice_refuses_more_than_one_instance_on_the_form(tenant, one_gpu):
    response = browser_for(tenant).post(
        f"/offers/{one_gpu.id}/reserve/", {"quantity": 3, "duration_hours": "1", "confirm": "1"}
    )
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert list(errors) == ["quantity"] and "use quantity 1" in errors["quantity"][0]
    page = response.content.decode()
    assert 'type="hidden" name="quantity"' in page and "use quantity 1" in page  # shown, though the field is hidden
    assert not Reservation.objects.exists()


def test_a_whole_node_reservation_page_says_it_holds_all_the_gpus(tenant, offer):
    reservation = reservation_create(tenant=tenant, offer=offer, quantity=2, start=None, end=None, duration_hours=1)
    detail = browser_for(tenant).get(f"/reservations/{reservation.id}/").content.decode()
    assert "2 nodes · 16 GPUs" in detail and "$19.92/h per node" in detail
    for allocation in reservation.allocations.all():
        row = re.search(rf'<tr data-allocation="{allocation.node.hostname}">(.+?)</tr>', detail, re.S).group(1)
        assert "GPUs 0–7" in row and "(all)" in row
