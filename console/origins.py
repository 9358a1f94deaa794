"""Which origins may open a browser WebSocket: the console's own, as Django's CSRF check decides them.

Channels' AllowedHostsOriginValidator compares host names only, so a page served by anything else on
the same host (``http://127.0.0.1:9999`` next to a console on port 8000) could open a socket with the
user's cookie. Here an origin is scheme, host and port, accepted when it is the request's own origin
(the scheme the socket came in on, the Host header, validated against ALLOWED_HOSTS) or one of
CSRF_TRUSTED_ORIGINS — the same rule as ``CsrfViewMiddleware`` applies to unsafe requests, through
Django's own ``get_host``/``is_secure`` (so USE_X_FORWARDED_HOST and SECURE_PROXY_SSL_HEADER count)."""

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.utils.http import is_same_domain


class _HandshakeRequest(HttpRequest):
    """The WebSocket handshake seen as the HTTP request it is, for Django's host and scheme rules."""

    def __init__(self, scope):
        super().__init__()
        self._secure_transport = scope.get("scheme") in ("wss", "https")
        for name, value in scope.get("headers", []):
            key = name.decode("latin-1").upper().replace("-", "_")
            self.META[f"HTTP_{key}"] = value.decode("latin-1")
        if scope.get("server"):  # what get_host falls back on without a Host header
            self.META["SERVER_NAME"], self.META["SERVER_PORT"] = scope["server"][0], str(scope["server"][1])

    def _get_scheme(self):
        return "https" if self._secure_transport else "http"


def origin_allowed(scope) -> bool:
    request = _HandshakeRequest(scope)
    origin = request.META.get("HTTP_ORIGIN")
    if not origin:
        return False  # browsers always send one; a socket without it is not a page of ours
    try:
        own = f"{'https' if request.is_secure() else 'http'}://{request.get_host()}"
    except (DisallowedHost, KeyError):  # a host outside ALLOWED_HOSTS, or none at all
        own = None
    if origin == own or origin in _trusted_exact():
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    return any(
        is_same_domain(parsed.netloc, pattern) for scheme, pattern in _trusted_subdomains() if scheme == parsed.scheme
    )


def _trusted_exact() -> set[str]:
    return {origin for origin in settings.CSRF_TRUSTED_ORIGINS if "*" not in origin}


def _trusted_subdomains() -> list[tuple[str, str]]:
    # As CsrfViewMiddleware.allowed_origin_subdomains: "https://*.example.com" → ("https", ".example.com").
    return [
        (parsed.scheme, parsed.netloc.lstrip("*"))
        for parsed in (urlsplit(origin) for origin in settings.CSRF_TRUSTED_ORIGINS if "*" in origin)
    ]


class ConsoleOriginValidator:
    """ASGI middleware refusing the handshake (403) of a socket from any other origin."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
