"""The double-entry ledger (ARCHITECTURE invariant 4). The only writer of ledger accounts,
transactions and entries. Every movement is a transaction whose legs sum to zero, checked here
before writing and by PostgreSQL when the transaction commits (migration 0006); nothing is changed
afterwards, a correction is a reversal.

Sign convention: an account's balance is the sum of its entries. A tenant's ``credits`` are its
prepaid money that is neither held nor spent; ``holds`` are set aside for reservations' expected cost;
``usage`` is what it spent. The platform's ``grants`` account is minus every credit granted."""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction

from console.kernel.errors import DomainError
from console.kernel.events import publish, tenant_group
from marketplace.choices import AccountKind, TransactionKind
from marketplace.models import LedgerAccount, LedgerEntry, LedgerTransaction, Reservation
from marketplace.money import cents
from marketplace.selectors.billing import balance_json, balance_of, spendable
from marketplace.services.tenancy.members import organization_lock

logger = logging.getLogger(__name__)


class LedgerUnbalanced(Exception):
    """A programming error: the legs of a transaction do not sum to zero."""


class InsufficientBalance(DomainError):
    status_code = 402
    code = "insufficient_balance"


@dataclass(frozen=True)
class Leg:
    account: LedgerAccount
    amount: Decimal
    reservation_id: object = None


def accounts_of(organization_ids: Iterable) -> dict[tuple, LedgerAccount]:
    """Every tenant account of these organizations and the platform's, created where missing:
    ``{(organization_id or None, kind): account}``."""
    organization_ids = sorted(set(organization_ids), key=str)

    def found() -> dict[tuple, LedgerAccount]:
        accounts = LedgerAccount.objects.filter(organization_id__in=organization_ids) | LedgerAccount.objects.filter(
            organization__isnull=True
        )
        return {(a.organization_id, a.kind): a for a in accounts}

    accounts = found()
    wanted = [(o, k) for o in organization_ids for k in _TENANT_KINDS] + [(None, AccountKind.GRANTS)]
    missing = [LedgerAccount(organization_id=o, kind=k) for o, k in wanted if (o, k) not in accounts]
    if missing:  # first money of these tenants; a concurrent creator is harmless
        LedgerAccount.objects.bulk_create(missing, ignore_conflicts=True)
        accounts = found()
    return accounts


_TENANT_KINDS = (AccountKind.CREDITS, AccountKind.HOLDS, AccountKind.USAGE)


def post_many(batch: Sequence[tuple[LedgerTransaction, Sequence[Leg]]]) -> None:
    """Write transactions with their legs, in bulk. Each must balance; zero legs are dropped."""
    entries = []
    for txn, legs in batch:
        legs = [leg for leg in legs if leg.amount != 0]
        total = sum((leg.amount for leg in legs), Decimal(0))
        if total != 0 or len(legs) < 2:
            raise LedgerUnbalanced(f"{txn.kind} legs sum to {total} over {len(legs)} legs")
        entries += [
            LedgerEntry(transaction=txn, account=leg.account, amount=leg.amount, reservation_id=leg.reservation_id)
            for leg in legs
        ]
    with transaction.atomic():
        LedgerTransaction.objects.bulk_create([txn for txn, _ in batch])
        LedgerEntry.objects.bulk_create(entries)


def post(*, kind: str, legs: Sequence[Leg], organization_id=None, memo: str = "", by=None) -> LedgerTransaction:
    txn = LedgerTransaction(kind=kind, organization_id=organization_id, memo=memo[:500], created_by=by)
    post_many([(txn, legs)])
    return txn


def hold_check(*, organization_id, amount: Decimal, available: Decimal | None = None) -> None:
    """Refuse (402) a hold of ``amount`` that what the tenant may still hold (``available``: its
    credits with the credit line) cannot cover. Writes nothing: the price step asks it before
    anything is made, hold_place again under the tenant's lock; both refuse with this message."""
    if available is None:
        available = spendable(organization_id=organization_id)
    if amount > available:
        raise InsufficientBalance(
            f"This needs a hold of ${cents(amount):,} for its expected cost, and your organization has "
            f"${cents(max(available, Decimal(0))):,} available for holds. Add credit (ask an operator) "
            "or reserve less.",
            required=str(cents(amount)),
            available=str(cents(available)),
        )


def hold_place(*, reservation: Reservation, amount: Decimal, memo: str) -> LedgerTransaction | None:
    """Set ``amount`` aside from the tenant's credits for ``reservation``, or refuse (402) when the
    credits, with the credit line, cannot cover it. Call inside the transaction creating or
    extending the reservation, so the refusal undoes it."""
    if amount <= 0:
        return None

    organization_id = reservation.organization_id
    organization_lock(organization_id)
    hold_check(organization_id=organization_id, amount=amount, available=spendable(organization_id=organization_id))
    accounts = accounts_of([organization_id])
    txn = post(
        kind=TransactionKind.HOLD,
        organization_id=organization_id,
        memo=memo,
        legs=[
            Leg(accounts[(organization_id, AccountKind.CREDITS)], -amount, reservation.pk),
            Leg(accounts[(organization_id, AccountKind.HOLDS)], amount, reservation.pk),
        ],
    )
    balance_changed(organization_id)
    return txn


def balance_changed(organization_id) -> None:
    """Tell the tenant's browsers, once the transaction commits, what its balance is then (read
    after the commit: the tenant's row lock is not held for it)."""

    def send() -> None:
        try:
            publish(
                tenant_group(organization_id),
                "billing.balance",
                balance_json(balance_of(organization_id=organization_id)),
            )
        except Exception:  # noqa: BLE001 - the money is committed; the next change or tick tells it again
            logger.exception("Could not push the balance of %s", organization_id)

    transaction.on_commit(send)
