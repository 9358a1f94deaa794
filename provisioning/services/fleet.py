"""Writes to the fleet inventory: accelerator types, sites, racks, enrolment, GPU inventory, every node
lifecycle move, and the region <-> site latency table placement orders sites by."""

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction

from console.kernel.errors import DomainError, clean_or_refuse, delete_or_refuse
from console.kernel.events import FLEET_GROUP, publish_on_commit
from console.kernel.lifecycle import transition
from provisioning.choices import NodeState, Purpose
from provisioning.models import (
    NODE_TRANSITIONS,
    AcceleratorType,
    Gpu,
    Node,
    NodeStateChange,
    Rack,
    RegionSiteLatency,
    Site,
)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU as inventory reports it."""

    index: int
    uuid: str
    accelerator_type: AcceleratorType
    memory_mib: int


def _saved(instance, *, update_fields: Sequence[str] | None = None):
    clean_or_refuse(instance)
    instance.save(update_fields=update_fields)
    return instance


def accelerator_type_create(
    *,
    slug: str,
    vendor: str,
    model: str,
    memory_gib: int,
    tdp_watts: int,
    interconnect: str,
    purpose: str = Purpose.BOTH,
    device_name: str = "",
) -> AcceleratorType:
    return _saved(
        AcceleratorType(
            slug=slug,
            vendor=vendor,
            model=model,
            memory_gib=memory_gib,
            tdp_watts=tdp_watts,
            interconnect=interconnect,
            purpose=purpose,
            device_name=device_name,
        )
    )


def accelerator_type_update(
    *,
    accelerator_type: AcceleratorType,
    slug: str,
    vendor: str,
    model: str,
    memory_gib: int,
    tdp_watts: int,
    interconnect: str,
    purpose: str,
    device_name: str,
) -> AcceleratorType:
    accelerator_type.slug, accelerator_type.vendor, accelerator_type.model = slug, vendor, model
    accelerator_type.memory_gib, accelerator_type.tdp_watts = memory_gib, tdp_watts
    accelerator_type.interconnect, accelerator_type.purpose, accelerator_type.device_name = (
        interconnect,
        purpose,
        device_name,
    )
    return _saved(accelerator_type)


def accelerator_type_delete(*, accelerator_type: AcceleratorType) -> None:
    """Only a type nothing names (no GPU, node or offer)."""
    delete_or_refuse(accelerator_type, noun="accelerator type")


def site_create(
    *, slug: str, name: str, region: str, kind: str, location: str, power_capacity_mw: Decimal | None = None
) -> Site:
    return _saved(
        Site(slug=slug, name=name, region=region, kind=kind, location=location, power_capacity_mw=power_capacity_mw)
    )


def site_update(
    *, site: Site, slug: str, name: str, region: str, kind: str, location: str, power_capacity_mw: Decimal | None
) -> Site:
    site.slug, site.name, site.region, site.kind = slug, name, region, kind
    site.location, site.power_capacity_mw = location, power_capacity_mw
    return _saved(site)


def site_delete(*, site: Site) -> None:
    """Only a site with no racks and no offers."""
    delete_or_refuse(site, noun="site")


def rack_create(*, site: Site, name: str, power_budget_kw: Decimal, nvlink_domain_size: int = 8) -> Rack:
    return _saved(Rack(site=site, name=name, power_budget_kw=power_budget_kw, nvlink_domain_size=nvlink_domain_size))


def rack_update(*, rack: Rack, site: Site, name: str, power_budget_kw: Decimal, nvlink_domain_size: int) -> Rack:
    rack.site, rack.name = site, name
    rack.power_budget_kw, rack.nvlink_domain_size = power_budget_kw, nvlink_domain_size
    return _saved(rack)


def rack_delete(*, rack: Rack) -> None:
    """Only a rack with no nodes (and no rack reservation)."""
    delete_or_refuse(rack, noun="rack")


def region_latency_set(*, region: str, site: Site, rtt_ms: Decimal, source: str = "") -> RegionSiteLatency:
    """The round trip from ``region``'s users to ``site``: recorded, or replacing the pair's figure."""
    latency = RegionSiteLatency.objects.filter(region=region, site=site).first()
    latency = latency or RegionSiteLatency(region=region, site=site)
    latency.rtt_ms, latency.source = rtt_ms, source
    return _saved(latency)


def region_latency_update(
    *, latency: RegionSiteLatency, region: str, site: Site, rtt_ms: Decimal, source: str
) -> RegionSiteLatency:
    latency.region, latency.site, latency.rtt_ms, latency.source = region, site, rtt_ms, source
    return _saved(latency)


def region_latency_delete(*, latency: RegionSiteLatency) -> None:
    """The pair is no longer known to be near: placement ranks the site after the measured ones."""
    latency.delete()


def node_enrol(*, rack: Rack, hostname: str) -> Node:
    """A new host, in ``enrolling`` until its inventory is known and it is marked available."""
    return _saved(Node(rack=rack, hostname=hostname.lower()))


def node_update(*, node: Node, rack: Rack, hostname: str) -> Node:
    """Where a node is and what it is called. Its state moves only by node_transition, its GPUs only by
    inventory (node_set_inventory): neither is written here, so a move made meanwhile is kept."""
    node.rack, node.hostname = rack, hostname.lower()
    return _saved(node, update_fields=["rack", "hostname"])


@transaction.atomic
def node_set_inventory(*, node: Node, gpus: Sequence[GpuSpec]) -> Node:
    """Reconcile a node's GPU rows with what its inventory reports, and its summary columns with them.

    GPUs are matched by UUID; a GPU that moved slots keeps its row, one that vanished is removed."""
    if len({gpu.index for gpu in gpus}) != len(gpus) or len({gpu.uuid for gpu in gpus}) != len(gpus):
        raise DomainError("Inventory lists the same GPU index or UUID twice.", code="invalid_inventory")
    types = {gpu.accelerator_type.pk for gpu in gpus}
    if len(types) > 1:
        raise DomainError("A node holds one accelerator type; this inventory mixes several.", code="invalid_inventory")
    node = Node.objects.select_for_update().get(pk=node.pk)
    reported = {gpu.uuid: gpu for gpu in gpus}
    Gpu.objects.filter(node=node).exclude(uuid__in=list(reported)).delete()
    existing = {gpu.uuid: gpu for gpu in Gpu.objects.filter(node=node)}
    # Park moved GPUs on free indexes first so the (node, index) constraint holds mid-update.
    for offset, row in enumerate(existing.values()):
        row.index = 10_000 + offset
        row.save(update_fields=["index"])
    for uuid, spec in reported.items():
        row = existing.get(uuid) or Gpu(node=node, uuid=spec.uuid)
        row.index, row.accelerator_type, row.memory_mib = spec.index, spec.accelerator_type, spec.memory_mib
        row.save()
    node.accelerator_type = gpus[0].accelerator_type if gpus else None
    node.gpu_count = len(gpus)
    node.save(update_fields=["accelerator_type", "gpu_count"])
    return node


@transaction.atomic
def node_transition(*, node: Node, target: str, actor: str = "", reason: str = "") -> Node:
    """Move a node along its lifecycle (NODE_TRANSITIONS); raises IllegalTransition (409) otherwise."""
    previous = transition(node, table=NODE_TRANSITIONS, target=NodeState(target))
    publish_on_commit(FLEET_GROUP, "node.state", {"node": node.hostname, "state": str(target)})
    NodeStateChange.objects.create(
        node=node, from_state=previous, to_state=target, actor=actor[:254], reason=reason[:200]
    )
    return node
