"""Writes to the catalog: offers and their reserved-term discounts."""

from collections.abc import Mapping
from decimal import Decimal

from django.db import transaction

from marketplace.choices import OfferShape
from marketplace.models import Offer, OfferTermDiscount
from provisioning.models import AcceleratorType, Site


@transaction.atomic
def offer_create(
    *,
    site: Site,
    accelerator_type: AcceleratorType,
    price_per_gpu_hour: Decimal,
    shape: str = OfferShape.NODE,
    gpus_per_node: int = 8,
    max_duration_hours: int = 24 * 90,
    term_discounts: Mapping[int, Decimal] | None = None,
) -> Offer:
    offer = Offer(
        site=site,
        accelerator_type=accelerator_type,
        shape=shape,
        gpus_per_node=gpus_per_node,
        price_per_gpu_hour=Decimal(price_per_gpu_hour),
        max_duration_hours=max_duration_hours,
    )
    offer.full_clean()
    offer.save()
    for months, percent in (term_discounts or {}).items():
        discount = OfferTermDiscount(offer=offer, term_months=months, percent_off=Decimal(percent))
        discount.full_clean()
        discount.save()
    return offer
