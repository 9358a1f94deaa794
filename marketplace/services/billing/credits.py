"""Credits: operators grant prepaid credit and reverse a grant made by mistake. The ledger moves the
money (services.ledger); each change then re-checks the balance against its spend control (a grant
may restore a balance that ran out, a reversal may run it out: services.spend) and tells the
tenant's browsers."""

from django.db import transaction

from console.kernel.errors import Conflict
from marketplace.choices import AccountKind, NoticeKind, TransactionKind
from marketplace.models import LedgerTransaction, Organization
from marketplace.money import cents, parse_amount
from marketplace.services.billing.ledger import Leg, accounts_of, balance_changed, post, post_many
from marketplace.services.billing.spend import balance_check, notice_add


def _recheck(organization_id) -> None:
    balance_check(organization_id=organization_id)
    balance_changed(organization_id)


@transaction.atomic
def credits_grant(*, organization: Organization, amount, memo: str = "", by=None) -> LedgerTransaction:
    """An operator adds prepaid credit: grants -> the tenant's credits."""
    amount = parse_amount(amount)
    accounts = accounts_of([organization.pk])
    txn = post(
        kind=TransactionKind.GRANT,
        organization_id=organization.pk,
        memo=memo or "Credit grant",
        by=by,
        legs=[
            Leg(accounts[(None, AccountKind.GRANTS)], -amount),
            Leg(accounts[(organization.pk, AccountKind.CREDITS)], amount),
        ],
    )
    notice_add(
        organization_id=organization.pk,
        kind=NoticeKind.CREDITS_GRANTED,
        message=f"${cents(amount):,} of credit was added to your balance.",
    )
    _recheck(organization.pk)
    return txn


@transaction.atomic
def ledger_reverse(*, txn: LedgerTransaction, memo: str = "", by=None) -> LedgerTransaction:
    """Undo a grant (say, given by mistake) with a transaction of opposite legs. Holds and usage are
    corrected through the reservation they belong to, not reversed by hand."""
    txn = LedgerTransaction.objects.select_for_update().get(pk=txn.pk)
    if txn.kind != TransactionKind.GRANT:
        raise Conflict(f"Only credit grants are reversed by hand; this is a {txn.get_kind_display().lower()}.")
    if LedgerTransaction.objects.filter(reverses=txn).exists():
        raise Conflict("This transaction has already been reversed.")
    legs = [Leg(e.account, -e.amount, e.reservation_id) for e in txn.entries.select_related("account")]
    reversal = LedgerTransaction(
        kind=TransactionKind.REVERSAL,
        organization_id=txn.organization_id,
        memo=memo or f"Reversal of {txn.id}",
        reverses=txn,
        created_by=by,
    )
    post_many([(reversal, legs)])
    if txn.organization_id:
        _recheck(txn.organization_id)
    return reversal
