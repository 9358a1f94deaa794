"""Idempotent POSTs over the API: the ``Idempotency-Key`` header read, the work run through
``marketplace.services.idempotency.idempotent`` and a replay marked ``Idempotent-Replayed: true``."""

from collections.abc import Callable

from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.services.idempotency import idempotent
from marketplace.tenant_context import TenantContext

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key as sent, or None when it sent none."""
    return request.headers.get(KEY_HEADER)


def idempotent_response(
    request: Request, *, tenant: TenantContext, perform: Callable[[], tuple[int, dict]]
) -> Response:
    """The response to a POST that creates: ``perform`` (validate, call the service, return
    ``(status, body)``) runs once per key; a repeat gets the first response back."""
    code, body, replayed = idempotent(
        tenant=tenant,
        key=idempotency_key(request),
        endpoint=f"POST {request.path}",
        payload=request.data,
        perform=perform,
    )
    return Response(body, status=code, headers={REPLAYED_HEADER: "true"} if replayed else None)
