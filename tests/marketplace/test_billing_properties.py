"""Billing shown correct (ARCHITECTURE invariant 4) by properties rather than examples.

Random histories of reservations -- made on demand or for a reserved term, extended, cancelled,
moved along their lifecycle, refused -- are interleaved with rating runs at random moments of a clock
the test moves. After every step: every ledger transaction sums to zero, every active second (and
every committed second of a reserved term its tenant released early) is rated exactly once at the
reservation's price, holds never go negative and are gone once a reservation is settled, and the money
a tenant was granted is all still there, as credits, holds or usage.

The clock is the only stand-in: the services read ``django.utils.timezone.now``, which the test
patches with a clock it advances; everything else is the real services on PostgreSQL."""

from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from unittest import mock
from zoneinfo import ZoneInfo

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.kernel.errors import DomainError
from marketplace.choices import SETTLING_STATES, AccountKind, TransactionKind
from marketplace.choices import ReservationState as S
from marketplace.models import (
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    Offer,
    OfferTermDiscount,
    Reservation,
    UsageRecord,
)
from marketplace.money import cost, month_start, seconds_between
from marketplace.selectors.billing import account_balances, balance_of, spent_in_month
from marketplace.services.billing.ledger import InsufficientBalance, accounts_of
from marketplace.services.billing.metering import usage_rate
from marketplace.services.reservations.lifecycle import (
    QuotaExceeded,
    reservation_activate,
    reservation_begin,
    reservation_cancel,
    reservation_complete,
    reservation_create,
    reservation_extend,
    reservation_fail,
    reservation_release,
    reservations_advance,
)
from marketplace.services.reservations.placement import CapacityUnavailable
from marketplace.tenant_context import TenantContext
from tests.factories import OfferFactory, RackFactory, make_node, make_tenant

pytestmark = pytest.mark.django_db

ZERO = Decimal(0)
HOUR_US = 3600 * 10**6
MICRO = timedelta(microseconds=1)
KINDS = (AccountKind.CREDITS, AccountKind.HOLDS, AccountKind.USAGE)
# Clocks start a few hours before a UTC month ends (a leap February among them), so that histories
# cross month boundaries often.
MONTH_ENDS = [
    datetime(2031, 1, 31, 18, tzinfo=UTC),
    datetime(2031, 4, 30, 20, tzinfo=UTC),
    datetime(2031, 12, 31, 21, tzinfo=UTC),
    datetime(2032, 2, 29, 19, tzinfo=UTC),
]
SETTINGS = {
    "deadline": None,
    "database": None,  # nothing written into the checkout; a failure prints its reproduction
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


class Clock:
    """What ``timezone.now()`` answers in the services while patched: moved only by the test."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


@dataclass
class World:
    """What every example starts from: two tenants (one rich, one nearly broke) and two offers with
    nodes (one with term discounts, one at an awkward price on 3-GPU nodes)."""

    tenants: list[TenantContext]
    offers: list[Offer]
    granted: dict  # organization id -> credit granted

    def tenant_of(self, organization_id) -> TenantContext:
        return next(t for t in self.tenants if t.organization.pk == organization_id)


@pytest.fixture
def world(db) -> World:
    even = OfferFactory(price_per_gpu_hour=Decimal("2.49"))
    OfferTermDiscount.objects.create(offer=even, term_months=1, percent_off=Decimal("15"))
    OfferTermDiscount.objects.create(offer=even, term_months=3, percent_off=Decimal("27.5"))
    odd = OfferFactory(price_per_gpu_hour=Decimal("1.2345"), gpus_per_node=3)
    for offer, count in ((even, 8), (odd, 5)):
        racks = [RackFactory(site=offer.site), RackFactory(site=offer.site)]
        for i in range(count):
            make_node(rack=racks[i % 2], accelerator=offer.accelerator_type, gpus=offer.gpus_per_node)
    credits = [Decimal("60000"), Decimal("900")]
    tenants = [make_tenant(credit=str(amount)) for amount in credits]
    return World(
        tenants=tenants,
        offers=[even, odd],
        granted={t.organization.pk: amount for t, amount in zip(tenants, credits, strict=True)},
    )


@pytest.fixture
def clock():
    clock = Clock(datetime(2031, 1, 31, 22, tzinfo=UTC))
    with mock.patch("django.utils.timezone.now", clock):
        yield clock


@contextmanager
def rolled_back():
    """One hypothesis example in a savepoint that is rolled back after it, so that examples of one
    test do not see each other's rows."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


# What the books look like, read straight from the tables.


def unbalanced_transactions() -> list[tuple]:
    """Ledger transactions, over the whole table, whose entries do not sum to zero (or that have
    fewer than two entries). Empty when the books balance."""
    txn, entry = LedgerTransaction._meta.db_table, LedgerEntry._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT t.id, coalesce(sum(e.amount), 0), count(e.id) FROM {txn} t "  # noqa: S608 - table names only
            f"LEFT JOIN {entry} e ON e.transaction_id = t.id GROUP BY t.id "
            "HAVING coalesce(sum(e.amount), 0) <> 0 OR count(e.id) < 2"
        )
        return cursor.fetchall()


def ledger_of(reservation_ids) -> dict:
    """``{reservation_id: {kind: sum of its entries on the tenant's accounts of that kind}}``."""
    result = defaultdict(lambda: dict.fromkeys(KINDS, ZERO))
    rows = (
        LedgerEntry.objects.filter(reservation_id__in=list(reservation_ids))
        .values_list("reservation_id", "account__kind")
        .annotate(total=Sum("amount"))
    )
    for reservation_id, kind, total in rows:
        result[reservation_id][kind] = total
    return result


def records_of(reservation_ids) -> dict:
    """``{reservation_id: [(period, seconds, amount), ...]}`` in time order."""
    result = defaultdict(list)
    rows = (
        UsageRecord.objects.filter(reservation_id__in=list(reservation_ids))
        .order_by("reservation_id", "period")
        .values_list("reservation_id", "period", "seconds", "amount")
    )
    for reservation_id, period, seconds, amount in rows:
        result[reservation_id].append((period, seconds, amount))
    return result


def footprint() -> tuple:
    """Everything a refused request must leave as it was."""
    return (
        LedgerTransaction.objects.count(),
        LedgerEntry.objects.count(),
        UsageRecord.objects.count(),
        tuple(Reservation.objects.order_by("pk").values_list("pk", "state", "period", "activated_at")),
    )


def price_of(reservation: Reservation) -> dict:
    return {"price_per_gpu_hour": reservation.price_per_gpu_hour, "gpus": reservation.gpu_count}


def assert_contiguous_from(records: list, start: datetime, end: datetime) -> None:
    """The records tile [start, end) with no gap and no overlap, none crossing a UTC month boundary."""
    cursor = start
    for period, seconds, _amount in records:
        assert period.lower == cursor, f"gap or overlap at {cursor}: next record starts {period.lower}"
        assert period.upper > period.lower
        assert seconds == seconds_between(period.lower, period.upper)
        assert month_start(period.lower.astimezone(UTC)) == month_start((period.upper - MICRO).astimezone(UTC))
        cursor = period.upper
    assert cursor == end, f"rated up to {cursor}, expected {end}"


def assert_books_hold(world: World) -> None:
    """Whole-ledger checks: each transaction balances, and each tenant's credits, holds and usage
    add up to what it was granted, the platform's grants account to minus all of it."""
    assert unbalanced_transactions() == []
    balances = account_balances(organization_ids=list(world.granted))
    for organization_id, granted in world.granted.items():
        kinds = balances[organization_id]
        assert sum(kinds[kind] for kind in KINDS) == granted, f"money of {organization_id} not conserved: {kinds}"
        money = balance_of(organization_id=organization_id)
        assert money["balance"] + money["spent"] == granted
    grants = LedgerEntry.objects.filter(account__organization__isnull=True, account__kind=AccountKind.GRANTS)
    assert grants.aggregate(total=Sum("amount"))["total"] == -sum(world.granted.values())


# The property test: random histories played on the real services.

# Lifecycle moves: the states each applies to, and the call (given the row and its tenant).
MOVES = {
    "begin": ((S.PENDING,), lambda r, _t: reservation_begin(reservation_id=r.pk)),
    "activate": ((S.PROVISIONING,), lambda r, _t: reservation_activate(reservation_id=r.pk)),
    "fail": ((S.PROVISIONING,), lambda r, _t: reservation_fail(reservation_id=r.pk, reason="simulated failure")),
    "release": ((S.PROVISIONING, S.ACTIVE), lambda r, _t: reservation_release(reservation_id=r.pk)),
    "complete": ((S.RELEASING,), lambda r, _t: reservation_complete(reservation_id=r.pk)),
    "cancel": ((S.PENDING, S.PROVISIONING, S.ACTIVE), lambda r, t: reservation_cancel(tenant=t, reservation=r)),
}
PICK = st.integers(min_value=0)  # which reservation, by index into those a step applies to
ARGUMENTS = {
    "create": st.fixed_dictionaries(
        {
            "who": st.integers(0, 1),
            "which": st.integers(0, 1),
            "lead": st.one_of(st.none(), st.integers(0, 3 * HOUR_US)),  # None: starts now
            "minutes": st.integers(1, 30 * 60),
            "quantity": st.integers(1, 2),
            "term": st.sampled_from([None, None, None, 1, 3]),
        }
    ),
    **dict.fromkeys(MOVES, PICK),
    "extend": st.tuples(PICK, st.integers(1, 12 * 60)),
    "wait": st.integers(0, 3 * HOUR_US),
    "rate": st.none(),  # a periodic run over everything
    "rate one": PICK,  # rate_reservation, as when a reservation leaves active
    "tick": st.none(),  # beat: begin what is due, release what ended
}
# How often each kind of step comes up: reservations brought up and rated are what the properties
# are about, and each is a chain of steps.
WEIGHTS = {"create": 3, "begin": 2, "activate": 3, "rate": 3}
OPERATIONS = st.one_of(
    *(st.tuples(st.just(kind), arguments) for kind, arguments in ARGUMENTS.items() for _ in range(WEIGHTS.get(kind, 1)))
)


class History:
    """Plays one random history of two tenants' reservations and checks the books after each step.
    The model it keeps is small on purpose: when each reservation was last looked at by a rating
    run, and which ones a run must have settled; everything else is derived from the rows."""

    def __init__(self, world: World, clock: Clock, seen: Counter):
        self.world, self.clock, self.seen = world, clock, seen
        self.ids: list = []  # in the order they were made
        self.rated_at: dict = {}  # reservation id -> `now` of the last run that looked at it
        self.must_be_settled: set = set()

    def play(self, kind: str, arguments) -> None:
        if kind == "create":
            self.create(**arguments)
        elif kind in MOVES:
            self.move(kind, arguments)
        elif kind == "extend":
            self.extend(*arguments)
        elif kind == "wait":
            self.clock.advance(timedelta(microseconds=arguments))
        elif kind == "rate":
            self.rate(None)
        elif kind == "rate one" and self.ids:
            self.rate([self.ids[arguments % len(self.ids)]])
        elif kind == "tick":
            reservations_advance(now=self.clock.now)

    @contextmanager
    def refusal_changes_nothing(self, *refusals: type[Exception]):
        before = footprint()
        try:
            yield
        except refusals as refusal:
            assert footprint() == before, f"a refused request changed something: {refusal}"
            self.seen["refused"] += 1

    def _in(self, states) -> list:
        """This history's reservations in ``states``, in the order they were made (not by their random
        ids, so that hypothesis replays an example the same way)."""
        found = set(Reservation.objects.filter(pk__in=self.ids, state__in=states).values_list("pk", flat=True))
        return [pk for pk in self.ids if pk in found]

    def create(self, *, who, which, lead, minutes, quantity, term):
        tenant, offer = self.world.tenants[who], self.world.offers[which]
        discount = offer.term_discounts.filter(term_months=term).first() if term else None
        start = None if lead is None else self.clock.now + timedelta(microseconds=lead)
        end = None if discount else (start or self.clock.now) + timedelta(minutes=minutes)
        reservation = None
        with self.refusal_changes_nothing(CapacityUnavailable, InsufficientBalance, QuotaExceeded):
            reservation = reservation_create(
                tenant=tenant,
                offer=offer,
                quantity=quantity,
                start=start,
                end=end,
                term_months=discount.term_months if discount else None,
            )
        if reservation is None:
            return
        price = offer.price_per_gpu_hour
        if discount:
            price = (price * (100 - discount.percent_off) / 100).quantize(Decimal("0.0001"))
        assert reservation.price_per_gpu_hour == price
        held = cost(**price_of(reservation), seconds=seconds_between(reservation.start, reservation.end))
        assert ledger_of([reservation.pk])[reservation.pk] == {
            AccountKind.CREDITS: -held,
            AccountKind.HOLDS: held,
            AccountKind.USAGE: ZERO,
        }
        self.ids.append(reservation.pk)
        self.seen["created"] += 1

    def extend(self, pick: int, minutes: int) -> None:
        if not self.ids:
            return
        row = Reservation.objects.get(pk=self.ids[pick % len(self.ids)])
        held_before = ledger_of([row.pk])[row.pk][AccountKind.HOLDS]
        new_end = row.end + timedelta(minutes=minutes)
        with self.refusal_changes_nothing(DomainError):  # no capacity or balance, too long, not extendable
            reservation_extend(tenant=self.world.tenant_of(row.organization_id), reservation=row, end=new_end)
            more = cost(**price_of(row), seconds=seconds_between(row.start, new_end)) - cost(
                **price_of(row), seconds=seconds_between(row.start, row.end)
            )
            assert ledger_of([row.pk])[row.pk][AccountKind.HOLDS] == held_before + more
            self.seen["extended"] += 1

    def move(self, move: str, pick: int) -> None:
        """A lifecycle move of one of this history's reservations in a state it applies to."""
        states, call = MOVES[move]
        candidates = self._in(states)
        if move == "begin":  # only those whose start has come
            starts = dict(Reservation.objects.filter(pk__in=candidates).values_list("pk", "period"))
            candidates = [pk for pk in candidates if starts[pk].lower <= self.clock.now]
        if not candidates:
            return
        row = Reservation.objects.get(pk=candidates[pick % len(candidates)])
        assert call(row, self.world.tenant_of(row.organization_id)) is not False, f"{move} of a {row.state} one"
        self.seen[move] += 1
        self.seen["released early"] += Reservation.objects.filter(pk=row.pk, released_early_at__isnull=False).exists()

    def rate(self, reservation_ids: list | None) -> None:
        candidates = Reservation.objects.filter(billing_settled_at__isnull=True, state__in=[S.ACTIVE, *SETTLING_STATES])
        if reservation_ids is not None:
            candidates = candidates.filter(pk__in=reservation_ids)
        looked_at = dict(candidates.values_list("pk", "state"))
        records_before = UsageRecord.objects.count()
        totals = usage_rate(now=self.clock.now, reservation_ids=reservation_ids)
        assert totals["reservations"] == len(looked_at)
        assert totals["records"] == UsageRecord.objects.count() - records_before
        committed = dict(Reservation.objects.filter(pk__in=looked_at).values_list("pk", "released_early_at"))
        ends = dict(Reservation.objects.filter(pk__in=looked_at).values_list("pk", "period"))
        for pk, state in looked_at.items():
            self.rated_at[pk] = self.clock.now
            # A term released early is settled only once its committed rest is rated, at the term's end.
            if state in SETTLING_STATES and (committed[pk] is None or self.clock.now >= ends[pk].upper):
                self.must_be_settled.add(pk)
        self.seen["billed"] += bool(totals["records"])
        self.seen["settled"] += totals["settled"]

    # After every step.

    def check(self) -> None:
        assert_books_hold(self.world)
        ledger, records = ledger_of(self.ids), records_of(self.ids)
        for row in Reservation.objects.filter(pk__in=self.ids):
            self._check_reservation(row, ledger[row.pk], records[row.pk])

    def _check_reservation(self, row: Reservation, money: dict, records: list) -> None:
        settled = row.billing_settled_at is not None
        assert settled == (row.pk in self.must_be_settled), f"{row.pk} settled={settled} in {row.state}"
        # Every leg of a reservation moves money between its tenant's own accounts.
        assert sum(money.values()) == ZERO
        assert money[AccountKind.HOLDS] >= 0, f"negative hold {money[AccountKind.HOLDS]} for {row.state}"
        if settled:
            assert money[AccountKind.HOLDS] == 0, "a settled reservation still holds money"
        if row.released_early_at is not None:  # only a term, only released by its tenant, only early
            assert row.term_months is not None and row.released_early_at < row.end
            assert row.deactivated_at in (None, row.released_early_at)
        # Billed: the active interval; for a term released early, from then on to the term's end.
        billed_from = row.activated_at or row.released_early_at
        if billed_from is None:  # never active (pending, provisioning, cancelled, failed): free
            assert records == [] and money[AccountKind.USAGE] == 0
            return
        rated_end = self._rated_end(row, settled)
        if rated_end is None or rated_end <= billed_from:
            assert records == []
            rated_end = billed_from
        else:
            assert_contiguous_from(records, billed_from, rated_end)
        seconds = seconds_between(billed_from, rated_end)
        assert sum((s for _p, s, _a in records), ZERO) == seconds
        charged = sum((a for _p, _s, a in records), ZERO)
        assert charged == cost(**price_of(row), seconds=seconds), "cumulative rating lost or gained money"
        assert money[AccountKind.USAGE] == charged

    def _rated_end(self, row: Reservation, settled: bool) -> datetime | None:
        billed_end = row.end if row.released_early_at is not None else row.deactivated_at
        if settled:
            assert billed_end is not None, "settled while still active"
            return billed_end
        last_run = self.rated_at.get(row.pk)
        if last_run is None or billed_end is None:
            return last_run
        return min(last_run, billed_end)


def test_random_histories_keep_the_books_exact(world):
    seen = Counter()  # over all examples: proof that the histories reached what matters

    @settings(max_examples=40, **SETTINGS)
    @given(
        start=st.builds(
            lambda end, offset: end + timedelta(microseconds=offset),
            st.sampled_from(MONTH_ENDS),
            st.integers(0, 6 * HOUR_US),
        ),
        operations=st.lists(st.tuples(st.integers(0, HOUR_US), OPERATIONS), min_size=20, max_size=40),
    )
    def histories(start, operations):
        clock = Clock(start)
        with rolled_back(), mock.patch("django.utils.timezone.now", clock):
            history = History(world, clock, seen)
            history.check()
            for elapse, operation in operations:  # time passes between any two steps
                clock.advance(timedelta(microseconds=elapse))
                history.play(*operation)
                history.check()
            # PostgreSQL's own check (migration 0006), forced now rather than at a COMMIT that the
            # rollback never reaches.
            with connection.cursor() as cursor:
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
                cursor.execute("SET CONSTRAINTS ALL DEFERRED")

    histories()
    assert seen["billed"] and seen["settled"] and seen["activate"] and seen["refused"], seen


# Rating, example by example.


def active_reservation(clock: Clock, *, tenant: TenantContext, offer: Offer, hours: float = 1) -> Reservation:
    """A reservation made, provisioned and active now (its hold covers ``hours``)."""
    reservation = reservation_create(
        tenant=tenant, offer=offer, quantity=1, start=None, end=clock.now + timedelta(hours=hours)
    )
    assert reservation_begin(reservation_id=reservation.pk)
    assert reservation_activate(reservation_id=reservation.pk)
    reservation.refresh_from_db()
    assert reservation.activated_at == clock.now
    return reservation


def counts() -> tuple[int, int, int]:
    return LedgerTransaction.objects.count(), LedgerEntry.objects.count(), UsageRecord.objects.count()


def test_rating_twice_changes_nothing(world, clock):
    reservation = active_reservation(clock, tenant=world.tenants[0], offer=world.offers[0], hours=2)
    clock.advance(timedelta(minutes=37, microseconds=3))
    first = usage_rate(now=clock.now)
    assert first == {"reservations": 1, "records": 1, "settled": 0}
    after_first = counts()
    assert usage_rate(now=clock.now) == {"reservations": 1, "records": 0, "settled": 0}
    assert counts() == after_first
    # A run whose clock is behind what was rated (another worker's skew) adds nothing either.
    assert usage_rate(now=clock.now - timedelta(minutes=5))["records"] == 0
    assert counts() == after_first

    clock.advance(timedelta(minutes=3))
    assert reservation_release(reservation_id=reservation.pk)
    clock.advance(timedelta(minutes=10))
    assert usage_rate(now=clock.now) == {"reservations": 1, "records": 1, "settled": 1}
    reservation.refresh_from_db()
    settled_at, after_settling = reservation.billing_settled_at, counts()
    assert usage_rate(now=clock.now + timedelta(hours=1)) == {"reservations": 0, "records": 0, "settled": 0}
    assert usage_rate(now=clock.now, reservation_ids=[reservation.pk])["reservations"] == 0
    reservation.refresh_from_db()
    assert (reservation.billing_settled_at, counts()) == (settled_at, after_settling)

    # 40 minutes were active: that is billed, the rest of the 2-hour hold went back to credits.
    billed = cost(**price_of(reservation), seconds=Decimal(40 * 60) + Decimal("0.000003"))
    assert ledger_of([reservation.pk])[reservation.pk] == {
        AccountKind.CREDITS: -billed,
        AccountKind.HOLDS: ZERO,
        AccountKind.USAGE: billed,
    }
    assert LedgerTransaction.objects.filter(kind=TransactionKind.HOLD_RELEASE).count() == 1


@settings(max_examples=40, **SETTINGS)
@given(cuts=st.lists(st.integers(1, 50 * HOUR_US), max_size=10), length=st.integers(1, 50 * HOUR_US))
def test_rating_at_any_cut_points_charges_the_cost_of_the_whole(world, clock, cuts, length):
    with rolled_back():
        clock.now = datetime(2031, 1, 31, 3, 17, 11, 123457, tzinfo=UTC)
        tenant, offer = world.tenants[0], world.offers[1]  # 3 GPUs at $1.2345: every second rounds
        cut = active_reservation(clock, tenant=tenant, offer=offer, hours=2)
        once = active_reservation(clock, tenant=tenant, offer=offer, hours=2)
        activated = cut.activated_at
        for point in sorted(cuts):
            usage_rate(now=activated + timedelta(microseconds=point), reservation_ids=[cut.pk])
        clock.now = activated + timedelta(microseconds=max([length, *cuts]))
        for reservation in (cut, once):
            assert reservation_release(reservation_id=reservation.pk)
        usage_rate(now=clock.now)

        whole = cost(**price_of(cut), seconds=seconds_between(activated, clock.now))
        records = records_of([cut.pk, once.pk])
        assert_contiguous_from(records[cut.pk], activated, clock.now)
        assert_contiguous_from(records[once.pk], activated, clock.now)
        assert sum(a for _p, _s, a in records[cut.pk]) == whole
        assert sum(a for _p, _s, a in records[once.pk]) == whole
        assert unbalanced_transactions() == []


def test_records_are_cut_at_utc_month_boundaries(world, clock):
    """Active from 23:30 on 31 January (UTC; the clock speaks Berlin time, where February has
    already begun) to 1 March, rated along the way: records never cross a UTC month boundary, and
    each month is charged exactly what the cumulative cost gained in it."""
    berlin = ZoneInfo("Europe/Berlin")
    clock.now = datetime(2031, 2, 1, 0, 30, 0, 250000, tzinfo=berlin)  # 2031-01-31 23:30:00.25 UTC
    reservation = active_reservation(clock, tenant=world.tenants[0], offer=world.offers[0], hours=24 * 31)
    activated = reservation.activated_at
    usage_rate(now=datetime(2031, 1, 31, 23, 50, tzinfo=UTC))
    usage_rate(now=datetime(2031, 2, 1, 0, 10, tzinfo=UTC))
    clock.now = datetime(2031, 3, 1, 0, 15, tzinfo=UTC)
    assert reservation_release(reservation_id=reservation.pk)
    usage_rate(now=clock.now)

    feb, mar = datetime(2031, 2, 1, tzinfo=UTC), datetime(2031, 3, 1, tzinfo=UTC)
    records = records_of([reservation.pk])[reservation.pk]
    assert [(p.lower, p.upper) for p, _s, _a in records] == [
        (activated, datetime(2031, 1, 31, 23, 50, tzinfo=UTC)),
        (datetime(2031, 1, 31, 23, 50, tzinfo=UTC), feb),
        (feb, datetime(2031, 2, 1, 0, 10, tzinfo=UTC)),
        (datetime(2031, 2, 1, 0, 10, tzinfo=UTC), mar),
        (mar, clock.now),
    ]

    def through(moment: datetime) -> Decimal:
        return cost(**price_of(reservation), seconds=seconds_between(activated, moment))

    org = reservation.organization_id
    assert spent_in_month(organization_id=org, month=date(2031, 1, 1)) == through(feb)
    assert spent_in_month(organization_id=org, month=feb.date()) == through(mar) - through(feb)
    assert spent_in_month(organization_id=org, month=mar.date()) == through(clock.now) - through(mar)


def test_usage_beyond_the_hold_is_charged_to_credits(world, clock):
    """The hold covers the hour reserved; a release that comes late bills the overstay to credits."""
    tenant, offer = world.tenants[1], world.offers[0]
    granted = world.granted[tenant.organization.pk]
    reservation = active_reservation(clock, tenant=tenant, offer=offer, hours=1)
    held = cost(**price_of(reservation), seconds=Decimal(3600))  # 8 GPUs x $2.49 = $19.92
    assert held == Decimal("19.92")

    clock.advance(timedelta(minutes=30))
    usage_rate(now=clock.now)
    half = cost(**price_of(reservation), seconds=Decimal(1800))
    assert ledger_of([reservation.pk])[reservation.pk][AccountKind.HOLDS] == held - half

    clock.advance(timedelta(minutes=60))
    usage_rate(now=clock.now)
    total = cost(**price_of(reservation), seconds=Decimal(5400))
    last = UsageRecord.objects.filter(reservation=reservation).order_by("-period").first()
    legs = dict(last.transaction.entries.values_list("account__kind", "amount"))
    assert legs == {
        AccountKind.HOLDS: -(held - half),  # the rest of the hold, then...
        AccountKind.CREDITS: -(total - held),  # ...the overstay from credits
        AccountKind.USAGE: total - half,
    }
    assert ledger_of([reservation.pk])[reservation.pk] == {
        AccountKind.CREDITS: -total,
        AccountKind.HOLDS: ZERO,
        AccountKind.USAGE: total,
    }

    assert reservation_release(reservation_id=reservation.pk)
    usage_rate(now=clock.now + timedelta(minutes=1))
    reservation.refresh_from_db()
    assert reservation.billing_settled_at is not None
    assert not LedgerTransaction.objects.filter(kind=TransactionKind.HOLD_RELEASE).exists()  # nothing was left
    money = balance_of(organization_id=tenant.organization.pk)
    assert (money["balance"], money["held"], money["spent"]) == (granted - total, ZERO, total)
    assert_books_hold(world)


def test_failed_and_cancelled_reservations_cost_nothing(world, clock):
    tenant, offer = world.tenants[0], world.offers[0]
    end = clock.now + timedelta(hours=3)
    made = [reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=end) for _ in ("c", "f", "r")]
    cancelled, failed, released = (r.pk for r in made)
    reservation_cancel(tenant=tenant, reservation=made[0])
    for pk in (failed, released):
        assert reservation_begin(reservation_id=pk)
    clock.advance(timedelta(minutes=20))
    assert reservation_fail(reservation_id=failed, reason="no agent")
    assert reservation_release(reservation_id=released, reason="gave up")
    clock.advance(timedelta(hours=5))
    assert usage_rate(now=clock.now) == {"reservations": 3, "records": 0, "settled": 3}

    ledger = ledger_of([cancelled, failed, released])
    for pk in (cancelled, failed, released):
        assert ledger[pk] == dict.fromkeys(KINDS, ZERO), "billed or still held without being active"
    assert not UsageRecord.objects.exists()
    money = balance_of(organization_id=tenant.organization.pk)
    assert (money["available"], money["held"], money["spent"]) == (world.granted[tenant.organization.pk], 0, 0)


def test_postgresql_refuses_an_unbalanced_transaction(world):
    """The negative control of the deferred check the property test forces: it does fire."""
    org = world.tenants[0].organization.pk
    credits = accounts_of([org])[(org, AccountKind.CREDITS)]
    with pytest.raises(IntegrityError, match="does not balance"), transaction.atomic():
        txn = LedgerTransaction.objects.create(kind=TransactionKind.GRANT, organization_id=org, memo="forged")
        LedgerEntry.objects.create(transaction=txn, account=credits, amount=Decimal("1"))
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # what is left (the world's grants) balances
    assert LedgerAccount.objects.filter(organization_id=org).count() == 3
