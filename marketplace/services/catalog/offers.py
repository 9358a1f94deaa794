"""Writes to the catalog: offers and their reserved-term discounts."""

from collections.abc import Mapping
from decimal import Decimal

from django.db import transaction

from console.kernel.errors import DomainError, clean_or_refuse, delete_or_refuse
from marketplace.choices import OfferShape
from marketplace.models import Offer, OfferTermDiscount
from marketplace.services.reservations.lifecycle import MAX_DURATION_HOURS
from provisioning.models import AcceleratorType, Site


def _check_max_duration(hours: int) -> None:
    # Longer could never be reserved (reservations are bounded the same way): say so to the operator.
    if not 1 <= hours <= MAX_DURATION_HOURS:
        raise DomainError(
            f"The longest reservation is 1 to {MAX_DURATION_HOURS:,} hours.",
            fields={"max_duration_hours": [f"At most {MAX_DURATION_HOURS:,} hours."]},
        )


@transaction.atomic
def offer_create(
    *,
    site: Site,
    accelerator_type: AcceleratorType,
    price_per_gpu_hour: Decimal,
    shape: str = OfferShape.NODE,
    gpus_per_node: int = 8,
    gpus_per_instance: int | None = None,
    max_duration_hours: int = 24 * 90,
    is_active: bool = True,
    term_discounts: Mapping[int, Decimal | str] | None = None,
) -> Offer:
    """An offer of instances of ``gpus_per_instance`` GPUs (default: the whole node) of nodes of
    ``gpus_per_node``, or of whole racks of them."""
    _check_max_duration(max_duration_hours)
    offer = Offer(
        site=site,
        accelerator_type=accelerator_type,
        shape=shape,
        gpus_per_node=gpus_per_node,
        gpus_per_instance=gpus_per_node if gpus_per_instance is None else gpus_per_instance,
        price_per_gpu_hour=Decimal(price_per_gpu_hour),
        max_duration_hours=max_duration_hours,
        is_active=is_active,
    )
    clean_or_refuse(offer)
    offer.save()
    for months, percent in (term_discounts or {}).items():
        term_discount_set(offer=offer, term_months=months, percent_off=percent)
    return offer


def offer_update(
    *,
    offer: Offer,
    site: Site,
    accelerator_type: AcceleratorType,
    shape: str,
    gpus_per_node: int,
    max_duration_hours: int,
    is_active: bool,
    gpus_per_instance: int | None = None,
) -> Offer:
    """Everything but the price, which changes through the price book (services.pricing), effective-dated.
    Reservations already made keep what they were made with."""
    _check_max_duration(max_duration_hours)
    offer.site, offer.accelerator_type, offer.shape, offer.gpus_per_node = site, accelerator_type, shape, gpus_per_node
    offer.gpus_per_instance = gpus_per_node if gpus_per_instance is None else gpus_per_instance
    offer.max_duration_hours, offer.is_active = max_duration_hours, is_active
    clean_or_refuse(offer)
    fields = ["site", "accelerator_type", "shape", "gpus_per_node", "gpus_per_instance", "max_duration_hours"]
    fields.append("is_active")
    offer.save(update_fields=fields)  # not the price: beat mirrors the book onto it meanwhile
    return offer


def offer_delete(*, offer: Offer) -> None:
    """Only an offer never reserved; one that was is made inactive instead."""
    delete_or_refuse(offer, noun="offer")


def term_discount_set(*, offer: Offer, term_months: int, percent_off) -> OfferTermDiscount:
    """The discount for committing to ``term_months`` (added, or changed). Quotes made from now on use it."""
    discount = OfferTermDiscount.objects.filter(offer=offer, term_months=term_months).first() or OfferTermDiscount(
        offer=offer, term_months=term_months
    )
    discount.percent_off = Decimal(percent_off)
    clean_or_refuse(discount)
    discount.save()
    return discount


def term_discount_remove(*, offer: Offer, term_months: int) -> bool:
    deleted, _ = OfferTermDiscount.objects.filter(offer=offer, term_months=term_months).delete()
    return bool(deleted)
