"""Reads of the fleet. The fleet is public to tenants only as the catalog shows it (sites, types);
nodes and GPUs are for operators."""

from django.db.models import Count, Q, QuerySet

from provisioning.choices import NodeState
from provisioning.models import AcceleratorType, Site


def site_list() -> QuerySet[Site]:
    return Site.objects.annotate(
        rack_count=Count("racks", distinct=True),
        node_count=Count("racks__nodes", distinct=True),
        available_node_count=Count("racks__nodes", filter=Q(racks__nodes__state=NodeState.AVAILABLE), distinct=True),
    ).order_by("region", "name")


def accelerator_type_list() -> QuerySet[AcceleratorType]:
    return AcceleratorType.objects.all()


def site_regions() -> list[str]:
    return list(Site.objects.order_by("region").values_list("region", flat=True).distinct())
