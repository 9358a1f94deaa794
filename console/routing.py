"""WebSocket routes.

Agents connect to /agent/v1/ with their node secret (no browser Origin to check); browsers connect
under /ws/ with their session cookie, from the console's own origins only (console.origins: scheme,
host and port, as the CSRF check trusts them). Consumers join only the groups their user or node may
see (ARCHITECTURE, Live updates)."""

from channels.auth import AuthMiddlewareStack
from django.urls import path

from console.origins import ConsoleOriginValidator
from marketplace.consumers import ReservationTelemetryConsumer, TenantConsumer
from provisioning.consumers import AgentConsumer, FleetConsumer


def browser(consumer):
    """Session-authenticated, same-origin only."""
    return ConsoleOriginValidator(AuthMiddlewareStack(consumer.as_asgi()))


websocket_urlpatterns = [
    path("agent/v1/", AgentConsumer.as_asgi()),
    path("ws/tenant/", browser(TenantConsumer)),
    path("ws/reservations/<uuid:pk>/", browser(ReservationTelemetryConsumer)),
    path("ws/fleet/", browser(FleetConsumer)),
]
