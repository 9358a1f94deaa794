"""Spend control: spend alerts the tenant sets, credit lines operators set, and what happens when a
balance runs out (notice first, then, after the grace period, active on-demand reservations are
released). The only writer of SpendAlert, BillingProfile and BillingNotice."""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Min
from django.utils import timezone

from console.kernel.errors import Conflict, DomainError
from console.kernel.events import publish_many, publish_on_commit, tenant_group
from marketplace.choices import AccountKind, NoticeKind, Role
from marketplace.models import BillingNotice, BillingProfile, Organization, SpendAlert
from marketplace.money import cents, month_start, parse_amount
from marketplace.selectors.billing import account_balances, balance_json, balances_of, spent_in_month
from marketplace.services.billing.ledger import balance_changed
from marketplace.tenant_context import TenantContext

logger = logging.getLogger(__name__)
MAX_ALERTS = 10


def notice_add(*, organization_id, kind: str, message: str) -> BillingNotice:
    notice = BillingNotice.objects.create(organization_id=organization_id, kind=kind, message=message[:500])
    publish_on_commit(
        tenant_group(organization_id),
        "billing.notice",
        {"kind": kind, "message": notice.message, "at": notice.created_at.isoformat()},
    )
    return notice


def _profile(organization_id) -> BillingProfile:
    profile, _ = BillingProfile.objects.get_or_create(organization_id=organization_id)
    return profile


@transaction.atomic
def credit_limit_set(*, organization: Organization, limit) -> BillingProfile:
    """Operators: let the balance go down to -limit (0: prepaid only)."""
    profile = _profile(organization.pk)
    profile.credit_limit = parse_amount(limit, field="credit_limit", allow_zero=True)
    profile.save(update_fields=["credit_limit"])

    _depletion_check(organization_id=organization.pk, now=timezone.now())  # a smaller line may leave it out
    balance_changed(organization.pk)
    return profile


@transaction.atomic
def spend_alert_create(*, tenant: TenantContext, threshold) -> SpendAlert:
    tenant.require(Role.ADMIN, "setting spend alerts")
    threshold = parse_amount(threshold, field="threshold")
    if SpendAlert.objects.filter(organization=tenant.organization).count() >= MAX_ALERTS:
        raise DomainError(f"An organization has at most {MAX_ALERTS} spend alerts.", code="too_many_alerts")
    try:
        with transaction.atomic():
            alert = SpendAlert.objects.create(organization=tenant.organization, threshold=threshold)
    except IntegrityError:
        raise Conflict(f"There is already an alert at ${threshold:,}.", code="duplicate_alert") from None
    # An alert set below this month's spend fires at the next rating, once.
    return alert


@transaction.atomic
def spend_alert_delete(*, tenant: TenantContext, alert: SpendAlert) -> None:
    tenant.require(Role.ADMIN, "removing spend alerts")
    alert.delete()


def after_rating(*, organization_ids, now: datetime) -> None:
    """After usage was rated: fire the spend alerts reached, note balances that ran out or came back,
    and push each touched tenant its balance. A few queries for all of them, then work only where
    something is due."""
    month = month_start(now)
    balances = balances_of(organization_ids=organization_ids, now=now)
    lowest_due = dict(  # each tenant's lowest alert not yet fired this month
        SpendAlert.objects.filter(organization_id__in=list(balances))
        .exclude(last_notified_month=month)
        .values_list("organization_id")
        .annotate(lowest=Min("threshold"))
    )
    pushes = []
    for organization_id, balance in balances.items():
        out = balance["available"] + balance["credit_limit"] < 0
        if organization_id in lowest_due and balance["spent_this_month"] >= lowest_due[organization_id]:
            with transaction.atomic():
                _alerts_check(organization_id=organization_id, month=month)
        if out != (balance["depleted_at"] is not None):
            with transaction.atomic():
                depleted_at = _depletion_check(organization_id=organization_id, now=now)
            balance = {**balance, "depleted_at": depleted_at}  # the push says what the check decided
        pushes.append((tenant_group(organization_id), "billing.balance", balance_json(balance)))
    try:
        publish_many(pushes)
    except Exception:  # noqa: BLE001 - the rows are committed; the next tick carries the balance again
        logger.exception("Could not push %d balances", len(pushes))


def _alerts_check(*, organization_id, month) -> None:
    due = (
        SpendAlert.objects.select_for_update()
        .filter(organization_id=organization_id)
        .exclude(last_notified_month=month)
    )
    due = list(due)
    if not due:
        return
    spent = spent_in_month(organization_id=organization_id, month=month)
    reached = [alert for alert in due if spent >= alert.threshold]
    for alert in reached:
        notice_add(
            organization_id=organization_id,
            kind=NoticeKind.SPEND_ALERT,
            message=f"Spend this month reached ${cents(spent):,}, past your ${alert.threshold:,} alert.",
        )
    SpendAlert.objects.filter(pk__in=[a.pk for a in reached]).update(last_notified_month=month)


def profile_spendable(organization_id, profile: BillingProfile):
    """What the tenant may still hold: its credits with its credit line."""
    credits = account_balances(organization_ids=[organization_id])[organization_id][AccountKind.CREDITS]
    return credits + profile.credit_limit


def _depletion_check(*, organization_id, now: datetime) -> datetime | None:
    """Note a balance that ran out (or came back). Returns since when it is out, None if it is not."""
    profile = BillingProfile.objects.select_for_update().filter(organization_id=organization_id).first()
    profile = profile or _profile(organization_id)
    out = profile_spendable(organization_id, profile) < 0
    grace = timedelta(minutes=settings.BILLING_GRACE_MINUTES)
    if out and profile.depleted_at is None:
        profile.depleted_at = now
        profile.save(update_fields=["depleted_at"])
        notice_add(
            organization_id=organization_id,
            kind=NoticeKind.BALANCE_DEPLETED,
            message=(
                "Your balance has run out. Add credit before "
                f"{(now + grace):%Y-%m-%d %H:%M} UTC, or your active on-demand reservations will be released then."
            ),
        )
    elif not out and profile.depleted_at is not None:
        profile.depleted_at = None
        profile.save(update_fields=["depleted_at"])
        notice_add(
            organization_id=organization_id,
            kind=NoticeKind.BALANCE_RESTORED,
            message="Your balance is positive again; nothing will be released.",
        )
    return profile.depleted_at


def balance_check(*, organization_id, now: datetime | None = None) -> None:
    """Re-check one tenant's balance now (after a grant or a reversal)."""
    with transaction.atomic():
        _depletion_check(organization_id=organization_id, now=now or timezone.now())
