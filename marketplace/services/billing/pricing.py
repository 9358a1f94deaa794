"""The price book: effective-dated on-demand prices per offer. The only writer of OfferPrice and of
Offer.price_per_gpu_hour after creation (which mirrors the price in force, for listing and sorting).
Quotes read the book itself (selectors.catalog.price_in_force), so a price takes effect on the
second, whenever beat gets to mirroring it."""

from datetime import datetime, timedelta
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.utils import timezone

from console.kernel.errors import Conflict, DomainError
from marketplace.models import Offer, OfferPrice
from marketplace.selectors.catalog import price_in_force

MAX_PRICE = Decimal("1e6")  # OfferPrice.price_per_gpu_hour holds 10 digits, 4 of them decimals


@transaction.atomic
def offer_price_set(
    *, offer: Offer, price_per_gpu_hour, effective_from: datetime | None = None, note: str = "", by=None
) -> OfferPrice:
    """Schedule a new on-demand price (now, or from a later moment). Reservations already made keep
    theirs."""
    now = timezone.now()
    effective_from = effective_from or now
    try:
        price = Decimal(str(price_per_gpu_hour))
    except ArithmeticError:
        price = None
    if (
        price is None
        or not price.is_finite()
        or not 0 <= price < MAX_PRICE  # before quantize, which cannot hold more than 28 digits
        or price != price.quantize(Decimal("0.0001"))
    ):
        raise DomainError(
            "A price is a non-negative amount below 1,000,000 with at most four decimals.",
            fields={"price_per_gpu_hour": ["Enter e.g. 2.4900."]},
        )
    if effective_from < now - timedelta(minutes=1):
        raise DomainError("Prices cannot be changed in the past.", fields={"effective_from": ["Must be now or later."]})
    if not OfferPrice.objects.filter(offer=offer).exists():  # the book starts with the price it had
        OfferPrice.objects.create(
            offer=offer, effective_from=offer.created_at, price_per_gpu_hour=offer.price_per_gpu_hour
        )
    try:
        with transaction.atomic():
            row = OfferPrice.objects.create(
                offer=offer, effective_from=effective_from, price_per_gpu_hour=price, note=note[:200], created_by=by
            )
    except IntegrityError:
        raise Conflict("There is already a price from that moment.") from None
    prices_apply(offers=[offer])
    return row


def prices_apply(*, offers=None, now: datetime | None = None) -> int:
    """Mirror the price in force onto each offer (beat, every minute). Returns offers changed."""
    now = now or timezone.now()
    offers = offers if offers is not None else Offer.objects.filter(prices__isnull=False).distinct()
    changed = 0
    for offer in offers:
        price = price_in_force(offer=offer, at=now)
        if price != offer.price_per_gpu_hour:
            Offer.objects.filter(pk=offer.pk).update(price_per_gpu_hour=price)
            offer.price_per_gpu_hour = price
            changed += 1
    return changed
