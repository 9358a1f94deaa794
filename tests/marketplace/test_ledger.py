"""The double-entry ledger (marketplace.services.billing.ledger, migration 0006), holds and metering: money moves
only in balanced, immutable transactions (PostgreSQL refuses anything else, whoever writes it), a
reservation holds its expected cost when it is made, and only active seconds are charged."""

import asyncio
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from console.kernel.errors import Conflict, DomainError
from console.kernel.events import publish, tenant_group
from marketplace import tasks
from marketplace.choices import AccountKind, NoticeKind, OfferShape, ReservationState, TransactionKind
from marketplace.models import (
    Allocation,
    BillingNotice,
    LedgerEntry,
    LedgerTransaction,
    Reservation,
    UsageRecord,
)
from marketplace.money import cost, seconds_between
from marketplace.selectors.billing import account_balances, balance_of, hold_remaining
from marketplace.services.billing.credits import credits_grant, ledger_reverse
from marketplace.services.billing.ledger import (
    InsufficientBalance,
    LedgerUnbalanced,
    Leg,
    accounts_of,
    post,
    post_many,
)
from marketplace.services.billing.metering import usage_rate
from marketplace.services.billing.spend import credit_limit_set
from marketplace.services.reservations.lifecycle import (
    reservation_begin,
    reservation_cancel,
    reservation_complete,
    reservation_create,
    reservation_extend,
    reservation_fail,
    reservation_release,
)
from tests.factories import (
    OfferFactory,
    RackFactory,
    SiteFactory,
    activate,
    make_node,
    make_tenant,
)

S = ReservationState
PRICE = Decimal("3.60")  # 8 GPUs: $28.80 an hour, exactly $0.008 a second
# The shared offer: $3.60 per GPU-hour, three free 8-GPU nodes.
pytestmark = [pytest.mark.django_db, pytest.mark.offer(price=PRICE, nodes=3)]


def balances(organization) -> dict:
    return account_balances(organization_ids=[organization.pk])[organization.pk]


def held_for(reservation) -> Decimal:
    return hold_remaining(reservation_ids=[reservation.pk]).get(reservation.pk, Decimal(0))


def unbalanced_transactions() -> list:
    """Every ledger transaction whose entries do not sum to zero (there should be none)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT transaction_id, sum(amount) FROM marketplace_ledgerentry GROUP BY 1 HAVING sum(amount) <> 0"
        )
        return cursor.fetchall()


def reserve(tenant, offer, hours: float = 1, *, start: datetime | None = None) -> Reservation:
    """One node from ``start`` (now) for exactly ``hours``."""
    start = start or timezone.now()
    return reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=hours))


def enqueued(callbacks) -> list[tuple[str, tuple]]:
    """The Celery tasks among captured on-commit callbacks: console.kernel.tasks.enqueue_on_commit registers
    a closure over ``task`` (its name) and ``args``."""
    found = []
    for callback in callbacks:
        cells = dict(
            zip(callback.__code__.co_freevars, (c.cell_contents for c in callback.__closure__ or ()), strict=True)
        )
        if "task" in cells and "args" in cells:
            found.append((cells["task"], cells["args"]))
    return found


def row_counts() -> tuple[int, ...]:
    return (
        LedgerTransaction.objects.count(),
        LedgerEntry.objects.count(),
        BillingNotice.objects.count(),
        Reservation.objects.count(),
        Allocation.objects.count(),
    )


class TestGrants:
    def test_a_grant_moves_money_from_the_platforms_grants_to_the_tenants_credits(self):
        tenant = make_tenant(credit=None)
        org = tenant.organization
        txn = credits_grant(organization=org, amount="250.50", memo="Pilot credit")
        assert txn.kind == TransactionKind.GRANT and txn.memo == "Pilot credit" and txn.organization_id == org.pk
        legs = {(e.account.organization_id, e.account.kind): e.amount for e in txn.entries.select_related("account")}
        assert legs == {
            (None, AccountKind.GRANTS): Decimal("-250.50"),
            (org.pk, AccountKind.CREDITS): Decimal("250.50"),
        }
        balance = balance_of(organization_id=org.pk)
        assert balance["balance"] == balance["available"] == Decimal("250.50") and balance["held"] == 0
        notice = BillingNotice.objects.get(organization=org)
        assert notice.kind == NoticeKind.CREDITS_GRANTED and "$250.50" in notice.message

    def test_pushes_leave_only_after_the_commit(self, django_capture_on_commit_callbacks):
        """Whatever the grant sends arrives after a marker published once the grant's transaction is
        done: nothing went out before (through the real channel layer)."""
        tenant = make_tenant(credit=None)
        group = tenant_group(tenant.organization.pk)

        def grant_then_commit() -> None:
            with django_capture_on_commit_callbacks() as callbacks:
                credits_grant(organization=tenant.organization, amount="10")
            publish(group, "test.marker", {})
            for callback in callbacks:  # what COMMIT would run
                callback()

        async def scenario() -> list:
            layer = get_channel_layer()
            channel = await layer.new_channel()
            await layer.group_add(group, channel)
            await sync_to_async(grant_then_commit)()
            events = []
            while len(events) < 3:
                message = await asyncio.wait_for(layer.receive(channel), timeout=10)
                events.append((message["event"], message["data"]))
            await layer.group_discard(group, channel)
            return events

        events = async_to_sync(scenario)()
        assert [event for event, _ in events] == ["test.marker", "billing.notice", "billing.balance"]
        assert events[1][1]["kind"] == NoticeKind.CREDITS_GRANTED
        assert events[2][1]["balance"] == "10.00"

    @pytest.mark.parametrize("amount", ["-5", "0", "0.00", "1.005", "abc", "", "NaN", "Infinity", "1e11", "1" * 30])
    def test_an_amount_that_is_not_money_is_refused_and_writes_nothing(self, amount):
        tenant = make_tenant(credit=None)
        before = row_counts()
        with pytest.raises(DomainError) as refused:
            credits_grant(organization=tenant.organization, amount=amount)
        assert refused.value.status_code == 400 and "amount" in refused.value.fields
        assert row_counts() == before

    def test_the_largest_amount_with_cents_is_granted_exactly(self):
        tenant = make_tenant(credit=None)
        credits_grant(organization=tenant.organization, amount="99999999999.99")
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("99999999999.99")


class TestImmutability:
    def attempts(self, entry: LedgerEntry):
        txn = entry.transaction
        return {
            "orm update of an entry": lambda: LedgerEntry.objects.filter(pk=entry.pk).update(amount=Decimal("1000")),
            "orm save of an entry": lambda: entry.save(),
            "orm delete of an entry": lambda: entry.delete(),
            "orm update of a transaction": lambda: LedgerTransaction.objects.filter(pk=txn.pk).update(memo="edited"),
            "sql update of an entry": lambda: self.sql(
                "UPDATE marketplace_ledgerentry SET amount = 0.01 WHERE id = %s", entry.pk
            ),
            "sql delete of an entry": lambda: self.sql("DELETE FROM marketplace_ledgerentry WHERE id = %s", entry.pk),
            "sql update of a transaction": lambda: self.sql(
                "UPDATE marketplace_ledgertransaction SET memo = 'x' WHERE id = %s", txn.pk
            ),
            "sql delete of a transaction": lambda: self.sql(
                "DELETE FROM marketplace_ledgertransaction WHERE id = %s", txn.pk
            ),
        }

    @staticmethod
    def sql(statement: str, pk) -> None:
        with connection.cursor() as cursor:
            cursor.execute(statement, [pk])

    def test_ledger_rows_cannot_be_updated_or_deleted_by_any_code(self):
        tenant = make_tenant(credit="100")
        entry = LedgerEntry.objects.select_related("transaction").get(
            account__organization=tenant.organization, account__kind=AccountKind.CREDITS
        )
        for name, attempt in self.attempts(entry).items():
            with pytest.raises(IntegrityError, match="immutable"), transaction.atomic():
                attempt()
            assert LedgerEntry.objects.filter(pk=entry.pk, amount=Decimal("100")).exists(), name
        assert LedgerTransaction.objects.get(pk=entry.transaction_id).memo == "test credit"
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("100")

    def test_usage_records_cannot_be_changed_either(self, offer):
        tenant = make_tenant(credit="1000")
        reservation = activate(reserve(tenant, offer), since=timezone.now() - timedelta(minutes=10))
        usage_rate()
        record = UsageRecord.objects.get(reservation=reservation)
        with pytest.raises(IntegrityError, match="immutable"), transaction.atomic():
            UsageRecord.objects.filter(pk=record.pk).update(amount=0)
        with pytest.raises(IntegrityError, match="immutable"), transaction.atomic():
            record.delete()


class TestBalanceGuard:
    """The deferred constraint trigger: a transaction whose entries do not sum to zero never commits."""

    def forge(self, organization, amounts: list[Decimal], txn_id=None) -> uuid.UUID:
        """Write a transaction straight in SQL, as code bypassing the ledger service would."""
        accounts = accounts_of([organization.pk])
        legs = [accounts[(None, AccountKind.GRANTS)], accounts[(organization.pk, AccountKind.CREDITS)]]
        with connection.cursor() as cursor:
            if txn_id is None:
                txn_id = uuid.uuid4()
                cursor.execute(
                    "INSERT INTO marketplace_ledgertransaction (id, kind, organization_id, memo, created_at) "
                    "VALUES (%s, 'grant', %s, 'forged', now())",
                    [txn_id, organization.pk],
                )
            for account, amount in zip(legs, amounts, strict=False):
                cursor.execute(
                    "INSERT INTO marketplace_ledgerentry (transaction_id, account_id, amount) VALUES (%s, %s, %s)",
                    [txn_id, account.pk, amount],
                )
        return txn_id

    @staticmethod
    def check_now() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")

    def test_an_unbalanced_transaction_is_refused_and_a_balanced_one_passes(self):
        tenant = make_tenant(credit=None)
        with pytest.raises(IntegrityError, match="does not balance"), transaction.atomic():
            self.forge(tenant.organization, [Decimal("-5"), Decimal("1000")])
            self.check_now()
        assert not LedgerTransaction.objects.filter(memo="forged").exists()
        assert balances(tenant.organization)[AccountKind.CREDITS] == 0
        with transaction.atomic():  # the same path with balanced legs is accepted
            self.forge(tenant.organization, [Decimal("-5"), Decimal("5")])
            self.check_now()
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("5")

    @pytest.mark.django_db(transaction=True)
    def test_commit_refuses_an_unbalanced_transaction_or_a_leg_added_later(self):
        tenant = make_tenant(credit=None)
        with pytest.raises(IntegrityError, match="does not balance"):
            with transaction.atomic():
                self.forge(tenant.organization, [Decimal("1000")])
        assert not LedgerTransaction.objects.filter(memo="forged").exists()
        assert not LedgerEntry.objects.filter(account__organization=tenant.organization).exists()
        with transaction.atomic():
            txn_id = self.forge(tenant.organization, [Decimal("-5"), Decimal("5")])
        with pytest.raises(IntegrityError, match="does not balance"):
            with transaction.atomic():  # a third leg, in a later transaction
                self.forge(tenant.organization, [Decimal("7")], txn_id=txn_id)
        assert LedgerEntry.objects.filter(transaction_id=txn_id).count() == 2
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("5")

    def test_the_service_refuses_unbalanced_legs_before_writing(self):
        tenant = make_tenant(credit=None)
        accounts = accounts_of([tenant.organization.pk])
        grants = accounts[(None, AccountKind.GRANTS)]
        credits = accounts[(tenant.organization.pk, AccountKind.CREDITS)]
        before = row_counts()
        for legs in (
            [Leg(grants, Decimal("-5")), Leg(credits, Decimal("4.99"))],
            [Leg(credits, Decimal("5"))],
            [Leg(grants, Decimal("0")), Leg(credits, Decimal("0"))],
        ):
            with pytest.raises(LedgerUnbalanced):
                post(kind=TransactionKind.GRANT, organization_id=tenant.organization.pk, legs=legs)
        good = LedgerTransaction(kind=TransactionKind.GRANT, organization_id=tenant.organization.pk)
        bad = LedgerTransaction(kind=TransactionKind.GRANT, organization_id=tenant.organization.pk)
        with pytest.raises(LedgerUnbalanced):  # one bad transaction in a batch: none of it is written
            post_many(
                [
                    (good, [Leg(grants, Decimal("-1")), Leg(credits, Decimal("1"))]),
                    (bad, [Leg(grants, Decimal("-1")), Leg(credits, Decimal("2"))]),
                ]
            )
        assert row_counts() == before

    def test_zero_legs_are_dropped(self):
        tenant = make_tenant(credit=None)
        accounts = accounts_of([tenant.organization.pk])
        txn = post(
            kind=TransactionKind.GRANT,
            organization_id=tenant.organization.pk,
            legs=[
                Leg(accounts[(None, AccountKind.GRANTS)], Decimal("-3")),
                Leg(accounts[(tenant.organization.pk, AccountKind.HOLDS)], Decimal("0")),
                Leg(accounts[(tenant.organization.pk, AccountKind.CREDITS)], Decimal("3")),
            ],
        )
        assert sorted(txn.entries.values_list("amount", flat=True)) == [Decimal("-3"), Decimal("3")]


class TestReversal:
    def test_a_grant_is_reversed_once_with_the_opposite_legs(self):
        tenant = make_tenant(credit=None)
        grant = credits_grant(organization=tenant.organization, amount="40")
        reversal = ledger_reverse(txn=grant, memo="Granted by mistake")
        assert reversal.kind == TransactionKind.REVERSAL and reversal.reverses_id == grant.pk
        assert reversal.organization_id == tenant.organization.pk and reversal.memo == "Granted by mistake"
        original = {e.account_id: e.amount for e in grant.entries.all()}
        opposite = {e.account_id: e.amount for e in reversal.entries.all()}
        assert opposite == {account: -amount for account, amount in original.items()}
        assert balances(tenant.organization)[AccountKind.CREDITS] == 0
        with pytest.raises(Conflict, match="already been reversed") as again:
            ledger_reverse(txn=grant)
        assert again.value.status_code == 409
        assert LedgerTransaction.objects.filter(kind=TransactionKind.REVERSAL).count() == 1
        with pytest.raises(Conflict):  # a reversal is not reversed by hand either
            ledger_reverse(txn=reversal)

    def test_holds_and_usage_are_not_reversed_by_hand(self, offer):
        tenant = make_tenant(credit="1000")
        reservation = activate(reserve(tenant, offer), since=timezone.now() - timedelta(minutes=5))
        usage_rate()
        hold = LedgerTransaction.objects.get(kind=TransactionKind.HOLD, organization=tenant.organization)
        charge = LedgerTransaction.objects.get(kind=TransactionKind.USAGE, organization=tenant.organization)
        before = row_counts()
        for txn in (hold, charge):
            with pytest.raises(Conflict, match="Only credit grants"):
                ledger_reverse(txn=txn)
        assert row_counts() == before
        assert held_for(reservation) > 0


class TestHolds:
    def test_a_reservation_holds_its_whole_expected_cost(self, offer):
        tenant = make_tenant(credit="1000")
        reservation = reserve(tenant, offer, hours=2)
        expected = cost(price_per_gpu_hour=PRICE, gpus=8, seconds=seconds_between(reservation.start, reservation.end))
        assert expected == Decimal("57.6")
        assert held_for(reservation) == expected
        hold = LedgerTransaction.objects.get(kind=TransactionKind.HOLD)
        assert {e.account.kind: e.amount for e in hold.entries.select_related("account")} == {
            AccountKind.CREDITS: -expected,
            AccountKind.HOLDS: expected,
        }
        assert set(hold.entries.values_list("reservation_id", flat=True)) == {reservation.pk}
        balance = balance_of(organization_id=tenant.organization.pk)
        assert balance["balance"] == Decimal("1000") and balance["held"] == expected
        assert balance["available"] == Decimal("1000") - expected

    def test_short_credits_are_refused_with_402_and_nothing_is_left_behind(self, offer):
        tenant = make_tenant(credit="10")
        before = row_counts()
        with pytest.raises(InsufficientBalance) as refused:
            reserve(tenant, offer, hours=1)
        error = refused.value
        assert error.status_code == 402 and error.code == "insufficient_balance"
        assert "$28.80" in error.message and "$10.00" in error.message
        assert error.details == {"required": "28.80", "available": "10.00"}
        assert row_counts() == before
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("10")

    def test_a_credit_line_lets_the_balance_go_negative_within_it(self, offer):
        tenant = make_tenant(credit="10")
        credit_limit_set(organization=tenant.organization, limit="50")
        reserve(tenant, offer, hours=1)
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("-18.8")
        reserve(tenant, offer, hours=1)  # 31.20 spendable: still fits
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("-47.6")
        with pytest.raises(InsufficientBalance, match=r"\$2\.40 available"):
            reserve(tenant, offer, hours=1)
        assert Reservation.objects.count() == 2

    def test_extending_holds_the_extra_time_only(self, offer):
        tenant = make_tenant(credit="1000")
        reservation = reserve(tenant, offer, hours=1)
        first = held_for(reservation)
        reservation_extend(tenant=tenant, reservation=reservation, end=reservation.end + timedelta(minutes=30))
        assert held_for(reservation) - first == Decimal("14.4")
        holds = LedgerTransaction.objects.filter(kind=TransactionKind.HOLD).order_by("created_at")
        assert [t.entries.get(account__kind=AccountKind.HOLDS).amount for t in holds] == [first, Decimal("14.4")]

    def test_an_extension_the_credits_cannot_cover_is_refused_and_the_end_kept(self, offer):
        tenant = make_tenant(credit="40")
        reservation = reserve(tenant, offer, hours=1)
        end = reservation.end
        with pytest.raises(InsufficientBalance):
            reservation_extend(tenant=tenant, reservation=reservation, end=end + timedelta(hours=1))
        reservation.refresh_from_db()
        assert reservation.end == end and held_for(reservation) == Decimal("28.8")
        assert [a.period.upper for a in reservation.allocations.all()] == [end]

    def test_a_cancelled_pending_reservation_gets_its_whole_hold_back(self, offer, django_capture_on_commit_callbacks):
        tenant = make_tenant(credit="100")
        reservation = reserve(tenant, offer, hours=1, start=timezone.now() + timedelta(hours=1))
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("71.2")
        with django_capture_on_commit_callbacks() as callbacks:
            reservation_cancel(tenant=tenant, reservation=reservation)
        assert ("marketplace.tasks.rate_reservation", (str(reservation.pk),)) in enqueued(callbacks)
        tasks.rate_reservation(str(reservation.pk))  # what the worker runs
        reservation.refresh_from_db()
        assert reservation.billing_settled_at is not None and held_for(reservation) == 0
        kinds = balances(tenant.organization)
        assert kinds[AccountKind.CREDITS] == Decimal("100") and kinds[AccountKind.USAGE] == 0
        assert not UsageRecord.objects.exists()
        release = LedgerTransaction.objects.get(kind=TransactionKind.HOLD_RELEASE)
        assert release.entries.get(account__kind=AccountKind.CREDITS).amount == Decimal("28.8")

    def test_a_failed_reservation_is_billed_nothing_and_its_hold_returned(self, offer):
        tenant = make_tenant(credit="100")
        reservation = reserve(tenant, offer, hours=1)
        assert reservation_begin(reservation_id=reservation.pk)
        assert reservation_fail(reservation_id=reservation.pk, reason="GPU 3 fell off the bus")
        assert usage_rate(reservation_ids=[reservation.pk]) == {"reservations": 1, "records": 0, "settled": 1}
        kinds = balances(tenant.organization)
        assert kinds[AccountKind.CREDITS] == Decimal("100") and kinds[AccountKind.HOLDS] == 0
        assert kinds[AccountKind.USAGE] == 0 and not UsageRecord.objects.exists()

    def test_a_rack_reservation_holds_for_the_nodes_placed(self):
        site = SiteFactory()
        rack_offer = OfferFactory(site=site, shape=OfferShape.RACK, price_per_gpu_hour=PRICE)
        for size in (3, 2):
            rack = RackFactory(site=site)
            for _ in range(size):
                make_node(rack=rack, accelerator=rack_offer.accelerator_type)
        tenant = make_tenant(credit="1000")
        made = [reserve(tenant, rack_offer, hours=1) for _ in range(2)]
        assert sorted(r.node_count for r in made) == [2, 3]
        for reservation in made:
            assert reservation.gpu_count == reservation.node_count * 8
            assert held_for(reservation) == Decimal("28.8") * reservation.node_count


class TestMetering:
    def test_provisioning_and_releasing_time_are_not_billed(self, offer):
        tenant = make_tenant(credit="1000")
        start = timezone.now() - timedelta(seconds=50)  # up to a minute back is taken as "now"
        reservation = reservation_create(
            tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=1)
        )
        reservation = activate(reservation)
        assert reservation.activated_at - reservation.start >= timedelta(seconds=50)
        assert reservation_release(reservation_id=reservation.pk)
        reservation.refresh_from_db()
        assert reservation_complete(reservation_id=reservation.pk)
        usage_rate(now=reservation.deactivated_at + timedelta(hours=2))
        record = UsageRecord.objects.get(reservation=reservation)
        assert (record.period.lower, record.period.upper) == (reservation.activated_at, reservation.deactivated_at)
        seconds = seconds_between(reservation.activated_at, reservation.deactivated_at)
        assert record.seconds == seconds
        assert record.amount == cost(price_per_gpu_hour=PRICE, gpus=8, seconds=seconds)
        assert balances(tenant.organization)[AccountKind.USAGE] == record.amount

    def test_rating_long_after_the_release_stops_exactly_at_deactivation(self, offer):
        tenant = make_tenant(credit="1000")
        reservation = activate(reserve(tenant, offer, hours=2), since=timezone.now() - timedelta(minutes=30))
        assert reservation_release(reservation_id=reservation.pk)
        reservation.refresh_from_db()
        totals = usage_rate(now=reservation.deactivated_at + timedelta(days=40))
        assert totals == {"reservations": 1, "records": 1, "settled": 1}
        record = UsageRecord.objects.get(reservation=reservation)
        assert record.period.upper == reservation.deactivated_at
        seconds = seconds_between(reservation.activated_at, reservation.deactivated_at)
        assert record.amount == cost(price_per_gpu_hour=PRICE, gpus=8, seconds=seconds)
        reservation.refresh_from_db()
        assert reservation.billing_settled_at is not None
        assert usage_rate(now=reservation.deactivated_at + timedelta(days=41)) == {
            "reservations": 0,
            "records": 0,
            "settled": 0,
        }

    def test_rating_in_runs_charges_the_cost_of_the_whole(self, offer):
        tenant = make_tenant(credit="1000")
        since = timezone.now() - timedelta(hours=1)
        reservation = activate(reserve(tenant, offer, hours=2), since=since)
        for offset in (7, 600.5, 601, 1999.999999, 3599):
            usage_rate(now=since + timedelta(seconds=offset))
        assert usage_rate(now=since + timedelta(seconds=3599))["records"] == 0  # the same moment twice
        records = list(UsageRecord.objects.filter(reservation=reservation).order_by("period"))
        assert len(records) == 5 and records[0].period.lower == since
        assert all(a.period.upper == b.period.lower for a, b in zip(records, records[1:], strict=False))
        assert sum(r.amount for r in records) == cost(price_per_gpu_hour=PRICE, gpus=8, seconds=Decimal(3599))
        assert sum(r.seconds for r in records) == Decimal(3599)
        # Covered by the hold: nothing came from the credits.
        assert held_for(reservation) == Decimal("57.6") - sum(r.amount for r in records)
        assert balances(tenant.organization)[AccountKind.CREDITS] == Decimal("1000") - Decimal("57.6")

    def test_usage_beyond_the_hold_is_charged_to_the_credits(self, offer):
        tenant = make_tenant(credit="1000")
        since = timezone.now() - timedelta(hours=2)
        reservation = activate(reserve(tenant, offer, hours=1), since=since)  # holds 28.80
        usage_rate(now=since + timedelta(hours=2))
        kinds = balances(tenant.organization)
        assert kinds[AccountKind.USAGE] == Decimal("57.6") and kinds[AccountKind.HOLDS] == 0
        assert kinds[AccountKind.CREDITS] == Decimal("1000") - Decimal("57.6")
        legs = {
            e.account.kind: e.amount
            for e in LedgerEntry.objects.filter(
                transaction__kind=TransactionKind.USAGE, reservation=reservation
            ).select_related("account")
        }
        assert legs == {
            AccountKind.HOLDS: Decimal("-28.8"),
            AccountKind.CREDITS: Decimal("-28.8"),
            AccountKind.USAGE: Decimal("57.6"),
        }

    def test_leaving_active_enqueues_rating_of_the_reservation(self, offer, django_capture_on_commit_callbacks):
        tenant = make_tenant(credit="1000")
        reservation = activate(reserve(tenant, offer), since=timezone.now() - timedelta(minutes=20))
        with django_capture_on_commit_callbacks() as callbacks:
            assert reservation_release(reservation_id=reservation.pk)
        queued = enqueued(callbacks)
        assert ("marketplace.tasks.rate_reservation", (str(reservation.pk),)) in queued
        assert ("marketplace.tasks.release_reservation", (str(reservation.pk),)) in queued
        tasks.rate_reservation(str(reservation.pk))
        reservation.refresh_from_db()
        assert reservation.billing_settled_at is not None and held_for(reservation) == 0
        with django_capture_on_commit_callbacks() as callbacks:
            assert reservation_complete(reservation_id=reservation.pk)
        assert "marketplace.tasks.rate_reservation" not in [name for name, _ in enqueued(callbacks)]


def test_every_transaction_balances_after_a_whole_lifecycle(offer):
    """Grant, reserve (hold), activate, rate, extend, rate, release, rate (settle), complete; and a
    cancelled and a failed reservation beside it. Every transaction sums to zero and the accounts
    tell one consistent story."""
    tenant = make_tenant(credit="1000")
    other = make_tenant(credit="500")
    org = tenant.organization
    credits_grant(organization=org, amount="250.25")
    reservation = activate(reserve(tenant, offer, hours=1), since=timezone.now() - timedelta(minutes=45))
    usage_rate()
    reservation_extend(tenant=tenant, reservation=reservation, end=reservation.end + timedelta(hours=1))
    usage_rate()
    cancelled = reserve(tenant, offer, start=timezone.now() + timedelta(hours=3))
    reservation_cancel(tenant=tenant, reservation=cancelled)
    failed = reserve(other, offer)
    reservation_begin(reservation_id=failed.pk)
    reservation_fail(reservation_id=failed.pk, reason="no network")
    assert reservation_release(reservation_id=reservation.pk)
    usage_rate()
    assert reservation_complete(reservation_id=reservation.pk)
    usage_rate()

    assert unbalanced_transactions() == []
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # and the trigger agrees
        cursor.execute("SELECT coalesce(sum(amount), 0) FROM marketplace_ledgerentry")
        assert cursor.fetchone()[0] == 0
    reservation.refresh_from_db()
    assert reservation.billing_settled_at is not None
    kinds = balances(org)
    records = UsageRecord.objects.filter(organization=org)
    spent = sum(r.amount for r in records)
    seconds = seconds_between(reservation.activated_at, reservation.deactivated_at)
    assert spent == kinds[AccountKind.USAGE] == cost(price_per_gpu_hour=PRICE, gpus=8, seconds=seconds)
    assert sum(r.seconds for r in records) == seconds
    assert kinds[AccountKind.HOLDS] == 0
    assert kinds[AccountKind.CREDITS] == Decimal("1250.25") - spent
    theirs = balances(other.organization)
    assert (theirs[AccountKind.CREDITS], theirs[AccountKind.HOLDS], theirs[AccountKind.USAGE]) == (500, 0, 0)
    grants = accounts_of([])[(None, AccountKind.GRANTS)]
    assert sum(grants.entries.values_list("amount", flat=True)) == Decimal("-1750.25")
    assert not UsageRecord.objects.filter(reservation__in=[cancelled, failed]).exists()
