"""Tenants' live feeds. Each joins exactly one group of a tenant the user belongs to, resolved from
the session before joining anything; anything else is refused. Each also follows its membership
(``member_group``): removing the user from the organization closes it."""

from channels.db import database_sync_to_async

from console.kernel.consumers import FeedConsumer
from console.kernel.errors import NotFound
from console.kernel.events import member_group, reservation_group, tenant_group
from marketplace.selectors.reservations import reservation_get
from marketplace.selectors.tenancy import tenant_context_for_user
from marketplace.tenant_context import SESSION_KEY


def _tenant_for(scope):
    user, session = scope.get("user"), scope.get("session")
    if user is None or not user.is_authenticated:
        return None
    return tenant_context_for_user(user=user, organization_id=session.get(SESSION_KEY) if session else None)


class TenantFeedConsumer(FeedConsumer):
    """A feed of one tenant's data: it ends with the membership it was opened under."""

    tenant = None

    @database_sync_to_async
    def still_audience(self) -> bool:
        # Still a member of the organization the feed was opened in; switching organizations in
        # another tab is not an end (the session now names another one).
        organization_id = self.tenant.organization.pk
        user = self.scope.get("user")
        tenant = tenant_context_for_user(user=user, organization_id=organization_id) if user is not None else None
        return tenant is not None and tenant.organization.pk == organization_id

    def control_groups(self):
        return (*super().control_groups(), member_group(self.tenant.organization.pk, self.tenant.user.pk))


class TenantConsumer(TenantFeedConsumer):
    """Reservation states and progress, running cost, balance and billing notices of the organization
    being worked in."""

    @database_sync_to_async
    def audience(self):
        self.tenant = tenant = _tenant_for(self.scope)
        return tenant_group(tenant.organization.pk) if tenant else None


class ReservationTelemetryConsumer(TenantFeedConsumer):
    """Live telemetry of one reservation's GPUs, for members of the tenant that holds it."""

    refusal_code = 4404  # another tenant's reservation is as absent as a made-up one

    @database_sync_to_async
    def audience(self):
        self.tenant = tenant = _tenant_for(self.scope)
        if tenant is None:
            return None
        try:
            reservation = reservation_get(tenant=tenant, reservation_id=self.scope["url_route"]["kwargs"]["pk"])
        except NotFound:
            return None
        return reservation_group(reservation.pk)
