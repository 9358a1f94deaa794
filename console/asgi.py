"""ASGI entry point: HTTP through Django, WebSockets through Channels, /v1/ through the gateway (the
same application its own processes run, console.gateway.asgi, so the console's URL + /v1 is an OpenAI
base URL too)."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings.development")
django_asgi_app = get_asgi_application()  # before importing anything that touches models

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from daphne import http_protocol  # noqa: E402

from console.gateway.app import Gateway  # noqa: E402
from console.routing import websocket_urlpatterns  # noqa: E402


class _WebRequest(http_protocol.WebRequest):
    """Daphne's request, without Twisted's own parse of form bodies. Twisted parses a multipart body
    before the application sees it (the application gets the raw body and parses it again) and, when
    its email parser fails, answers 400 itself: no body, no content type, nothing logged
    (django/daphne#447, twisted/twisted#9739). Unparsed, every body reaches Django, which answers a
    malformed one in the API's error shape."""

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)


# Daphne's HTTPFactory builds each connection's requests from this module attribute. Harmless under
# another ASGI server, which never builds one.
http_protocol.WebRequest = _WebRequest

gateway = Gateway()


async def http(scope, receive, send):
    if scope["path"].startswith("/v1/"):
        await gateway(scope, receive, send)
    else:
        await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": URLRouter(websocket_urlpatterns),
    }
)

# Move everything loaded so far out of the garbage collector's view: the full collections it made of
# it stalled the telemetry fan-out 150-180 ms every 10-20 s; frozen, p99 at 10,000 GPU samples/s fell
# from 535 to 178 ms on daphne (bench/telemetry.py, docs/benchmarks.md).
gc.collect()
gc.freeze()
