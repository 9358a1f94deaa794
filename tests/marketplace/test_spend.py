"""Spend control (marketplace.services.billing.spend): spend alerts the tenant sets fire once a month, a balance
that runs out is noticed and, after the grace period, the tenant's active on-demand reservations are
released; credit brings it back. Pushes are received through the real channel layer."""

import asyncio
from collections.abc import Callable
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone

from console.kernel.errors import Conflict, DomainError, Forbidden
from console.kernel.events import tenant_group
from marketplace.choices import AccountKind, NoticeKind, ReservationState, Role, TransactionKind
from marketplace.models import (
    BillingNotice,
    BillingProfile,
    LedgerTransaction,
    Reservation,
    SpendAlert,
)
from marketplace.money import month_bounds, month_start, next_month
from marketplace.selectors.billing import account_balances, balance_of, spent_in_month
from marketplace.services.billing.credits import credits_grant, ledger_reverse
from marketplace.services.billing.metering import usage_rate
from marketplace.services.billing.spend import (
    MAX_ALERTS,
    credit_limit_set,
    spend_alert_create,
    spend_alert_delete,
)
from marketplace.services.reservations.enforcement import balances_enforce
from marketplace.services.reservations.lifecycle import reservation_create
from marketplace.services.tenancy.members import membership_set
from marketplace.tenant_context import TenantContext
from tests.factories import (
    OfferFactory,
    RackFactory,
    activate,
    make_node,
    make_tenant,
    make_user,
)

S = ReservationState
PRICE = Decimal("3.60")  # 8 GPUs: $28.80 an hour
# The shared offer: $3.60 per GPU-hour, a one-month term at 20 % off, four free 8-GPU nodes.
pytestmark = [pytest.mark.django_db, pytest.mark.offer(price=PRICE, nodes=4, term_discounts={1: "20"})]


def reserve(tenant, offer, *, hours: float = 1, term_months: int | None = None) -> Reservation:
    start = timezone.now()
    return reservation_create(
        tenant=tenant,
        offer=offer,
        quantity=1,
        start=start,
        end=None if term_months else start + timedelta(hours=hours),
        term_months=term_months,
    )


def pushed(group: str, action: Callable[[], object], *, until: Callable[[list], bool]) -> tuple[object, list]:
    """Run ``action`` while listening to ``group`` through the real channel layer. Returns its result
    and the ``(event, data)`` pushed, once ``until(events)`` holds (or nothing more came)."""

    async def scenario():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        try:
            result = await sync_to_async(action)()
            events = []
            while not until(events):
                try:
                    message = await asyncio.wait_for(layer.receive(channel), timeout=5)
                except TimeoutError:
                    break
                events.append((message["event"], message["data"]))
            return result, events
        finally:
            await layer.group_discard(group, channel)

    return async_to_sync(scenario)()


def notices(organization, kind: str) -> list[BillingNotice]:
    return list(BillingNotice.objects.filter(organization=organization, kind=kind).order_by("pk"))


def has_notice(kind: str) -> Callable[[list], bool]:
    return lambda events: any(event == "billing.notice" and data["kind"] == kind for event, data in events)


def credits_of(organization) -> Decimal:
    return account_balances(organization_ids=[organization.pk])[organization.pk][AccountKind.CREDITS]


class TestSpendAlerts:
    @pytest.mark.django_db(transaction=True)  # pushes leave on commit
    def test_an_alert_fires_once_a_month_when_the_months_spend_crosses_it(self, offer):
        tenant = make_tenant(role=Role.ADMIN)
        org = tenant.organization
        for threshold in ("10", "50", "1000"):
            spend_alert_create(tenant=tenant, threshold=threshold)
        since = timezone.now() - timedelta(hours=1)
        activate(reserve(tenant, offer, hours=2), since=since)
        # Rated from a month boundary on, so the month's spend is known exactly: $28.80 an hour.
        month = next_month(month_start(since))
        boundary = month_bounds(month)[0]

        totals, events = pushed(
            tenant_group(org.pk),
            lambda: usage_rate(now=boundary + timedelta(hours=1)),
            until=has_notice(NoticeKind.SPEND_ALERT),
        )
        assert totals["records"] == 2  # cut at the month boundary
        assert spent_in_month(organization_id=org.pk, month=month) == Decimal("28.8")
        fired = [data for event, data in events if event == "billing.notice"]
        assert [data["kind"] for data in fired] == [NoticeKind.SPEND_ALERT]
        assert "$28.80" in fired[0]["message"] and "$10.00 alert" in fired[0]["message"]
        assert [n.message for n in notices(org, NoticeKind.SPEND_ALERT)] == [fired[0]["message"]]

        usage_rate(now=boundary + timedelta(hours=2))  # $57.60: the $50 alert, not the $10 one again
        assert [n.message.split("past your ")[1] for n in notices(org, NoticeKind.SPEND_ALERT)] == [
            "$10.00 alert.",
            "$50.00 alert.",
        ]
        usage_rate(now=boundary + timedelta(hours=3))
        assert len(notices(org, NoticeKind.SPEND_ALERT)) == 2

        later = month_bounds(next_month(month))[0]  # the next month: spend starts from zero again
        usage_rate(now=later + timedelta(hours=1))
        assert [n.message.split("past your ")[1] for n in notices(org, NoticeKind.SPEND_ALERT)][2:] == ["$10.00 alert."]
        alerts = dict(SpendAlert.objects.filter(organization=org).values_list("threshold", "last_notified_month"))
        assert alerts == {
            Decimal("10"): next_month(month),
            Decimal("50"): month,
            Decimal("1000"): None,
        }

    def test_other_tenants_spend_does_not_fire_my_alert(self, offer):
        mine, theirs = make_tenant(), make_tenant()
        spend_alert_create(tenant=mine, threshold="1")
        activate(reserve(theirs, offer), since=timezone.now() - timedelta(hours=1))
        usage_rate()
        assert not notices(mine.organization, NoticeKind.SPEND_ALERT)

    def test_duplicates_are_409_and_more_than_ten_400(self):
        tenant = make_tenant(role=Role.ADMIN)
        spend_alert_create(tenant=tenant, threshold="100")
        with pytest.raises(Conflict) as duplicate:
            spend_alert_create(tenant=tenant, threshold="100.00")
        assert duplicate.value.status_code == 409 and duplicate.value.code == "duplicate_alert"
        for i in range(2, MAX_ALERTS + 1):
            spend_alert_create(tenant=tenant, threshold=str(100 * i))
        with pytest.raises(DomainError) as too_many:
            spend_alert_create(tenant=tenant, threshold="5")
        assert too_many.value.status_code == 400 and too_many.value.code == "too_many_alerts"
        assert SpendAlert.objects.filter(organization=tenant.organization).count() == MAX_ALERTS

    @pytest.mark.parametrize("threshold", ["0", "-1", "1.001", "lots", "NaN"])
    def test_a_threshold_that_is_not_money_is_refused(self, threshold):
        tenant = make_tenant(role=Role.OWNER)
        with pytest.raises(DomainError) as refused:
            spend_alert_create(tenant=tenant, threshold=threshold)
        assert refused.value.status_code == 400 and "threshold" in refused.value.fields
        assert not SpendAlert.objects.exists()

    @pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
    def test_members_and_viewers_cannot_set_or_remove_alerts(self, role):
        admin = make_tenant(role=Role.ADMIN)
        alert = spend_alert_create(tenant=admin, threshold="100")
        user = make_user()
        membership_set(organization=admin.organization, user=user, role=role)
        weaker = TenantContext(organization=admin.organization, user=user, role=role)
        with pytest.raises(Forbidden) as refused:
            spend_alert_create(tenant=weaker, threshold="200")
        assert refused.value.status_code == 403 and role in refused.value.message
        with pytest.raises(Forbidden):
            spend_alert_delete(tenant=weaker, alert=alert)
        assert list(SpendAlert.objects.values_list("threshold", flat=True)) == [Decimal("100")]
        spend_alert_delete(tenant=admin, alert=alert)
        assert not SpendAlert.objects.exists()


class TestDepletion:
    def test_usage_beyond_credits_marks_the_balance_depleted_and_tells_the_tenant(
        self, offer, django_capture_on_commit_callbacks
    ):
        tenant = make_tenant(credit="10")
        org = tenant.organization
        since = timezone.now() - timedelta(hours=1)
        activate(reserve(tenant, offer, hours=0.25), since=since)  # holds $7.20 of the $10
        now = since + timedelta(hours=1)

        def rate():
            with django_capture_on_commit_callbacks(execute=True):
                usage_rate(now=now)

        def told(events) -> bool:  # the notice, then the balance saying since when
            return has_notice(NoticeKind.BALANCE_DEPLETED)(events) and events[-1][0] == "billing.balance"

        _, events = pushed(tenant_group(org.pk), rate, until=told)
        assert credits_of(org) == Decimal("10") - Decimal("28.8")
        profile = BillingProfile.objects.get(organization=org)
        assert profile.depleted_at == now
        notice = [data for event, data in events if event == "billing.notice"]
        assert [data["kind"] for data in notice] == [NoticeKind.BALANCE_DEPLETED]
        assert "run out" in notice[0]["message"]
        assert [data for event, data in events if event == "billing.balance"][-1]["depleted_at"] == now.isoformat()
        assert balance_of(organization_id=org.pk)["depleted_at"] == now

        usage_rate(now=now + timedelta(minutes=5))  # still out: not noticed twice
        assert len(notices(org, NoticeKind.BALANCE_DEPLETED)) == 1
        assert BillingProfile.objects.get(organization=org).depleted_at == now

    def test_a_credit_line_keeps_the_balance_from_running_out(self, offer):
        tenant = make_tenant(credit="10")
        credit_limit_set(organization=tenant.organization, limit="100")
        since = timezone.now() - timedelta(hours=1)
        activate(reserve(tenant, offer, hours=0.25), since=since)
        usage_rate(now=since + timedelta(hours=1))
        assert credits_of(tenant.organization) == Decimal("-18.8")
        assert BillingProfile.objects.get(organization=tenant.organization).depleted_at is None
        assert not notices(tenant.organization, NoticeKind.BALANCE_DEPLETED)

    def test_reversing_the_grant_that_paid_for_a_hold_runs_the_balance_out(self, offer):
        tenant = make_tenant(credit="100")
        org = tenant.organization
        reserve(tenant, offer, hours=1)  # holds 28.80: 71.20 left
        grant = LedgerTransaction.objects.get(organization=org, kind=TransactionKind.GRANT)
        ledger_reverse(txn=grant)
        assert credits_of(org) == Decimal("-28.8")
        assert BillingProfile.objects.get(organization=org).depleted_at is not None
        assert len(notices(org, NoticeKind.BALANCE_DEPLETED)) == 1


class TestEnforcement:
    @pytest.fixture
    def overdrawn(self, offer):
        """A tenant with an active on-demand and an active 1-month term reservation whose credit grant
        was reversed (balance out), and another tenant in good standing with an active reservation."""
        tenant = make_tenant()
        on_demand = activate(reserve(tenant, offer, hours=2))
        term = activate(reserve(tenant, offer, term_months=1))
        pending = reservation_create(
            tenant=tenant,
            offer=offer,
            quantity=1,
            start=timezone.now() + timedelta(hours=1),
            end=timezone.now() + timedelta(hours=2),
        )
        other = make_tenant()
        theirs = activate(reserve(other, offer, hours=2))
        ledger_reverse(txn=LedgerTransaction.objects.get(organization=tenant.organization, kind=TransactionKind.GRANT))
        depleted_at = BillingProfile.objects.get(organization=tenant.organization).depleted_at
        assert depleted_at is not None
        return {
            "tenant": tenant,
            "other": other,
            "on_demand": on_demand,
            "term": term,
            "pending": pending,
            "theirs": theirs,
            "depleted_at": depleted_at,
        }

    @staticmethod
    def states(*reservations) -> list[str]:
        return [Reservation.objects.get(pk=r.pk).state for r in reservations]

    def test_nothing_is_released_within_the_grace_period(self, overdrawn, settings):
        grace = timedelta(minutes=settings.BILLING_GRACE_MINUTES)
        assert balances_enforce(now=overdrawn["depleted_at"] + grace - timedelta(seconds=1)) == {"released": 0}
        assert self.states(overdrawn["on_demand"], overdrawn["term"]) == [S.ACTIVE, S.ACTIVE]
        assert not notices(overdrawn["tenant"].organization, NoticeKind.RELEASED_UNPAID)

    def test_after_the_grace_period_only_the_tenants_active_on_demand_reservations_are_released(
        self, overdrawn, settings
    ):
        after = overdrawn["depleted_at"] + timedelta(minutes=settings.BILLING_GRACE_MINUTES, seconds=1)
        assert balances_enforce(now=after) == {"released": 1}
        assert self.states(overdrawn["on_demand"], overdrawn["term"], overdrawn["pending"], overdrawn["theirs"]) == [
            S.RELEASING,  # torn down next; rated to its release
            S.ACTIVE,  # a reserved term is paid by its hold and runs on
            S.PENDING,
            S.ACTIVE,  # another tenant's
        ]
        released = Reservation.objects.get(pk=overdrawn["on_demand"].pk)
        assert "balance ran out" in released.failure_reason and released.deactivated_at is not None
        [notice] = notices(overdrawn["tenant"].organization, NoticeKind.RELEASED_UNPAID)
        assert notice.message.startswith("1 on-demand reservation(s) were released")
        assert not BillingNotice.objects.filter(organization=overdrawn["other"].organization).exclude(
            kind=NoticeKind.CREDITS_GRANTED
        )
        assert balances_enforce(now=after + timedelta(minutes=5)) == {"released": 0}  # nothing left to release
        assert len(notices(overdrawn["tenant"].organization, NoticeKind.RELEASED_UNPAID)) == 1

    def test_credit_that_restores_the_balance_clears_it_and_nothing_is_released(self, overdrawn, settings):
        org = overdrawn["tenant"].organization
        debt = (-credits_of(org)).quantize(Decimal("0.01"), ROUND_CEILING)
        credits_grant(organization=org, amount=str(debt + 1))
        assert BillingProfile.objects.get(organization=org).depleted_at is None
        assert [n.kind for n in BillingNotice.objects.filter(organization=org).order_by("pk")][-3:] == [
            NoticeKind.BALANCE_DEPLETED,
            NoticeKind.CREDITS_GRANTED,
            NoticeKind.BALANCE_RESTORED,
        ]
        later = overdrawn["depleted_at"] + timedelta(minutes=settings.BILLING_GRACE_MINUTES, hours=1)
        assert balances_enforce(now=later) == {"released": 0}
        assert self.states(overdrawn["on_demand"], overdrawn["term"]) == [S.ACTIVE, S.ACTIVE]

    def test_credit_that_does_not_cover_the_debt_changes_nothing(self, overdrawn, settings):
        org = overdrawn["tenant"].organization
        credits_grant(organization=org, amount="1.00")
        assert BillingProfile.objects.get(organization=org).depleted_at == overdrawn["depleted_at"]
        assert not notices(org, NoticeKind.BALANCE_RESTORED)
        after = overdrawn["depleted_at"] + timedelta(minutes=settings.BILLING_GRACE_MINUTES, seconds=1)
        assert balances_enforce(now=after) == {"released": 1}


def test_lowering_a_credit_line_that_is_in_use_starts_the_grace_period():
    tenant = make_tenant(credit=None)
    credit_limit_set(organization=tenant.organization, limit="100")
    offer = OfferFactory(price_per_gpu_hour=Decimal("1.00"))
    make_node(rack=RackFactory(site=offer.site), accelerator=offer.accelerator_type)
    start = timezone.now() + timedelta(hours=1)
    reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=5))  # $40 held
    assert BillingProfile.objects.get(organization=tenant.organization).depleted_at is None

    credit_limit_set(organization=tenant.organization, limit="10")  # -40 + 10 < 0
    profile = BillingProfile.objects.get(organization=tenant.organization)
    assert profile.depleted_at is not None
    assert BillingNotice.objects.filter(organization=tenant.organization, kind=NoticeKind.BALANCE_DEPLETED).count() == 1
