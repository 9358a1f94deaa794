"""Idempotent POSTs (ARCHITECTURE invariant 7): a request sent again with the same Idempotency-Key
gets the first response; the same key with another body is refused (422).

Only successful responses are kept: a refused request (no capacity, bad input) changed nothing, so a
retry with the same key runs again. ``idempotent`` is the one way a POST that creates is run, by the API
(``marketplace.api.idempotency``) and the portal alike, with a key or without one."""

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from console.kernel.errors import DomainError
from marketplace.models import IdempotencyRecord
from marketplace.tenant_context import TenantContext

KEEP_FOR = timedelta(days=1)
# Constraints that mean "this key was just used by a concurrent request".
_KEY_CONSTRAINTS = {"idempotency_key_unique", "reservation_idempotency_key_unique"}


class IdempotencyKeyReused(DomainError):
    status_code = 422
    code = "idempotency_key_reused"


def request_fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _validate_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > 255 or not key.isprintable():
        raise DomainError("Idempotency-Key must be 1 to 255 printable characters.", code="invalid_idempotency_key")
    return key


def _replay(record: IdempotencyRecord, *, fingerprint: str, endpoint: str) -> tuple[int, dict, bool]:
    if record.fingerprint != fingerprint or record.endpoint != endpoint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request; use a new key for a new request.",
            first_used_at=record.created_at.isoformat(),
        )
    return record.response_status, record.response_body, True


def idempotent(
    *, tenant: TenantContext, key: str | None, endpoint: str, payload, perform: Callable[[], tuple[int, dict]]
) -> tuple[int, dict, bool]:
    """Run ``perform`` once per key: returns (status, body, replayed). Without a key (the header is
    optional) ``perform`` just runs, and nothing is kept."""
    if key is None:
        status, body = perform()
        return status, body, False
    key = _validate_key(key)
    fingerprint = request_fingerprint(payload)
    record = IdempotencyRecord.objects.filter(organization=tenant.organization, key=key).first()
    if record is not None:
        return _replay(record, fingerprint=fingerprint, endpoint=endpoint)
    try:
        with transaction.atomic():
            status, body = perform()
            IdempotencyRecord.objects.create(
                organization=tenant.organization,
                key=key,
                endpoint=endpoint,
                fingerprint=fingerprint,
                response_status=status,
                response_body=body,
            )
        return status, body, False
    except DomainError:
        # Refused; but if a concurrent request with this key committed meanwhile (and took the
        # capacity, say), this is a repeat of it: answer as it did.
        record = IdempotencyRecord.objects.filter(organization=tenant.organization, key=key).first()
        if record is None:
            raise
        return _replay(record, fingerprint=fingerprint, endpoint=endpoint)
    except IntegrityError as error:
        constraint = getattr(getattr(error.__cause__, "diag", None), "constraint_name", None)
        if constraint not in _KEY_CONSTRAINTS:
            raise
    # A concurrent request with the same key committed first: answer as it did.
    record = IdempotencyRecord.objects.filter(organization=tenant.organization, key=key).first()
    if record is None:
        # No record, yet a row made with this key exists: its record expired (KEEP_FOR), and the first
        # response can no longer be replayed. The key still names that row, so it cannot make another.
        raise IdempotencyKeyReused(
            f"This Idempotency-Key was used over {KEEP_FOR.total_seconds() / 3600:g} hours ago, and its first "
            "response is no longer kept; use a new key for a new request."
        )
    return _replay(record, fingerprint=fingerprint, endpoint=endpoint)


def idempotency_records_expire() -> int:
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=timezone.now() - KEEP_FOR).delete()
    return deleted
