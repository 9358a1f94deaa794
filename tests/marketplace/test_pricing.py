"""The price book (marketplace.services.billing.pricing, selectors.catalog.price_in_force) and reserved terms:
a price takes effect on its second, reservations keep the price they were made at, and a term is
priced at the offer's discount and lasts whole calendar months."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from console.kernel.errors import Conflict, DomainError
from marketplace.choices import AccountKind
from marketplace.models import Offer, OfferPrice, Reservation
from marketplace.money import add_months, cost, seconds_between
from marketplace.selectors.billing import account_balances, hold_remaining
from marketplace.selectors.catalog import price_in_force
from marketplace.services.billing.metering import usage_rate
from marketplace.services.billing.pricing import offer_price_set, prices_apply
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_begin,
    reservation_create,
    reservation_quote,
)
from tests.factories import OfferFactory, make_tenant

pytestmark = [pytest.mark.django_db, pytest.mark.offer(price="2.49", nodes=3, term_discounts={1: "10", 3: "20"})]


def quote_at(offer: Offer, moment: datetime, *, term_months: int | None = None):
    return reservation_quote(
        offer=offer,
        quantity=1,
        start=None,
        end=None if term_months else moment + timedelta(hours=1),
        term_months=term_months,
        now=moment,
    )


def listed_price(offer: Offer) -> Decimal:
    return Offer.objects.values_list("price_per_gpu_hour", flat=True).get(pk=offer.pk)


class TestPriceBook:
    def test_a_future_price_changes_quotes_on_its_second_before_the_listing_catches_up(self, offer):
        now = timezone.now()
        moment = now + timedelta(hours=1)
        row = offer_price_set(offer=offer, price_per_gpu_hour="3.10", effective_from=moment, note="Q3 repricing")
        assert row.note == "Q3 repricing"
        # The book starts with the price the offer had.
        assert list(
            OfferPrice.objects.filter(offer=offer)
            .order_by("effective_from")
            .values_list("effective_from", "price_per_gpu_hour")
        ) == [(offer.created_at, Decimal("2.49")), (moment, Decimal("3.10"))]
        assert listed_price(offer) == Decimal("2.49")
        assert quote_at(offer, now).price_per_gpu_hour == Decimal("2.49")
        assert quote_at(offer, moment - timedelta(microseconds=1)).price_per_gpu_hour == Decimal("2.49")
        at_moment = quote_at(offer, moment)
        assert at_moment.price_per_gpu_hour == Decimal("3.10")  # the book is read, not the listing
        assert at_moment.expected_cost == Decimal("24.8")
        assert listed_price(offer) == Decimal("2.49")

        assert prices_apply(now=moment - timedelta(seconds=1)) == 0
        assert listed_price(offer) == Decimal("2.49")
        assert prices_apply(now=moment) == 1
        assert listed_price(offer) == Decimal("3.10")
        assert prices_apply(now=moment + timedelta(minutes=1)) == 0  # already mirrored

    def test_the_latest_price_in_force_wins(self, offer):
        now = timezone.now()
        offer_price_set(offer=offer, price_per_gpu_hour="3.00", effective_from=now + timedelta(hours=1))
        offer_price_set(offer=offer, price_per_gpu_hour="2.00", effective_from=now + timedelta(hours=2))
        assert price_in_force(offer=offer, at=now + timedelta(minutes=90)) == Decimal("3.00")
        assert price_in_force(offer=offer, at=now + timedelta(hours=3)) == Decimal("2.00")
        other = OfferFactory(site=offer.site, gpus_per_node=4, price_per_gpu_hour=Decimal("1.25"))
        assert price_in_force(offer=other, at=now + timedelta(hours=3)) == Decimal("1.25")  # no book: its own

    def test_a_price_from_now_is_listed_at_once_and_reservations_keep_theirs(self, offer):
        tenant = make_tenant()
        start = timezone.now()
        before = reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=2))
        offer_price_set(offer=offer, price_per_gpu_hour="4.00")
        assert listed_price(offer) == Decimal("4.00")
        after = reservation_create(
            tenant=tenant, offer=offer, quantity=1, start=timezone.now(), end=timezone.now() + timedelta(hours=1)
        )
        before.refresh_from_db()
        assert (before.price_per_gpu_hour, after.price_per_gpu_hour) == (Decimal("2.49"), Decimal("4.00"))
        # Rated at the price it was made at.
        assert reservation_begin(reservation_id=before.pk) and reservation_activate(reservation_id=before.pk)
        since = timezone.now() - timedelta(hours=1)
        Reservation.objects.filter(pk=before.pk).update(activated_at=since)  # an hour of use, without waiting
        usage_rate(now=since + timedelta(hours=1), reservation_ids=[before.pk])
        usage = account_balances(organization_ids=[tenant.organization.pk])[tenant.organization.pk][AccountKind.USAGE]
        assert usage == Decimal("19.92")  # 8 GPUs x $2.49

    @pytest.mark.parametrize(
        "price", ["-0.01", "abc", "", None, "NaN", "Infinity", "1.23456", "1000000", "1e30", "9" * 40]
    )
    def test_a_price_that_is_not_one_is_refused(self, offer, price):
        with pytest.raises(DomainError) as refused:
            offer_price_set(offer=offer, price_per_gpu_hour=price)
        assert refused.value.status_code == 400 and "price_per_gpu_hour" in refused.value.fields
        assert not OfferPrice.objects.exists() and listed_price(offer) == Decimal("2.49")

    def test_the_largest_price_with_four_decimals_and_zero_are_accepted(self, offer):
        offer_price_set(offer=offer, price_per_gpu_hour="999999.9999")
        assert listed_price(offer) == Decimal("999999.9999")
        offer_price_set(offer=offer, price_per_gpu_hour="0", effective_from=timezone.now() + timedelta(seconds=5))
        assert price_in_force(offer=offer, at=timezone.now() + timedelta(minutes=1)) == 0

    def test_prices_cannot_be_changed_in_the_past(self, offer):
        with pytest.raises(DomainError, match="in the past") as refused:
            offer_price_set(
                offer=offer, price_per_gpu_hour="1.99", effective_from=timezone.now() - timedelta(minutes=5)
            )
        assert "effective_from" in refused.value.fields
        assert not OfferPrice.objects.exists()

    def test_two_prices_from_one_moment_conflict(self, offer):
        moment = timezone.now() + timedelta(days=1)
        offer_price_set(offer=offer, price_per_gpu_hour="3.00", effective_from=moment)
        with pytest.raises(Conflict):
            offer_price_set(offer=offer, price_per_gpu_hour="3.50", effective_from=moment)
        assert list(OfferPrice.objects.filter(effective_from=moment).values_list("price_per_gpu_hour", flat=True)) == [
            Decimal("3.00")
        ]


class TestTerms:
    @pytest.mark.parametrize(
        "start,months,end",
        [
            (datetime(2027, 1, 31, 10, 30, tzinfo=UTC), 1, datetime(2027, 2, 28, 10, 30, tzinfo=UTC)),
            (datetime(2028, 1, 31, 10, 30, tzinfo=UTC), 1, datetime(2028, 2, 29, 10, 30, tzinfo=UTC)),
            (datetime(2027, 8, 31, 0, 0, tzinfo=UTC), 1, datetime(2027, 9, 30, 0, 0, tzinfo=UTC)),
            (datetime(2027, 11, 30, 23, 59, tzinfo=UTC), 3, datetime(2028, 2, 29, 23, 59, tzinfo=UTC)),
            (datetime(2027, 12, 15, 8, 0, tzinfo=UTC), 12, datetime(2028, 12, 15, 8, 0, tzinfo=UTC)),
            (datetime(2027, 10, 31, 12, 0, tzinfo=UTC), 6, datetime(2028, 4, 30, 12, 0, tzinfo=UTC)),
        ],
    )
    def test_calendar_months(self, start, months, end):
        assert add_months(start, months) == end

    def test_a_term_ends_after_whole_calendar_months_at_the_discounted_price(self, offer):
        moment = datetime(2028, 1, 31, 9, 0, tzinfo=UTC)  # quoted as if it were then
        quote = quote_at(offer, moment, term_months=1)
        assert quote.start == moment and quote.end == datetime(2028, 2, 29, 9, 0, tzinfo=UTC)
        assert quote.price_per_gpu_hour == Decimal("2.2410")  # 10 % off 2.49
        three = quote_at(offer, moment, term_months=3)
        assert three.end == moment.replace(month=4, day=30) and three.price_per_gpu_hour == Decimal("1.9920")
        assert three.expected_cost == cost(
            price_per_gpu_hour=Decimal("1.992"), gpus=8, seconds=seconds_between(moment, three.end)
        )

    def test_the_discount_applies_to_the_price_in_force(self, offer):
        moment = timezone.now() + timedelta(hours=1)
        offer_price_set(offer=offer, price_per_gpu_hour="3.3333", effective_from=moment)
        assert quote_at(offer, moment, term_months=1).price_per_gpu_hour == Decimal("3.0000")  # 2.99997 rounded

    def test_a_term_reservation_holds_its_whole_term_and_keeps_its_price(self, offer):
        tenant = make_tenant()
        start = timezone.now()
        reservation = reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=None, term_months=3)
        assert reservation.term_months == 3 and reservation.price_per_gpu_hour == Decimal("1.9920")
        assert reservation.end == add_months(start, 3)
        held = hold_remaining(reservation_ids=[reservation.pk])[reservation.pk]
        assert held == cost(
            price_per_gpu_hour=Decimal("1.992"), gpus=8, seconds=seconds_between(start, reservation.end)
        )
        offer_price_set(offer=offer, price_per_gpu_hour="9.00")
        reservation.refresh_from_db()
        assert reservation.price_per_gpu_hour == Decimal("1.9920")

    def test_a_term_the_offer_does_not_sell_or_an_end_that_is_not_the_terms_is_refused(self, offer):
        now = timezone.now()
        with pytest.raises(DomainError) as no_term:
            quote_at(offer, now, term_months=6)
        assert no_term.value.code == "invalid_term" and "1, 3" in no_term.value.message
        with pytest.raises(DomainError) as wrong_end:
            reservation_quote(offer=offer, quantity=1, start=now, end=now + timedelta(days=20), term_months=1, now=now)
        assert wrong_end.value.code == "invalid_window" and "end" in wrong_end.value.fields
