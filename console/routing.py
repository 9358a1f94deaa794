"""WebSocket routes. Consumers join only the groups their user may see (ARCHITECTURE, Live updates)."""

websocket_urlpatterns: list = []
