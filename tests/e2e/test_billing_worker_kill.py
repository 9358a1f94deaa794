"""A rating worker killed mid-run (SIGKILL, no goodbye) loses only its open batch: what it committed
stays rated once, and the next run rates exactly the rest, to the same totals as if nothing had
happened (ARCHITECTURE invariant 4). A real Celery worker on the billing queue, real PostgreSQL.

Every reservation here was active over a known interval in the past and has since been released, so
what it must be billed is known exactly whenever the runs happen."""

import re
import signal
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.db.models import Sum

from marketplace import tasks
from marketplace.choices import AccountKind, TransactionKind
from marketplace.choices import ReservationState as S
from marketplace.models import LedgerEntry, LedgerTransaction, Reservation, UsageRecord
from marketplace.money import cost, seconds_between, split_at_months
from marketplace.services.billing.ledger import Leg, accounts_of, post_many
from marketplace.tenant_context import TenantContext
from tests.e2e.conftest import Stack, wait_for
from tests.factories import OfferFactory, make_tenant

pytestmark = [pytest.mark.slow]

ROWS = 3000  # more each retry, should a run ever finish before the kill lands
BATCH = 10  # reservations per rating transaction in the worker (BILLING_RATE_BATCH)
GRANT = Decimal("10000000")
# Active intervals start late on 31 March (UTC), so many are cut at the April boundary.
FIRST_ACTIVATION = datetime(2026, 3, 31, 22, 0, tzinfo=UTC)
KINDS = (AccountKind.CREDITS, AccountKind.HOLDS, AccountKind.USAGE)


def released_reservations(tenant: TenantContext, offer, first: int, count: int) -> list:
    """``count`` reservations that were active for up to three hours, bulk-inserted as the lifecycle
    leaves them once released (fast: no placement, no tasks). A third of them also have a hold, set
    aside through the ledger service: some larger than what they used, some smaller."""
    rows = []
    for i in range(first, first + count):
        activated = FIRST_ACTIVATION + timedelta(seconds=i, microseconds=i * 7919 % 1_000_000)
        deactivated = activated + timedelta(seconds=61 * (i % 181 + 1), microseconds=i % 997)
        rows.append(
            Reservation(
                organization=tenant.organization,
                offer=offer,
                created_by=tenant.user,
                shape=offer.shape,
                quantity=1,
                node_count=1,
                gpu_count=1 + i % 8,
                period=DateTimeTZRange(activated - timedelta(minutes=5), activated + timedelta(hours=2), "[)"),
                state=S.RELEASING,
                price_per_gpu_hour=offer.price_per_gpu_hour + Decimal(i % 7) / 10000,
                activated_at=activated,
                deactivated_at=deactivated,
            )
        )
    rows = Reservation.objects.bulk_create(rows, batch_size=1000)
    organization_id = tenant.organization.pk
    accounts = accounts_of([organization_id])
    holds = []
    for i, r in enumerate(rows):
        if i % 3 == 0:
            amount = cost(price_per_gpu_hour=r.price_per_gpu_hour, gpus=r.gpu_count, seconds=Decimal(1800 * (i % 11)))
            if amount:
                holds.append(
                    (
                        LedgerTransaction(kind=TransactionKind.HOLD, organization_id=organization_id, memo="hold"),
                        [
                            Leg(accounts[(organization_id, AccountKind.CREDITS)], -amount, r.pk),
                            Leg(accounts[(organization_id, AccountKind.HOLDS)], amount, r.pk),
                        ],
                    )
                )
    post_many(holds)
    return [r.pk for r in rows]


def settled_count(ids: list) -> int:
    return Reservation.objects.filter(pk__in=ids, billing_settled_at__isnull=False).count()


def open_transactions() -> int:
    """Transactions open on the test database other than this session's: a killed worker's lingers
    until PostgreSQL notices the connection is gone and rolls it back, releasing its row locks."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
        )
        return cursor.fetchone()[0]


def start_worker(stack: Stack) -> None:
    offset = len(stack.log("worker"))
    stack.start_worker()
    wait_for(lambda: " ready." in stack.log("worker")[offset:], timeout=60, what="the Celery worker to be ready")


def unbalanced_transactions() -> list:
    txn, entry = LedgerTransaction._meta.db_table, LedgerEntry._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT t.id FROM {txn} t LEFT JOIN {entry} e ON e.transaction_id = t.id "  # noqa: S608 - table names
            "GROUP BY t.id HAVING coalesce(sum(e.amount), 0) <> 0 OR count(e.id) < 2"
        )
        return cursor.fetchall()


def test_a_rating_worker_killed_mid_run_loses_only_its_open_batch(stack):
    tenant = make_tenant(credit=str(GRANT))
    offer = OfferFactory(price_per_gpu_hour=Decimal("2.4937"))
    stack.env["BILLING_RATE_BATCH"] = str(BATCH)

    # A rating run in the worker, SIGKILLed (the whole process group) once it has committed something.
    ids: list = []
    for attempt in range(3):
        fresh = released_reservations(tenant, offer, len(ids), ROWS * 2**attempt)
        ids += fresh
        start_worker(stack)
        tasks.usage_rate.delay()
        wait_for(lambda fresh=fresh: settled_count(fresh), timeout=60, what="the first batches to commit", every=0.01)
        stack.kill("worker", signal.SIGKILL)
        if settled_count(ids) < len(ids):
            break
    else:
        pytest.fail("every rating run finished before it could be killed")
    killed_at = datetime.now(UTC)
    wait_for(lambda: open_transactions() == 0, timeout=30, what="PostgreSQL to roll back the killed worker's batch")

    # Only whole batches committed: each settled reservation is fully rated, no other one at all.
    settled = set(Reservation.objects.filter(pk__in=ids, billing_settled_at__isnull=False).values_list("pk", flat=True))
    assert 0 < len(settled) < len(ids)
    assert len(settled) % BATCH == 0, "a batch committed in part"
    assert set(UsageRecord.objects.values_list("reservation_id", flat=True)) == settled
    released = LedgerEntry.objects.filter(transaction__kind=TransactionKind.HOLD_RELEASE)
    assert set(released.values_list("reservation_id", flat=True)) <= settled

    # The next run, in a fresh worker, rates the rest.
    start_worker(stack)
    tasks.usage_rate.delay()
    wait_for(lambda: settled_count(ids) == len(ids), timeout=60, what="the second run to settle everything")
    finished = re.compile(r"marketplace\.tasks\.usage_rate\[[^\]]+\] succeeded")
    wait_for(lambda: finished.search(stack.log("worker")), timeout=30, what="the second run to finish")

    # Each reservation rated by exactly one run: the first rated `settled`, the second all the rest.
    runs = defaultdict(set)
    for reservation_id, created_at in UsageRecord.objects.values_list("reservation_id", "created_at"):
        runs[reservation_id].add(created_at > killed_at)
    assert all(len(run) == 1 for run in runs.values()), "a reservation was rated by both runs"
    assert {pk for pk, run in runs.items() if run == {False}} == settled
    assert {pk for pk, run in runs.items() if run == {True}} == set(ids) - settled

    # And to the exact amounts: records tile each active interval, cut at the month, no overlap.
    records = defaultdict(list)
    for reservation_id, period, seconds, amount in UsageRecord.objects.order_by("period").values_list(
        "reservation_id", "period", "seconds", "amount"
    ):
        records[reservation_id].append((period.lower, period.upper, seconds, amount))
    money = defaultdict(dict)
    for reservation_id, kind, total in (
        LedgerEntry.objects.filter(reservation_id__in=ids)
        .values_list("reservation_id", "account__kind")
        .annotate(total=Sum("amount"))
    ):
        money[reservation_id][kind] = total
    billed_total = Decimal(0)
    for r in Reservation.objects.filter(pk__in=ids):
        price = {"price_per_gpu_hour": r.price_per_gpu_hour, "gpus": r.gpu_count}

        def through(moment, r=r, price=price):
            return cost(**price, seconds=seconds_between(r.activated_at, moment))

        expected = [
            (start, end, seconds_between(start, end), through(end) - through(start))
            for start, end in split_at_months(r.activated_at, r.deactivated_at)
        ]
        assert records[r.pk] == expected
        billed = through(r.deactivated_at)
        assert money[r.pk].get(AccountKind.USAGE) == billed
        assert money[r.pk].get(AccountKind.HOLDS, Decimal(0)) == 0, "a hold outlived its reservation"
        assert money[r.pk].get(AccountKind.CREDITS) == -billed
        billed_total += billed
    assert sum(len(pieces) for pieces in records.values()) > len(ids)  # some were cut at 1 April

    assert unbalanced_transactions() == []
    balances = defaultdict(Decimal)
    for kind, total in (
        LedgerEntry.objects.filter(account__organization=tenant.organization)
        .values_list("account__kind")
        .annotate(total=Sum("amount"))
    ):
        balances[kind] = total
    assert balances[AccountKind.USAGE] == billed_total
    assert balances[AccountKind.HOLDS] == 0
    assert sum(balances[kind] for kind in KINDS) == GRANT
