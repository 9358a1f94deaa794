"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings.development")
django_asgi_app = get_asgi_application()  # before importing anything that touches models

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from console.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(websocket_urlpatterns),
    }
)

# Move everything loaded so far out of the garbage collector's view: the full collections it made of
# it stalled the telemetry fan-out 150-180 ms every 10-20 s; frozen, p99 at 10,000 GPU samples/s fell
# from 535 to 178 ms on daphne (bench/telemetry.py, docs/benchmarks.md).
gc.collect()
gc.freeze()
