"""WebSocket routes.

Agents connect to /agent/v1/ with their node secret (no browser Origin to check); browsers connect
under /ws/ with their session cookie, behind AllowedHostsOriginValidator. Consumers join only the
groups their user or node may see (ARCHITECTURE, Live updates)."""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from marketplace.consumers import ReservationTelemetryConsumer, TenantConsumer
from provisioning.consumers import AgentConsumer, FleetConsumer


def browser(consumer):
    """Session-authenticated, same-origin only."""
    return AllowedHostsOriginValidator(AuthMiddlewareStack(consumer.as_asgi()))


websocket_urlpatterns = [
    path("agent/v1/", AgentConsumer.as_asgi()),
    path("ws/tenant/", browser(TenantConsumer)),
    path("ws/reservations/<uuid:pk>/", browser(ReservationTelemetryConsumer)),
    path("ws/fleet/", browser(FleetConsumer)),
]
