"""Reads of the catalog: offers with their availability derived from the fleet.

Availability is computed in SQL (correlated counts per offer), so a page of offers is one query
whatever the fleet size. It counts instances (aligned slots of the offer's size; a whole node is one)
of nodes that can take work whose GPUs no reservation holds at this moment, and nodes and racks wholly
free; the hour-by-hour calendar is marketplace.selectors.capacity.availability_by_hour."""

from django.db.models import Exists, F, Func, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from console.kernel.errors import DomainError, NotFound
from marketplace.models import Allocation, Offer, OfferPrice
from marketplace.selectors.capacity import instance_counts
from provisioning.choices import NodeState
from provisioning.models import Node, Rack


def _count(queryset: QuerySet) -> Coalesce:
    """COUNT(*) of a correlated queryset as a scalar subquery."""
    counted = queryset.order_by().annotate(n=Func(F("pk"), function="COUNT")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def _matching_nodes(rack_field: str = "rack__site") -> QuerySet[Node]:
    """Nodes of the offer's accelerator type and size, correlated to the outer offer."""
    return Node.objects.filter(
        **{rack_field: OuterRef("site")},
        accelerator_type=OuterRef("accelerator_type"),
        gpu_count=OuterRef("gpus_per_node"),
    )


def _free_now() -> Q:
    """Available, and not held by a live allocation at this moment."""
    held = Allocation.objects.filter(node=OuterRef("pk"), live=True, period__contains=Now())
    return Q(state=NodeState.AVAILABLE) & ~Q(Exists(held))


def _rack_counts() -> tuple[Coalesce, Coalesce]:
    """Racks at the offer's site made only of matching nodes; and those whose nodes are all free now."""
    nodes_here = Node.objects.filter(rack=OuterRef("pk"))
    matching = nodes_here.filter(
        accelerator_type=OuterRef(OuterRef("accelerator_type")), gpu_count=OuterRef(OuterRef("gpus_per_node"))
    )
    foreign = nodes_here.exclude(
        accelerator_type=OuterRef(OuterRef("accelerator_type")), gpu_count=OuterRef(OuterRef("gpus_per_node"))
    )
    racks = Rack.objects.filter(site=OuterRef("site")).filter(Exists(matching), ~Exists(foreign))
    free = racks.filter(~Exists(nodes_here.exclude(_free_now())))
    return _count(racks), _count(free)


def offer_list(*, include_inactive: bool = False) -> QuerySet[Offer]:
    """Offers with ``total_instances`` and ``available_instances`` (of nodes that can take work; a whole
    node is one instance), ``total_nodes`` and ``available_nodes`` (wholly free), ``total_racks`` and
    ``available_racks``."""
    offers = Offer.objects.select_related("site", "accelerator_type").prefetch_related("term_discounts")
    if not include_inactive:
        offers = offers.filter(is_active=True)
    total_racks, available_racks = _rack_counts()
    total_instances, available_instances = instance_counts()
    return offers.annotate(
        total_instances=total_instances,
        available_instances=available_instances,
        total_nodes=_count(_matching_nodes()),
        available_nodes=_count(_matching_nodes().filter(_free_now())),
        total_racks=total_racks,
        available_racks=available_racks,
    ).order_by("price_per_gpu_hour", "pk")


def instance_sizes() -> list[int]:
    """The GPUs per instance that active offers rent, smallest first (the catalog's size filter)."""
    sizes = Offer.objects.filter(is_active=True).order_by("gpus_per_instance").values_list("gpus_per_instance")
    return [size for (size,) in sizes.distinct()]


def offer_for_reservation(*, offer_id) -> Offer:
    """The offer a reservation request names, without the availability counts (bench/placement: they
    were 28 % of a POST). Inactive offers are returned so that the refusal can say why."""
    try:
        offer = Offer.objects.select_related("site", "accelerator_type").filter(pk=offer_id).first()
    except (ValueError, TypeError):
        offer = None
    if offer is None:
        message = f"No offer {offer_id}."
        raise DomainError(message, code="unknown_offer", fields={"offer": [message]})
    return offer


def offer_get(*, offer_id) -> Offer:
    """An active offer with its availability, or NotFound."""
    try:
        return offer_list().get(pk=offer_id)
    except (Offer.DoesNotExist, ValueError, TypeError):
        raise NotFound(f"No offer {offer_id}.") from None


def offer_filter(offers: QuerySet[Offer], *, available_only: bool = False) -> QuerySet[Offer]:
    if available_only:
        offers = offers.filter(Q(shape="node", available_instances__gt=0) | Q(shape="rack", available_racks__gt=0))
    return offers


def price_in_force(*, offer, at=None):
    """The offer's on-demand price per GPU-hour at ``at`` (now): the latest price-book row in force,
    or the offer's own price where the book has none."""
    at = at or timezone.now()
    price = (
        OfferPrice.objects.filter(offer=offer, effective_from__lte=at)
        .order_by("-effective_from")
        .values_list("price_per_gpu_hour", flat=True)
        .first()
    )
    return offer.price_per_gpu_hour if price is None else price
