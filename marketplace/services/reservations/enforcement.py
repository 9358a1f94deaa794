"""What happens to reservations when their tenant's balance runs out: after the grace period, its
active on-demand reservations are released (reserved terms, paid by their hold, run on). Billing says
whose balance is out (services.billing.spend); the lifecycle releases (services.reservations.lifecycle)."""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from marketplace.choices import NoticeKind, ReservationState
from marketplace.models import BillingProfile, Reservation
from marketplace.services.billing.spend import notice_add, profile_spendable
from marketplace.services.reservations.lifecycle import reservation_release


def balances_enforce(*, now: datetime | None = None) -> dict[str, int]:
    """Release the active on-demand reservations of tenants whose balance stayed out past the grace
    period. Reserved-term ones are paid by their hold and run on."""
    now = now or timezone.now()
    cutoff = now - timedelta(minutes=settings.BILLING_GRACE_MINUTES)
    released = 0
    overdue = BillingProfile.objects.filter(depleted_at__lte=cutoff).values_list("organization_id", flat=True)
    for organization_id in overdue:
        with transaction.atomic():
            profile = BillingProfile.objects.select_for_update().get(organization_id=organization_id)
            if profile.depleted_at is None or profile_spendable(organization_id, profile) >= 0:
                continue
            ids = Reservation.objects.filter(
                organization_id=organization_id, state=ReservationState.ACTIVE, term_months__isnull=True
            ).values_list("pk", flat=True)
            count = sum(
                reservation_release(reservation_id=pk, reason="Released: the organization's balance ran out.")
                for pk in ids
            )
            if count:
                notice_add(
                    organization_id=organization_id,
                    kind=NoticeKind.RELEASED_UNPAID,
                    message=f"{count} on-demand reservation(s) were released because the balance ran out.",
                )
            released += count
    return {"released": released}
