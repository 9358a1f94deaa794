"""Metering: rate reservations' active time per second into usage records and ledger entries
(ARCHITECTURE invariant 4). The only writer of UsageRecord and Reservation.billing_settled_at.

Usage is rated from each reservation's active interval [activated_at, deactivated_at) -- provisioning,
releasing and failed time are never billed, and telemetry samples never count -- except that a reserved
term released early by its tenant is billed to the term's end (a commitment; models.billed_interval). A run rates every
active reservation up to now and settles those that left active (rated to the end, the rest of their
hold released). It works in batches, each one PostgreSQL transaction: a worker killed mid-run loses
only its open batch, and the next run starts from what committed. Records of one reservation cannot
overlap (an exclusion constraint), so no second is billed twice whatever runs concurrently.

The amount of a record is cost(active seconds through its end) - cost(through its start): however an
interval is cut into runs, the reservation is charged exactly the cost of the whole."""

import logging
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.utils import timezone

from marketplace.choices import SETTLING_STATES, AccountKind, ReservationState, TransactionKind
from marketplace.models import LedgerTransaction, Reservation, UsageRecord, billed_interval
from marketplace.money import cost, seconds_between, split_at_months
from marketplace.selectors.billing import hold_remaining, rated_until
from marketplace.services.billing.ledger import Leg, accounts_of, post_many
from marketplace.services.billing.spend import after_rating

logger = logging.getLogger(__name__)
S = ReservationState
ZERO = Decimal(0)

_KINDS = (AccountKind.CREDITS, AccountKind.HOLDS, AccountKind.USAGE)

_CANDIDATES = f"""
    SELECT id, organization_id, state, activated_at, deactivated_at, released_early_at, upper(period) AS booked_end,
           gpu_count, price_per_gpu_hour
    FROM {Reservation._meta.db_table}
    WHERE billing_settled_at IS NULL AND state = ANY(%(states)s) AND id > %(after)s {{only}}
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE {{skip}}
"""


def usage_rate(
    *,
    now: datetime | None = None,
    reservation_ids: list | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Rate every reservation that needs it (or only ``reservation_ids``) up to ``now``. Safe to run
    twice, or concurrently: a second run finds nothing left to rate. ``batch_size`` reservations are
    rated per transaction (settings.BILLING_RATE_BATCH). Returns counts."""
    now = now or timezone.now()
    batch_size = batch_size or settings.BILLING_RATE_BATCH
    totals = {"reservations": 0, "records": 0, "settled": 0}
    touched: set = set()
    after = "00000000-0000-0000-0000-000000000000"
    while True:
        with transaction.atomic():
            rows = _lock_batch(after=after, limit=batch_size, only=reservation_ids)
            if not rows:
                break
            records, settled, organizations = _rate_batch(rows, now=now)
        after = rows[-1]["id"]
        totals["reservations"] += len(rows)
        totals["records"] += records
        totals["settled"] += settled
        touched |= organizations
        if progress:
            progress(len(rows))
    if touched:
        after_rating(organization_ids=touched, now=now)
    return totals


def _lock_batch(*, after, limit: int, only: list | None) -> list[dict]:
    # A periodic run skips rows a lifecycle move holds (the next run gets them); rating one
    # reservation at its release waits for the move instead.
    sql = _CANDIDATES.format(
        only="AND id = ANY(%(only)s)" if only is not None else "",
        skip="SKIP LOCKED" if only is None else "",
    )
    with connection.cursor() as cursor:
        cursor.execute(
            sql,
            {
                "states": [S.ACTIVE, *SETTLING_STATES],
                "after": after,
                "limit": limit,
                "only": [str(pk) for pk in only or []],
            },
        )
        names = [c.name for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _rate_batch(rows: list[dict], *, now: datetime) -> tuple[int, int, set]:
    ids = [row["id"] for row in rows]
    until = rated_until(reservation_ids=ids)
    held = hold_remaining(reservation_ids=ids)
    accounts = accounts_of(row["organization_id"] for row in rows)
    ledger, records, settled, organizations = [], [], [], set()
    for row in rows:
        org = row["organization_id"]
        credits, holds, usage = (
            accounts[(org, kind)] for kind in (AccountKind.CREDITS, AccountKind.HOLDS, AccountKind.USAGE)
        )
        hold_left = max(held.get(row["id"], ZERO), ZERO)
        for start, end, seconds, amount in _new_usage(row, rated=until.get(row["id"]), now=now):
            from_hold = min(amount, hold_left)
            hold_left -= from_hold
            txn = LedgerTransaction(
                kind=TransactionKind.USAGE,
                organization_id=org,
                memo=f"Usage of reservation {str(row['id'])[:8]}",
                created_at=now,
            )
            if amount:
                ledger.append(
                    (
                        txn,
                        [
                            Leg(holds, -from_hold, row["id"]),
                            Leg(credits, -(amount - from_hold), row["id"]),
                            Leg(usage, amount, row["id"]),
                        ],
                    )
                )
            records.append(
                UsageRecord(
                    reservation_id=row["id"],
                    organization_id=org,
                    period=DateTimeTZRange(start, end, "[)"),
                    seconds=seconds,
                    amount=amount,
                    transaction=txn if amount else None,
                    created_at=now,
                )
            )
            organizations.add(org)
        # It left active and is rated to its end (a term released early: to the term's end): give back
        # what was not used. An early-released term keeps its hold for the committed rest until then.
        committed = row["released_early_at"] is not None and now < row["booked_end"]
        if row["state"] != S.ACTIVE and not committed:
            if hold_left > 0:
                ledger.append(
                    (
                        LedgerTransaction(
                            kind=TransactionKind.HOLD_RELEASE,
                            organization_id=org,
                            memo=f"Hold released: reservation {str(row['id'])[:8]} ended",
                            created_at=now,
                        ),
                        [Leg(holds, -hold_left, row["id"]), Leg(credits, hold_left, row["id"])],
                    )
                )
                organizations.add(org)
            settled.append(row["id"])
    if ledger:
        post_many(ledger)
    UsageRecord.objects.bulk_create(records)
    if settled:
        Reservation.objects.filter(pk__in=settled).update(billing_settled_at=now)
    return len(records), len(settled), organizations


def _new_usage(row: dict, *, rated: datetime | None, now: datetime):
    """(start, end, seconds, amount) pieces of billed time (models.billed_interval) not yet rated, cut
    at month boundaries."""
    interval = billed_interval(
        activated_at=row["activated_at"],
        deactivated_at=row["deactivated_at"],
        released_early_at=row["released_early_at"],
        booked_end=row["booked_end"],
        now=now,
    )
    if interval is None:
        return
    activated, end = interval
    start = rated or activated
    if end <= start:
        return
    price, gpus = row["price_per_gpu_hour"], row["gpu_count"]
    charged = cost(price_per_gpu_hour=price, gpus=gpus, seconds=seconds_between(activated, start))
    for piece_start, piece_end in split_at_months(start, end):
        through = cost(price_per_gpu_hour=price, gpus=gpus, seconds=seconds_between(activated, piece_end))
        yield piece_start, piece_end, seconds_between(piece_start, piece_end), through - charged
        charged = through
