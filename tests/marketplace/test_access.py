"""A way into a reservation, the console's half (issue 15): images, the keys a reservation lets in, the
``access`` commands that keep its agents' key lists in step (key added or taken out, a key deleted, a
member removed, a change while a node provisions), the connect command, the API and who may do what.
The agent's half (a real sshd, a real ssh login) is tests/agent/test_access.py and tests/e2e."""

import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.urls import reverse

from console.kernel.errors import Conflict, DomainError, Forbidden, NotFound
from marketplace.choices import ReservationState, Role
from marketplace.models import Image, Reservation
from marketplace.selectors.access import reservation_access
from marketplace.services.catalog.images import image_default_set, image_save
from marketplace.services.reservations.access import reservation_key_add, reservation_key_remove
from marketplace.services.reservations.lifecycle import reservation_begin, reservation_create, reservation_release
from marketplace.services.reservations.provisioning import reservation_provision_start
from marketplace.services.tenancy.members import membership_remove, membership_set
from marketplace.services.tenancy.ssh_keys import ssh_key_add, ssh_key_remove
from marketplace.tenant_context import TenantContext
from provisioning.choices import CommandKind, CommandState
from provisioning.models import AcceleratorType, NodeCommand
from provisioning.services.agents import node_command_acknowledged, node_command_finish
from tests.conftest import key_client
from tests.console.test_portal import signed_in
from tests.factories import make_offer_with_nodes, make_tenant, make_user

pytestmark = pytest.mark.django_db
STEPS = [{"name": "fetch base image", "seconds": 0.5}, {"name": "install CUDA 12.4", "run": ["true"]}]


def public_key() -> str:
    private = ed25519.Ed25519PrivateKey.generate()
    line = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode()


@pytest.fixture
def world():
    offer = make_offer_with_nodes(nodes=2)
    image = image_save(accelerator_types=[offer.accelerator_type], slug="cuda-12-4", name="CUDA 12.4", steps=STEPS)
    image_default_set(accelerator_type=offer.accelerator_type, image=image)
    tenant = make_tenant(role=Role.MEMBER)
    key = ssh_key_add(tenant=tenant, public_key=public_key(), name="laptop")
    return {"offer": offer, "image": image, "tenant": tenant, "key": key}


def reserve(world, **extra) -> Reservation:
    return reservation_create(
        tenant=world["tenant"], offer=world["offer"], quantity=extra.pop("quantity", 1), start=None, end=None,
        duration_hours=2, **extra,
    )  # fmt: skip


def provisioned(reservation: Reservation, *, port: int = 40100) -> list[NodeCommand]:
    """Begin it, issue its provision commands and answer them as agents that set up access."""
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_provision_start(reservation_id=reservation.pk)
    commands = list(NodeCommand.objects.filter(correlation_id=reservation.pk, kind=CommandKind.PROVISION))
    for offset, command in enumerate(commands):
        answer(command, port=port + offset)
    reservation.refresh_from_db()
    return commands


def answer(command: NodeCommand, *, port: int) -> None:
    node_command_acknowledged(node_id=command.node_id, command_id=command.id)
    served = {"host": "10.0.0.7", "port": port, "user": "nc-abc", "server": "openssh", "host_key": "SHA256:hk"}
    node_command_finish(node_id=command.node_id, command_id=command.id, ok=True, detail={"access": served})


def access_commands(reservation: Reservation) -> list[NodeCommand]:
    return list(
        NodeCommand.objects.filter(correlation_id=reservation.pk, kind=CommandKind.ACCESS).order_by("created_at")
    )


def test_a_reservation_gets_the_default_image_and_its_creators_keys_and_its_commands_carry_them(world):
    reservation = reserve(world, quantity=2)
    assert reservation.has_access and reservation.image == world["image"]
    assert list(reservation.ssh_keys.all()) == [world["key"]]
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_provision_start(reservation_id=reservation.pk)
    commands = NodeCommand.objects.filter(correlation_id=reservation.pk, kind=CommandKind.PROVISION)
    assert commands.count() == 2
    for command in commands:
        assert command.params["image"] == {"slug": "cuda-12-4", "name": "CUDA 12.4", "steps": STEPS}
        (line,) = command.params["access"]["keys"]
        assert line.startswith(world["key"].public_key + " ") and world["tenant"].user.email in line
        assert command.params["access"]["version"] == 0


def test_keys_and_image_named_at_reservation_and_the_refusals(world):
    tenant = world["tenant"]
    shared_by = TenantContext(organization=tenant.organization, user=make_user(), role=Role.ADMIN)
    membership_set(organization=tenant.organization, user=shared_by.user, role=Role.ADMIN)
    shared = ssh_key_add(tenant=shared_by, public_key=public_key(), name="team", shared=True)
    theirs = ssh_key_add(tenant=shared_by, public_key=public_key(), name="admin's own")
    reservation = reserve(world, ssh_keys=[shared.pk], image="cuda-12-4")
    assert list(reservation.ssh_keys.all()) == [shared]
    assert list(reserve(world, ssh_keys=[]).ssh_keys.all()) == []
    with pytest.raises(Forbidden, match="another member's"):
        reserve(world, ssh_keys=[theirs.pk])
    other_org_key = ssh_key_add(tenant=make_tenant(), public_key=public_key())
    with pytest.raises(DomainError, match="No SSH key") as refused:
        reserve(world, ssh_keys=[other_org_key.pk])
    assert refused.value.fields == {"ssh_keys": [refused.value.message]}
    with pytest.raises(DomainError, match="No image 'windows-xp'") as refused:
        reserve(world, image="windows-xp")
    assert "cuda-12-4" in refused.value.message and refused.value.fields["image"]
    other_type = AcceleratorType.objects.create(
        slug="mi300x", vendor="amd", model="MI300X", memory_gib=192, tdp_watts=750, interconnect="IF",
        device_name="AMD Instinct MI300X",
    )  # fmt: skip
    image_save(accelerator_types=[other_type], slug="rocm", name="ROCm 6.2")
    with pytest.raises(DomainError, match="No image 'rocm'"):
        reserve(world, image="rocm")
    before = Reservation.objects.count()
    assert Reservation.objects.count() == before  # refusals made nothing


def test_a_key_let_in_or_taken_out_reaches_each_provisioned_node_with_a_newer_version(world):
    reservation = reserve(world, quantity=2)
    provisioned(reservation)
    assert reservation.state == ReservationState.ACTIVE
    second = ssh_key_add(tenant=world["tenant"], public_key=public_key(), name="desktop")
    reservation_key_add(tenant=world["tenant"], reservation=reservation, key=second)
    sent = access_commands(reservation)
    assert len(sent) == 2 and {c.node_id for c in sent} == set(
        reservation.allocations.values_list("node_id", flat=True)
    )
    assert {c.params["version"] for c in sent} == {1} and all(len(c.params["keys"]) == 2 for c in sent)
    reservation_key_remove(tenant=world["tenant"], reservation=reservation, key_id=world["key"].pk)
    latest = access_commands(reservation)[2:]
    assert {c.params["version"] for c in latest} == {2}
    assert all(c.params["keys"] == [f"{second.public_key} {world['tenant'].user.email}"] for c in latest)
    with pytest.raises(Conflict, match="already installed"):
        reservation_key_add(tenant=world["tenant"], reservation=reservation, key=second)
    with pytest.raises(NotFound):
        reservation_key_remove(tenant=world["tenant"], reservation=reservation, key_id=world["key"].pk)
    reservation_release(reservation_id=reservation.pk)
    with pytest.raises(Conflict, match="releasing"):
        reservation_key_add(tenant=world["tenant"], reservation=reservation, key=world["key"])


def test_a_deleted_key_and_a_removed_members_keys_leave_the_running_reservations(world):
    tenant = world["tenant"]
    colleague = TenantContext(organization=tenant.organization, user=make_user(), role=Role.MEMBER)
    membership_set(organization=tenant.organization, user=colleague.user, role=Role.MEMBER)
    theirs = ssh_key_add(tenant=colleague, public_key=public_key(), name="colleague")
    owner = tenant.organization.memberships.get(role=Role.OWNER).user
    admin = TenantContext(organization=tenant.organization, user=owner, role=Role.OWNER)
    reservation = reserve(world)
    provisioned(reservation)
    reservation_key_add(tenant=admin, reservation=reservation, key=theirs)
    assert access_commands(reservation)[-1].params["version"] == 1
    membership_remove(organization=tenant.organization, user=colleague.user)
    assert not theirs.__class__.objects.filter(pk=theirs.pk).exists()
    last = access_commands(reservation)[-1]
    assert last.params["version"] == 2 and len(last.params["keys"]) == 1 and "colleague" not in str(last.params)
    ssh_key_remove(tenant=tenant, key=world["key"])
    last = access_commands(reservation)[-1]
    assert last.params["version"] == 3 and last.params["keys"] == []
    assert reservation_access(reservation=reservation)["message"] == "No key is installed: add one to log in."


def test_a_change_while_a_node_provisions_reaches_it_once_its_provision_succeeds(world):
    reservation = reserve(world, quantity=2)
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_provision_start(reservation_id=reservation.pk)
    first, second = NodeCommand.objects.filter(correlation_id=reservation.pk, kind=CommandKind.PROVISION)
    answer(first, port=40200)
    extra = ssh_key_add(tenant=world["tenant"], public_key=public_key(), name="late")
    reservation_key_add(tenant=world["tenant"], reservation=Reservation.objects.get(pk=reservation.pk), key=extra)
    assert [c.node_id for c in access_commands(reservation)] == [first.node_id]  # the other is not up yet
    answer(second, port=40201)
    sent = access_commands(reservation)
    assert [c.node_id for c in sent] == [first.node_id, second.node_id]
    assert sent[1].params["version"] == 1 and len(sent[1].params["keys"]) == 2


def test_who_may_change_a_reservations_keys(world):
    reservation = reserve(world)
    provisioned(reservation)
    viewer = TenantContext(organization=world["tenant"].organization, user=make_user(), role=Role.VIEWER)
    with pytest.raises(Forbidden):
        reservation_key_remove(tenant=viewer, reservation=reservation, key_id=world["key"].pk)
    other = make_tenant()
    with pytest.raises(NotFound):
        reservation_key_remove(tenant=other, reservation=reservation, key_id=world["key"].pk)
    colleague = TenantContext(organization=world["tenant"].organization, user=make_user(), role=Role.MEMBER)
    membership_set(organization=colleague.organization, user=colleague.user, role=Role.MEMBER)
    with pytest.raises(Forbidden, match="key's owner"):
        reservation_key_remove(tenant=colleague, reservation=reservation, key_id=world["key"].pk)
    assert access_commands(reservation) == []  # nothing was sent for the refusals


def test_connect_per_node_once_ready_and_plainly_not_before_or_after(world):
    reservation = reserve(world, quantity=2)
    assert reservation_access(reservation=reservation)["status"] == "waiting"
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_provision_start(reservation_id=reservation.pk)
    first, second = NodeCommand.objects.filter(correlation_id=reservation.pk, kind=CommandKind.PROVISION)
    answer(first, port=40300)
    access = reservation_access(reservation=Reservation.objects.get(pk=reservation.pk))
    assert access["status"] == "waiting" and [n["ready"] for n in access["nodes"]].count(True) == 1
    answer(second, port=40301)
    reservation.refresh_from_db()
    access = reservation_access(reservation=reservation)
    assert access["status"] == "ready" and access["image"] == {"slug": "cuda-12-4", "name": "CUDA 12.4"}
    assert sorted(n["command"] for n in access["nodes"]) == [
        "ssh -p 40300 nc-abc@10.0.0.7",
        "ssh -p 40301 nc-abc@10.0.0.7",
    ]
    reservation_release(reservation_id=reservation.pk)
    reservation.refresh_from_db()
    assert reservation_access(reservation=reservation)["status"] == "ended"


def test_the_api_reserves_with_keys_shows_connect_and_changes_keys(world):
    tenant = world["tenant"]
    client = key_client(tenant)
    body = {"offer": world["offer"].pk, "duration_hours": 1, "image": "cuda-12-4", "ssh_keys": [str(world["key"].pk)]}
    made = client.post("/api/v1/reservations/", body, format="json")
    assert made.status_code == 201, made.json()
    reservation = Reservation.objects.get(pk=made.json()["id"])
    provisioned(reservation)
    detail = client.get(f"/api/v1/reservations/{reservation.pk}/").json()
    assert detail["access"]["status"] == "ready"
    assert detail["access"]["nodes"][0]["command"] == "ssh -p 40100 nc-abc@10.0.0.7"
    assert detail["access"]["keys"][0]["fingerprint"] == world["key"].fingerprint
    extra = ssh_key_add(tenant=tenant, public_key=public_key(), name="ci")
    added = client.post(f"/api/v1/reservations/{reservation.pk}/ssh-keys/", {"key": str(extra.pk)}, format="json")
    assert added.status_code == 200 and len(added.json()["access"]["keys"]) == 2
    removed = client.delete(f"/api/v1/reservations/{reservation.pk}/ssh-keys/{extra.pk}/")
    assert removed.status_code == 200 and len(removed.json()["access"]["keys"]) == 1
    assert [c.params["version"] for c in access_commands(reservation)] == [1, 2]
    bad = client.post("/api/v1/reservations/", {**body, "image": "nope"}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["fields"]["image"]
    outsider = key_client(make_tenant())
    assert (
        outsider.post(
            f"/api/v1/reservations/{reservation.pk}/ssh-keys/", {"key": str(extra.pk)}, format="json"
        ).status_code
        == 404
    )
    images = client.get("/api/v1/images/").json()
    listed = images["results"] if isinstance(images, dict) else images
    assert listed[0]["slug"] == "cuda-12-4" and listed[0]["steps"] == ["fetch base image", "install CUDA 12.4"]
    assert listed[0]["default_for"] == [world["offer"].accelerator_type.slug]


def test_image_steps_are_checked_by_the_catalog(world):
    for steps, words in [
        ("not a list", "list"),
        ([{"name": ""}], "name"),
        ([{"name": "x", "run": "rm -rf /"}], "run"),
        ([{"name": "x", "seconds": -1}], "seconds"),
        ([{"name": "x", "shell": "y"}], "object"),
    ]:
        with pytest.raises(DomainError, match=words):
            image_save(accelerator_types=[world["offer"].accelerator_type], slug="bad", name="Bad", steps=steps)
    assert not world["image"].__class__.objects.filter(slug="bad").exists()


def test_an_endpoints_replica_reservation_has_no_access(world):
    reservation = reservation_create(
        tenant=world["tenant"], offer=world["offer"], quantity=1, start=None, end=None, duration_hours=1, access=False
    )
    assert not reservation.has_access and reservation.image is None and not reservation.ssh_keys.exists()
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_provision_start(reservation_id=reservation.pk)
    command = NodeCommand.objects.get(correlation_id=reservation.pk)
    assert "access" not in command.params and "image" not in command.params
    assert command.state == CommandState.QUEUED
    assert reservation_access(reservation=reservation)["status"] == "none"


def test_the_portal_reserves_with_an_image_and_keys_and_shows_how_to_connect(world):
    tenant = world["tenant"]
    browser = signed_in(tenant)
    offer = world["offer"]
    page = browser.get(f"/offers/{offer.id}/reserve/").content.decode()
    assert '<option value="cuda-12-4" selected>CUDA 12.4</option>' in page
    assert re.search(rf'value="{world["key"].pk}"[^>]*checked', page)  # the creator's keys, ticked
    form = {"quantity": 1, "duration_hours": "1", "image": "cuda-12-4", "ssh_keys": [str(world["key"].pk)]}
    made = browser.post(f"/offers/{offer.id}/reserve/", {**form, "confirm": "1"})
    reservation = Reservation.objects.get()
    assert made["Location"] == f"/reservations/{reservation.pk}/"
    assert list(reservation.ssh_keys.all()) == [world["key"]] and reservation.image == world["image"]
    waiting = browser.get(made["Location"]).content.decode()
    assert "Connect" in waiting and "Access is set up when its nodes are provisioned" in waiting
    provisioned(reservation)
    ready = browser.get(made["Location"]).content.decode()
    assert "ssh -p 40100 nc-abc@10.0.0.7" in ready and 'data-copy="#connect-1"' in ready
    other = ssh_key_add(tenant=tenant, public_key=public_key(), name="desktop")
    browser.post(made["Location"], {"action": "key_add", "key": str(other.pk)})
    assert reservation.ssh_keys.count() == 2 and access_commands(reservation)[-1].params["version"] == 1
    browser.post(made["Location"], {"action": "key_remove", "key": str(world["key"].pk)})
    assert list(reservation.ssh_keys.all()) == [other]
    refused = browser.post(made["Location"], {"action": "key_add", "key": str(other.pk)}, follow=True)
    assert "already installed" in refused.content.decode()


def test_operators_keep_the_catalog_and_remove_a_leaked_key_in_the_admin(world, operator_client):
    accelerator = world["offer"].accelerator_type
    data = {
        "slug": "ubuntu-22.04-cuda-12.6",
        "name": "Ubuntu 22.04 · CUDA 12.6",
        "description": "",
        "accelerator_types": [accelerator.pk],
        "steps": '[{"name": "install CUDA 12.6", "seconds": 1}]',
        "is_active": "on",
        "defaults-TOTAL_FORMS": "1",
        "defaults-INITIAL_FORMS": "0",
        "defaults-0-accelerator_type": accelerator.pk,
    }
    saved = operator_client.post(reverse("admin:marketplace_image_add"), data)
    assert saved.status_code == 302, saved.context["inline_admin_formsets"][0].formset.errors
    image = Image.objects.get(slug="ubuntu-22.04-cuda-12.6")
    assert image.defaults.get().accelerator_type == accelerator and reserve(world).image == image
    refused = operator_client.post(
        reverse("admin:marketplace_image_add"), {**data, "slug": "x", "steps": '[{"name": ""}]'}
    )
    assert refused.status_code == 200 and "name of 1 to 80" in refused.content.decode()

    reservation = reserve(world)
    provisioned(reservation)
    changelist = reverse("admin:marketplace_sshkey_changelist")
    removed = operator_client.post(changelist, {"action": "remove", "_selected_action": [str(world["key"].pk)]})
    assert removed.status_code == 302 and not reservation.ssh_keys.exists()
    assert access_commands(reservation)[-1].params == {"reservation": str(reservation.pk), "keys": [], "version": 1}
