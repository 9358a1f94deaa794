"""Operators' admin: every registered model's pages render, and node actions go through the lifecycle."""

from datetime import timedelta

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from marketplace.models import Quota, Reservation
from marketplace.services.reservations.lifecycle import reservation_create, reservations_advance
from marketplace.services.tenancy.api_keys import api_key_create
from provisioning.choices import NodeState
from provisioning.models import Node
from tests.factories import PASSWORD, OfferFactory, make_node, make_tenant

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
