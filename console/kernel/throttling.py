"""Rate limits (OWASP API4): the REST API's budgets per caller, and failed sign-ins per account and
per client address. Counters live in the Django cache (Redis), like DRF's own throttles; losing them
only forgives a few attempts (ARCHITECTURE invariant 2).

Each budget is a window of a period, opened by a caller's first hit: at most N hits in it, counted
with one atomic INCR each (DRF's SimpleRateThrottle keeps, and rewrites, the timestamp of every
request in the window: at a generous limit that is thousands of floats per request, and concurrent
requests lose each other's writes). ``Retry-After`` is the time to the window's end, so a client
that waits it is served.

API budgets (REST_FRAMEWORK's DEFAULT_THROTTLE_RATES, read at each request): ``api_read`` for GET,
HEAD and OPTIONS, ``api_write`` for the rest, and ``api_expensive`` in addition for the reads that
cost the database most (``console.kernel.api.expensive_read_action``, or
``throttle_classes=expensive_read_throttles()`` on a plain view). A caller is its API key when it sent
one (each key has its own budgets), else its user (the browser's session), else its client address.

The client address is REMOTE_ADDR, unless TRUSTED_PROXY_COUNT says how many proxies of ours stand
in front: then it is the address the outermost of them saw, read from X-Forwarded-For counting
from the right (what a client writes further left is not believed)."""

import hashlib
import math
import time
from functools import wraps

from django.conf import settings
from django.core import checks
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.shortcuts import render
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

_PERIODS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def parse_rate(rate: str | None) -> tuple[int, int] | None:
    """``"120/min"`` → (120, 60); None, ``""`` or ``"off"`` → None (no limit)."""
    if rate is None or rate.strip().lower() in ("", "off"):
        return None
    count, _, period = rate.strip().partition("/")
    if not count.strip().isdigit() or period.strip().lower() not in _PERIODS:
        raise ImproperlyConfigured(f"Rate {rate!r} is not N/s, N/min, N/hour, N/day or off.")
    return int(count), _PERIODS[period.strip().lower()]


def check_rates(app_configs=None, **kwargs) -> list[checks.Error]:
    """System check: a mistyped rate stops the server at start, not every API call at run time."""
    errors = []
    for scope, rate in api_settings.DEFAULT_THROTTLE_RATES.items():
        try:
            parse_rate(rate)
        except ImproperlyConfigured as error:
            errors.append(checks.Error(f"Throttle rate of {scope}: {error}", id="console.E001"))
    return errors


def window_hit(key: str, *, limit: int, period: int) -> int | None:
    """Count one hit against ``key``; None while within ``limit`` hits this window, else the seconds
    until the window ends. A window opens at the first hit and lasts ``period`` seconds."""
    name = f"throttle:{key}"
    if cache.add(name, 0, timeout=period):
        cache.set(f"{name}:opened", time.time(), timeout=period)
    try:
        count = cache.incr(name)
    except ValueError:  # the window ended between the two calls: this hit opens the next one
        return window_hit(key, limit=limit, period=period)
    return None if count <= limit else _until_window_ends(name, period)


def window_full(key: str, *, limit: int, period: int) -> int | None:
    """Without counting: None while ``key`` has hits left in its window, else the seconds to wait."""
    name = f"throttle:{key}"
    return None if cache.get(name, 0) < limit else _until_window_ends(name, period)


def window_reset(key: str) -> None:
    cache.delete_many([f"throttle:{key}", f"throttle:{key}:opened"])


def _until_window_ends(name: str, period: int) -> int:
    opened = cache.get(f"{name}:opened")
    remaining = period if opened is None else opened + period - time.time()
    return max(1, math.ceil(remaining))


def client_address(request) -> str:
    address = request.META.get("REMOTE_ADDR", "")
    proxies = settings.TRUSTED_PROXY_COUNT
    if proxies > 0:
        hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        if len(hops) >= proxies:
            address = hops[-proxies]
    return address


def _digest(text: str) -> str:
    # Emails and addresses stay out of Redis key names (and their odd characters out of the cache).
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- The REST API --------------------------------------------------------------------------------


class ApiThrottle(BaseThrottle):
    """One budget of the API, named by ``scope`` in DEFAULT_THROTTLE_RATES."""

    scope = ""
    retry_after = 1

    def applies(self, request, view) -> bool:
        raise NotImplementedError

    def allow_request(self, request, view) -> bool:
        rate = parse_rate(api_settings.DEFAULT_THROTTLE_RATES.get(self.scope))
        if rate is None or not self.applies(request, view):
            return True
        retry_after = window_hit(f"{self.scope}:{self.caller(request)}", limit=rate[0], period=rate[1])
        if retry_after is None:
            return True
        self.retry_after = retry_after
        return False

    def caller(self, request) -> str:
        if request.auth is not None:  # the credential the request authenticated with: an API key
            return f"key:{request.auth.pk}"
        if request.user.is_authenticated:
            return f"user:{request.user.pk}"
        return f"address:{_digest(client_address(request))}"

    def wait(self) -> int:
        return self.retry_after


class ReadThrottle(ApiThrottle):
    scope = "api_read"

    def applies(self, request, view) -> bool:
        return request.method in _SAFE_METHODS


class WriteThrottle(ApiThrottle):
    scope = "api_write"

    def applies(self, request, view) -> bool:
        return request.method not in _SAFE_METHODS


class ExpensiveReadThrottle(ApiThrottle):
    """Only on the views that list it: telemetry, availability, usage, invoice documents."""

    scope = "api_expensive"

    def applies(self, request, view) -> bool:
        return True


def expensive_read_throttles() -> list[type[BaseThrottle]]:
    """``throttle_classes`` of an expensive read: the default budgets, and the expensive one too."""
    return [*api_settings.DEFAULT_THROTTLE_CLASSES, ExpensiveReadThrottle]


# --- Sign-in -------------------------------------------------------------------------------------


def _account_key(username: str) -> str:
    return f"signin-account:{_digest(username.strip().lower())}"  # emails are case-insensitive here


def _signin_keys(request, username: str) -> list[tuple[str, int]]:
    keys = [(_account_key(username), settings.SIGNIN_FAILURES_PER_ACCOUNT)]
    if request is not None:
        keys.append((f"signin-address:{_digest(client_address(request))}", settings.SIGNIN_FAILURES_PER_ADDRESS))
    return keys


def signin_retry_after(*, request, username: str) -> int | None:
    """None while this account and this client address may still try; else the seconds to wait."""
    waits = [
        window_full(key, limit=limit, period=settings.SIGNIN_THROTTLE_SECONDS)
        for key, limit in _signin_keys(request, username)
    ]
    return max((wait for wait in waits if wait is not None), default=None)


def signin_failed(sender, credentials, request=None, **kwargs) -> None:
    """``user_login_failed``: count the failure against the account and the client address."""
    for key, limit in _signin_keys(request, str(credentials.get("username") or "")):
        window_hit(key, limit=limit, period=settings.SIGNIN_THROTTLE_SECONDS)


def signin_succeeded(sender, request, user, **kwargs) -> None:
    """``user_logged_in``: the account's own failures are forgiven (its address's are not)."""
    window_reset(_account_key(user.get_username()))


def signin_throttled(view):
    """Wraps a sign-in view (the portal's, the admin's): while the account or the client address has
    used up its failures, a sign-in is answered 429 with ``Retry-After``, before any password check."""

    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if request.method == "POST":
            retry_after = signin_retry_after(request=request, username=request.POST.get("username", ""))
            if retry_after is not None:
                minutes = math.ceil(retry_after / 60)
                message = (
                    "Too many failed sign-ins for this account or from your network. "
                    f"Try again in {minutes} minute{'s' if minutes != 1 else ''}."
                )
                response = render(request, "error.html", {"status": 429, "message": message}, status=429)
                response["Retry-After"] = str(retry_after)
                return response
        return view(request, *args, **kwargs)

    return wrapped
