"""The admin is one more caller of the services: each write an operator makes there (a page saved,
added or deleted, a row of the list edited, an inline row) obeys the service's rules -- lifecycle
moves, validation, events -- and a refusal saves nothing and says why on the page."""

import asyncio
from datetime import timedelta
from decimal import Decimal
from html.parser import HTMLParser

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone

from console.kernel.admin import ReadOnlyAdmin, ServiceAdmin
from console.kernel.errors import DomainError
from console.kernel.events import FLEET_GROUP
from marketplace.models import (
    ApiKey,
    Membership,
    Offer,
    OfferPrice,
    OfferTermDiscount,
    Organization,
    Quota,
    Replica,
    ServedModel,
    User,
)
from marketplace.services.billing.pricing import offer_price_set
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.lifecycle import endpoint_create
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.reservations.lifecycle import MAX_DURATION_HOURS, QuotaExceeded, reservation_create
from marketplace.services.tenancy.api_keys import api_key_create
from marketplace.services.tenancy.members import organization_delete
from provisioning.choices import NodeState
from provisioning.models import Gpu, Node, NodeCommand, NodeCredential, Rack, RegionSiteLatency, Site
from provisioning.services.agents import agent_group, bootstrap_token_create, node_command_issue, node_enrol
from tests.factories import (
    AcceleratorTypeFactory,
    OfferFactory,
    RackFactory,
    make_node,
    make_offer_with_nodes,
    make_quota,
    make_tenant,
    make_user,
)

pytestmark = pytest.mark.django_db


class _FormReader(HTMLParser):
    """What a browser would send for the page's form: every named input, select and textarea."""

    def __init__(self):
        super().__init__()
        self.data: dict[str, str] = {}
        self._select = self._textarea = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        name = attrs.get("name")
        if tag == "input" and name and attrs.get("type") not in ("submit", "button", "file"):
            if attrs.get("type") in ("checkbox", "radio"):
                if "checked" in attrs:
                    self.data[name] = attrs.get("value", "on")
            else:
                self.data[name] = attrs.get("value") or ""
        elif tag == "select" and name:
            self._select = name
            self.data.setdefault(name, "")
        elif tag == "option" and self._select and "selected" in attrs:
            self.data[self._select] = attrs.get("value") or ""
        elif tag == "textarea" and name:
            self._textarea = name
            self.data[name] = ""

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data):
        if self._textarea:
            self.data[self._textarea] += data.strip("\n")


def form_of(client, url: str, **changes) -> dict[str, str]:
    page = client.get(url)
    assert page.status_code == 200
    reader = _FormReader()
    reader.feed(page.content.decode())
    reader.data.pop("csrfmiddlewaretoken", None)
    return {**reader.data, **{name: str(value) for name, value in changes.items()}}


def change_url(obj) -> str:
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])


def delivered(group: str, callbacks, *, event: str) -> list[tuple[str, dict]]:
    """Run the captured on-commit ``callbacks`` (what COMMIT runs) while listening to ``group`` through
    the real channel layer; the ``(event, data)`` received, once ``event`` came (or nothing more did)."""

    async def scenario():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        try:
            for callback in callbacks:
                await sync_to_async(callback)()
            received = []
            while not any(name == event for name, _ in received):
                try:
                    message = await asyncio.wait_for(layer.receive(channel), timeout=5)
                except TimeoutError:
                    break
                received.append((message["event"], message["data"]))
            return received
        finally:
            await layer.group_discard(group, channel)

    return async_to_sync(scenario)()


# --- Nothing in the admin writes a domain row itself --------------------------------------------


# Users are Django's own auth admin (passwords, permissions, groups): the one exception.
APP_MODELS = [m for m in admin.site._registry if m._meta.app_label in ("marketplace", "provisioning") and m is not User]


@pytest.mark.parametrize("model", APP_MODELS, ids=lambda m: m._meta.label)
def test_every_admin_of_the_apps_writes_through_services_or_not_at_all(model):
    model_admin = admin.site._registry[model]
    assert isinstance(model_admin, (ServiceAdmin, ReadOnlyAdmin)), type(model_admin).__name__


@pytest.mark.parametrize("model", [NodeCommand, ApiKey, Gpu], ids=lambda m: m.__name__)
def test_rows_that_only_services_write_cannot_be_saved_or_deleted_from_the_admin(operator_client, tenant, model):
    node = make_node()
    node_command_issue(node_id=node.pk, kind="health_check", params={}, timeout_seconds=60)
    api_key_create(tenant=tenant, name="ci")
    row = model.objects.first()
    before = {f.attname: getattr(row, f.attname) for f in model._meta.concrete_fields}
    page = operator_client.get(change_url(row))
    assert page.status_code == 200 and b'name="_save"' not in page.content
    assert operator_client.post(change_url(row), {}).status_code == 403  # a stale page would write its state back
    delete = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_delete", args=[row.pk])
    assert operator_client.post(delete, {"post": "yes"}).status_code == 403
    row.refresh_from_db()
    assert {f.attname: getattr(row, f.attname) for f in model._meta.concrete_fields} == before


# --- Nodes: a state change is a lifecycle move ----------------------------------------------------


def test_a_state_chosen_on_the_node_page_is_a_lifecycle_move_recorded_and_published(
    operator_client, django_capture_on_commit_callbacks
):
    node = make_node(state=NodeState.AVAILABLE)
    with django_capture_on_commit_callbacks() as callbacks:
        saved = operator_client.post(change_url(node), form_of(operator_client, change_url(node), state="draining"))
    assert saved.status_code == 302
    node.refresh_from_db()
    assert node.state == NodeState.DRAINING
    move = node.state_changes.first()
    assert (move.from_state, move.to_state, move.actor) == ("available", "draining", "ops@example.com")
    events = delivered(FLEET_GROUP, callbacks, event="node.state")
    assert ("node.state", {"node": node.hostname, "state": "draining"}) in events


def test_an_illegal_move_on_the_node_page_is_refused_with_the_reason_and_nothing_is_saved(operator_client):
    node = make_node(state=NodeState.AVAILABLE)
    hostname, moves, logged = node.hostname, node.state_changes.count(), LogEntry.objects.count()
    data = form_of(operator_client, change_url(node), state="maintenance", hostname="renamed-meanwhile")
    refused = operator_client.post(change_url(node), data)
    assert refused.status_code == 200  # the form again, with the operator's input
    text = refused.content.decode()
    assert "cannot move from available to maintenance" in text and 'value="renamed-meanwhile"' in text
    node.refresh_from_db()
    assert (node.state, node.hostname) == (NodeState.AVAILABLE, hostname)
    assert node.state_changes.count() == moves and LogEntry.objects.count() == logged


def test_a_node_added_in_the_admin_is_enrolled_by_the_fleet_service_and_its_agent_can_enrol(operator_client):
    rack = RackFactory()
    url = reverse("admin:provisioning_node_add")
    added = operator_client.post(url, form_of(operator_client, url, hostname="GPU-Host-9", rack=rack.pk))
    assert added.status_code == 302
    node = Node.objects.get(rack=rack)
    assert (node.hostname, node.state) == ("gpu-host-9", NodeState.ENROLLING)
    # Hostnames are matched lower-cased at enrolment: one saved as typed could never enrol.
    enrolled, _secret = node_enrol(token=bootstrap_token_create(node=node, actor="test"), hostname="gpu-host-9")
    assert enrolled == node


def test_nodes_added_and_renamed_on_the_rack_page_go_through_the_fleet_service(operator_client):
    node = make_node()
    rack = node.rack
    data = form_of(operator_client, change_url(rack), **{"nodes-0-hostname": "Renamed-1"})
    data.update({"nodes-TOTAL_FORMS": "2", "nodes-1-hostname": "New-Node-2", "nodes-1-rack": str(rack.pk)})
    saved = operator_client.post(change_url(rack), data)
    assert saved.status_code == 302, saved.content.decode()[:3000]
    assert sorted(rack.nodes.values_list("hostname", "state")) == [
        ("new-node-2", NodeState.ENROLLING),
        ("renamed-1", NodeState.AVAILABLE),  # renaming leaves the state to the lifecycle
    ]


def test_deleting_a_node_in_the_admin_disconnects_its_agent_first(operator_client, django_capture_on_commit_callbacks):
    node = make_node()
    node_enrol(token=bootstrap_token_create(node=node, actor="test"), hostname=node.hostname)
    delete = reverse("admin:provisioning_node_delete", args=[node.pk])
    with django_capture_on_commit_callbacks() as callbacks:
        assert operator_client.post(delete, {"post": "yes"}).status_code == 302
    assert not Node.objects.filter(pk=node.pk).exists() and not NodeCredential.objects.filter(node_id=node.pk).exists()
    assert ("agent.disconnect", {"code": 4401}) in delivered(agent_group(node.pk), callbacks, event="agent.disconnect")


def test_sites_and_their_racks_are_made_and_changed_through_the_fleet_service(operator_client):
    url = reverse("admin:provisioning_site_add")
    data = form_of(operator_client, url, slug="edge-lis", name="Lisbon edge", region="eu-south", kind="edge")
    data.update({"location": "Lisbon, PT", "power_capacity_mw": "5", "racks-TOTAL_FORMS": "1"})
    data.update({"racks-0-name": "r01", "racks-0-nvlink_domain_size": "8", "racks-0-power_budget_kw": "40"})
    assert operator_client.post(url, data).status_code == 302
    site = Site.objects.get(slug="edge-lis")
    rack = Rack.objects.get(site=site)
    assert (rack.name, rack.power_budget_kw) == ("r01", Decimal("40"))

    edited = form_of(operator_client, change_url(rack), power_budget_kw="50")
    assert operator_client.post(change_url(rack), edited).status_code == 302
    rack.refresh_from_db()
    assert rack.power_budget_kw == Decimal("50")
    edited = form_of(operator_client, change_url(site), name="Lisboa edge", **{"racks-0-name": "r02"})
    assert operator_client.post(change_url(site), edited).status_code == 302
    assert Site.objects.get(pk=site.pk).name == "Lisboa edge" and Rack.objects.get(pk=rack.pk).name == "r02"


def test_the_region_site_latency_table_is_kept_through_the_fleet_service(operator_client):
    site = RackFactory().site
    url = reverse("admin:provisioning_regionsitelatency_add")
    data = form_of(operator_client, url, region="eu-west", site=site.pk, rtt_ms="21.61", source="Milan → Paris")
    assert operator_client.post(url, data).status_code == 302
    latency = RegionSiteLatency.objects.get(region="eu-west", site=site)
    assert (latency.rtt_ms, latency.source) == (Decimal("21.61"), "Milan → Paris")
    page = operator_client.post(change_url(latency), form_of(operator_client, change_url(latency), rtt_ms="-1"))
    assert page.status_code == 200 and "A round trip cannot be negative." in page.content.decode()
    assert RegionSiteLatency.objects.get(pk=latency.pk).rtt_ms == Decimal("21.61")  # refused: nothing saved
    again = operator_client.post(url, data)  # the same pair twice: refused on the form
    assert again.status_code == 200 and RegionSiteLatency.objects.count() == 1
    delete = reverse("admin:provisioning_regionsitelatency_delete", args=[latency.pk])
    assert operator_client.post(delete, {"post": "yes"}).status_code == 302
    assert not RegionSiteLatency.objects.exists()


def test_an_accelerator_type_in_use_is_not_deleted_and_the_admin_says_why(operator_client):
    used = make_node().accelerator_type
    unused = AcceleratorTypeFactory(slug="l4-24gb", model="L4", memory_gib=24)
    changelist = reverse("admin:provisioning_acceleratortype_changelist")
    operator_client.post(changelist, {"action": "delete_selected", "_selected_action": [unused.pk], "post": "yes"})
    assert not type(unused).objects.filter(pk=unused.pk).exists()
    page = operator_client.post(
        changelist, {"action": "delete_selected", "_selected_action": [used.pk], "post": "yes"}, follow=True
    )
    assert type(used).objects.filter(pk=used.pk).exists() and b"Cannot delete" in page.content


# --- Offers -----------------------------------------------------------------------------------------


def test_an_offer_edited_on_its_page_is_held_to_the_catalog_services_bounds(operator_client):
    offer = OfferFactory()
    data = form_of(operator_client, change_url(offer), max_duration_hours=MAX_DURATION_HOURS + 1, is_active="")
    data.pop("is_active")
    refused = operator_client.post(change_url(offer), data)
    assert refused.status_code == 200 and f"{MAX_DURATION_HOURS:,} hours" in refused.content.decode()
    offer.refresh_from_db()
    assert offer.is_active and offer.max_duration_hours == 24 * 90  # nothing of the page was saved

    data["max_duration_hours"] = "48"
    assert operator_client.post(change_url(offer), data).status_code == 302
    offer.refresh_from_db()
    assert not offer.is_active and offer.max_duration_hours == 48


def test_an_offer_added_in_the_admin_is_made_by_the_catalog_service(operator_client):
    node = make_node()
    url = reverse("admin:marketplace_offer_add")
    data = form_of(operator_client, url, site=node.rack.site_id, accelerator_type=node.accelerator_type_id)
    data.update({"price_per_gpu_hour": "3.10", "gpus_per_node": "8", "max_duration_hours": MAX_DURATION_HOURS + 1})
    refused = operator_client.post(url, data)
    assert refused.status_code == 200 and not Offer.objects.exists()
    data["max_duration_hours"] = "720"
    data.update({"term_discounts-TOTAL_FORMS": "1", "term_discounts-0-term_months": "3"})
    data["term_discounts-0-percent_off"] = "20"
    assert operator_client.post(url, data).status_code == 302
    offer = Offer.objects.get()
    assert offer.price_per_gpu_hour == Decimal("3.1") and offer.is_active
    assert list(offer.term_discounts.values_list("term_months", "percent_off")) == [(3, Decimal("20"))]


def test_offers_deactivated_from_the_list_are_hidden_from_tenants(operator_client, tenant, api_client):
    shown, hidden = make_offer_with_nodes(nodes=1), make_offer_with_nodes(nodes=1)
    changelist = reverse("admin:marketplace_offer_changelist")
    data = form_of(operator_client, changelist)
    row = next(key[: -len("-id")] for key, value in data.items() if key.endswith("-id") and value == str(hidden.pk))
    data.pop(f"{row}-is_active", None)
    data["_save"] = "Save"
    assert operator_client.post(changelist, data).status_code == 302
    assert Offer.objects.get(pk=shown.pk).is_active and not Offer.objects.get(pk=hidden.pk).is_active
    api_client.force_authenticate(tenant.user)
    listed = {row["id"] for row in api_client.get("/api/v1/offers/").json()["results"]}
    assert shown.pk in listed and hidden.pk not in listed


def test_a_price_the_book_refuses_saves_nothing_of_the_offer_page(operator_client):
    offer = OfferFactory(price_per_gpu_hour=Decimal("2.49"))
    moment = (timezone.now() + timedelta(days=3)).replace(microsecond=0)
    offer_price_set(offer=offer, price_per_gpu_hour="2.00", effective_from=moment)
    data = form_of(operator_client, change_url(offer), max_duration_hours="100")
    data.update(
        {"prices-2-0-effective_from_0": moment.astimezone(timezone.get_current_timezone()).strftime("%Y-%m-%d")}
    )
    data["prices-2-0-effective_from_1"] = moment.astimezone(timezone.get_current_timezone()).strftime("%H:%M:%S")
    data["prices-2-0-price_per_gpu_hour"] = "1.50"
    refused = operator_client.post(change_url(offer), data)
    assert refused.status_code == 200 and b"already a price from that moment" in refused.content
    offer.refresh_from_db()
    assert offer.max_duration_hours == 24 * 90
    assert not OfferPrice.objects.filter(price_per_gpu_hour=Decimal("1.50")).exists()


def test_term_discounts_edited_on_the_offer_page_are_set_by_the_catalog_service(operator_client):
    offer = make_offer_with_nodes(nodes=0, term_discounts={1: "10", 3: "20"})
    data = form_of(operator_client, change_url(offer), **{"term_discounts-0-percent_off": "12.5"})
    data["term_discounts-1-DELETE"] = "on"
    assert operator_client.post(change_url(offer), data).status_code == 302
    assert list(OfferTermDiscount.objects.filter(offer=offer).values_list("term_months", "percent_off")) == [
        (1, Decimal("12.5"))
    ]


# --- Quotas, organizations, memberships ----------------------------------------------------------


def test_a_quota_lowered_from_the_list_holds_for_the_next_reservation(operator_client, tenant):
    offer = make_offer_with_nodes(nodes=2)
    make_quota(organization=tenant.organization, accelerator_type=offer.accelerator_type, max_gpus=64)
    changelist = reverse("admin:marketplace_quota_changelist")
    refused = operator_client.post(
        changelist, {**form_of(operator_client, changelist, **{"form-0-max_gpus": -1}), "_save": "Save"}
    )
    assert refused.status_code == 200 and Quota.objects.get().max_gpus == 64  # the row again, with its error
    data = {**form_of(operator_client, changelist, **{"form-0-max_gpus": 8}), "_save": "Save"}
    assert operator_client.post(changelist, data).status_code == 302
    assert Quota.objects.get().max_gpus == 8
    end = timezone.now() + timedelta(hours=1)
    reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=end)
    with pytest.raises(QuotaExceeded):
        reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=end)


def test_an_organization_added_in_the_admin_gets_its_members_and_quotas_through_the_services(operator_client):
    owner, gpu = make_user("founder@example.com"), AcceleratorTypeFactory()
    url = reverse("admin:marketplace_organization_add")
    data = form_of(operator_client, url, name="Initech", slug="initech")
    data.update({"memberships-TOTAL_FORMS": "1", "memberships-0-user": owner.pk, "memberships-0-role": "owner"})
    data.update({"quotas-TOTAL_FORMS": "1", "quotas-0-accelerator_type": gpu.pk, "quotas-0-max_gpus": "16"})
    assert operator_client.post(url, data).status_code == 302
    organization = Organization.objects.get(slug="initech")
    assert Membership.objects.get(organization=organization).user == owner
    assert Quota.objects.get(organization=organization, accelerator_type=gpu).max_gpus == 16

    edited = form_of(operator_client, change_url(organization), name="Initech Labs", **{"quotas-0-max_gpus": "4"})
    assert operator_client.post(change_url(organization), edited).status_code == 302
    assert Organization.objects.get(pk=organization.pk).name == "Initech Labs"
    assert Quota.objects.get(organization=organization).max_gpus == 4


def test_a_tenant_with_history_is_not_deleted_from_the_admin():
    tenant = make_tenant()  # its credit grant is in the ledger, which outlives everything
    with pytest.raises(DomainError) as refused:
        organization_delete(organization=tenant.organization)
    assert refused.value.code == "in_use"
    assert Organization.objects.filter(pk=tenant.organization.pk).exists()


# --- Served models (inference endpoints) --------------------------------------------------------


def test_a_served_model_added_in_the_admin_is_made_by_the_endpoint_models_service(operator_client):
    accelerator = AcceleratorTypeFactory()
    url = reverse("admin:marketplace_servedmodel_add")
    data = form_of(operator_client, url, slug="all-minilm-l6-v2", name="all-MiniLM-L6-v2", weights="gt_minilm")
    data.update({"server_program": '["python", "-m", "provisioning.agent.serving"]', "dimensions": "384"})
    data["accelerator_types"] = [accelerator.pk]
    refused = operator_client.post(url, {**data, "gpus_per_replica": "3"})  # not a slice size
    assert refused.status_code == 200 and not ServedModel.objects.exists()
    assert operator_client.post(url, {**data, "gpus_per_replica": "2"}).status_code == 302
    model = ServedModel.objects.get()
    assert (model.slug, model.gpus_per_replica, model.dimensions) == ("all-minilm-l6-v2", 2, 384)
    assert model.server_program == ["python", "-m", "provisioning.agent.serving"]
    assert list(model.accelerator_types.all()) == [accelerator]

    other = AcceleratorTypeFactory()
    edited = form_of(operator_client, change_url(model), name="MiniLM")
    edited["accelerator_types"] = [other.pk]
    assert operator_client.post(change_url(model), edited).status_code == 302
    model.refresh_from_db()
    assert model.name == "MiniLM" and list(model.accelerator_types.all()) == [other]


def test_a_served_model_with_endpoints_is_not_deleted_and_its_endpoint_pages_are_read_only(operator_client, tenant):
    node = make_node()
    offer_create(
        site=node.rack.site, accelerator_type=node.accelerator_type, price_per_gpu_hour="1", gpus_per_instance=1
    )
    model = served_model_create(
        slug="embedder",
        name="Embedder",
        server_program=["serve"],
        weights="w",
        accelerator_types=[node.accelerator_type],
    )
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region=node.rack.site.region)
    delete = reverse("admin:marketplace_servedmodel_delete", args=[model.pk])
    page = operator_client.post(delete, {"post": "yes"}, follow=True)
    assert ServedModel.objects.filter(pk=model.pk).exists() and b"Cannot delete" in page.content

    replica = Replica.objects.get()
    endpoint_page = operator_client.get(change_url(endpoint)).content.decode()
    assert b'name="_save"' not in endpoint_page.encode() and replica.id.hex[:8] in endpoint_page
    assert node.hostname in endpoint_page  # the replica's slice: site, node and GPUs
    replica_page = operator_client.get(change_url(replica)).content.decode()
    assert reverse("admin:marketplace_reservation_change", args=[replica.reservation_id]) in replica_page
    listing = operator_client.get(reverse("admin:marketplace_endpoint_changelist")).content.decode()
    assert "embed" in listing and tenant.organization.name in listing
    for row in (endpoint, replica):
        assert operator_client.post(change_url(row), {}).status_code == 403
