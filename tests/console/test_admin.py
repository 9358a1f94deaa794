"""Operators' admin: every registered model's pages render, and node actions go through the lifecycle."""

import re
from datetime import timedelta

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from marketplace.models import Quota, Reservation
from marketplace.services.reservations.lifecycle import reservation_cancel, reservation_create, reservations_advance
from marketplace.services.reservations.provisioning import reservation_force_release
from marketplace.services.tenancy.api_keys import api_key_create
from provisioning.choices import NodeState
from provisioning.models import Node
from tests.factories import PASSWORD, OfferFactory, activate, make_node, make_tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(tenant):
    node = make_node()
    offer = OfferFactory(site=node.rack.site, accelerator_type=node.accelerator_type)
    api_key_create(tenant=tenant, name="ci")
    reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=timezone.now() + timedelta(hours=1))
    Quota.objects.create(organization=tenant.organization, accelerator_type=node.accelerator_type, max_gpus=64)
    return node


@pytest.mark.parametrize("model", list(admin.site._registry), ids=lambda m: m._meta.label)
def test_every_admin_list_and_change_page_renders(operator_client, world, model):
    opts = model._meta
    listing = operator_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist") + "?q=a")
    assert listing.status_code == 200
    instance = model.objects.first()
    if instance is not None:
        change = operator_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[instance.pk]))
        assert change.status_code == 200


def test_drain_action_moves_legal_nodes_and_reports_illegal_ones(operator_client):
    available = make_node(state=NodeState.AVAILABLE)
    offline = make_node(state=NodeState.OFFLINE)
    response = operator_client.post(
        reverse("admin:provisioning_node_changelist"),
        {"action": "move_to_draining", "_selected_action": [available.pk, offline.pk]},
        follow=True,
    )
    text = response.content.decode()
    assert "1 node(s) now draining" in text and "cannot move from offline to draining" in text
    assert Node.objects.get(pk=available.pk).state == NodeState.DRAINING
    assert Node.objects.get(pk=offline.pk).state == NodeState.OFFLINE
    assert available.state_changes.first().actor == "ops@example.com"


def test_tenants_cannot_open_the_admin():
    owner = make_tenant()
    client = Client()
    client.login(username=owner.user.email, password=PASSWORD)
    response = client.get("/admin/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_force_release_frees_the_nodes_now(operator_client, world, tenant):
    reservation = Reservation.objects.get()
    reservations_advance()  # started
    response = operator_client.post(
        reverse("admin:marketplace_reservation_changelist"),
        {"action": "force_release", "_selected_action": [reservation.pk]},
        follow=True,
    )
    assert "their nodes are free" in response.content.decode()
    reservation.refresh_from_db()
    assert reservation.state == "completed" and "ops@example.com" in reservation.failure_reason
    assert not reservation.allocations.filter(live=True).exists()


def test_a_nodes_page_shows_which_of_its_gpus_each_reservation_holds_when(operator_client, tenant, other_tenant):
    node = make_node()
    site, accelerator = node.rack.site, node.accelerator_type
    pair = OfferFactory(site=site, accelerator_type=accelerator, gpus_per_instance=2)
    four = OfferFactory(site=site, accelerator_type=accelerator, gpus_per_instance=4)
    now = timezone.now()
    held_now = reservation_create(tenant=tenant, offer=pair, quantity=1, start=None, end=now + timedelta(days=1))
    later = reservation_create(
        tenant=other_tenant, offer=four, quantity=1, start=now + timedelta(days=3), end=now + timedelta(days=5)
    )
    never = reservation_create(
        tenant=other_tenant, offer=pair, quantity=1, start=now + timedelta(days=2), end=now + timedelta(days=4)
    )
    reservation_cancel(tenant=other_tenant, reservation=never)  # cancelled before its start: it held nothing
    beyond = reservation_create(
        tenant=tenant, offer=pair, quantity=1, start=now + timedelta(days=20), end=now + timedelta(days=21)
    )

    page = operator_client.get(reverse("admin:provisioning_node_change", args=[node.pk])).content.decode()
    chart = page[page.index("data-occupancy") :]
    assert chart.count('class="lane"') == 8  # a row per GPU
    holdings = re.findall(r"<tr data-holding>(.+?)</tr>", chart, re.S)
    assert len(holdings) == 2  # the cancelled one held nothing, the one in three weeks is past the window
    for reservation, organization in [(held_now, tenant.organization), (later, other_tenant.organization)]:
        allocation = reservation.allocations.get()
        row = next(h for h in holdings if reservation.id.hex[:8] in h)
        assert allocation.gpu_label in row and organization.name in row
        assert reverse("admin:marketplace_reservation_change", args=[reservation.pk]) in row
        for index in allocation.gpu_indices:  # a bar on each of its GPUs' rows, and none on the others
            lane = re.search(rf'<div class="lane" data-gpu="{index}">(.+?)</div>\s*</div>', chart, re.S).group(1)
            assert reservation.id.hex[:8] in lane
    held = set(held_now.allocations.get().gpu_indices) | set(later.allocations.get().gpu_indices)
    for index in set(range(8)) - held:
        lane = re.search(rf'<div class="lane" data-gpu="{index}">(.+?)</div>\s*</div>', chart, re.S).group(1)
        assert 'class="bar' not in lane
    assert beyond.id.hex[:8] not in chart and never.id.hex[:8] not in chart


def test_the_reservation_and_allocation_admin_show_the_gpu_range(operator_client, tenant):
    node = make_node()
    pair = OfferFactory(site=node.rack.site, accelerator_type=node.accelerator_type, gpus_per_instance=2)
    reservation = reservation_create(tenant=tenant, offer=pair, quantity=1, start=None, end=None, duration_hours=1)
    label = reservation.allocations.get().gpu_label
    assert label.startswith("GPUs ")
    listing = operator_client.get(reverse("admin:marketplace_reservation_changelist")).content.decode()
    assert f"{node.hostname} · {label}" in listing
    change = operator_client.get(reverse("admin:marketplace_reservation_change", args=[reservation.pk]))
    assert label in change.content.decode()
    allocations = operator_client.get(reverse("admin:marketplace_allocation_changelist")).content.decode()
    assert label in allocations


def test_a_released_reservation_shows_on_the_node_until_it_really_ended(operator_client, tenant):
    node = make_node()
    pair = OfferFactory(site=node.rack.site, accelerator_type=node.accelerator_type, gpus_per_instance=2)
    booked_end = timezone.now() + timedelta(days=2)
    released = activate(reservation_create(tenant=tenant, offer=pair, quantity=1, start=None, end=booked_end))
    released = reservation_force_release(reservation=released, actor="ops@example.com")
    assert released.state == "completed" and not released.allocations.get().live

    page = operator_client.get(reverse("admin:provisioning_node_change", args=[node.pk])).content.decode()
    [row] = re.findall(r"<tr data-holding>(.+?)</tr>", page, re.S)
    assert "completed" in row and released.deactivated_at.strftime("%Y-%m-%d %H:%M") in row
    assert booked_end.strftime("%Y-%m-%d %H:%M") not in row  # not its booked end: the GPUs are free again
    assert 'class="bar tone-0 done"' in page
