"""API keys: created (the plaintext shown once), authenticated, revoked. Only digests are stored."""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from console.kernel.errors import DomainError, Forbidden
from console.kernel.tokens import matches, new_token, parse
from marketplace.choices import Role, role_rank
from marketplace.models import ApiKey
from marketplace.tenant_context import TenantContext

logger = logging.getLogger(__name__)

# Only refresh last_used_at this often: a key used 100 times a second should not write 100 rows a second.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class InvalidApiKey(Exception):
    """The presented key is unknown, malformed, expired or revoked (deliberately not saying which)."""


def api_key_create(
    *, tenant: TenantContext, name: str, role: str | None = None, expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """Create a key acting for ``tenant.user`` in ``tenant.organization``; returns the row and the
    plaintext key, which is never stored and cannot be shown again.

    A key made with a key (``tenant.api_key``) is derived from it: its role is at most the parent's
    (``tenant.role`` is already the weaker of the key's and its creator's), it expires no later than the
    parent (by default when the parent does), and it is revoked with the parent."""
    parent = tenant.api_key
    name = (name or "").strip()
    if not name:
        raise DomainError(
            "Give the key a name, so you can tell it apart later.", fields={"name": ["This field is required."]}
        )
    role = Role(role or (Role.MEMBER if role_rank(tenant.role) >= role_rank(Role.MEMBER) else Role.VIEWER))
    if role_rank(role) > role_rank(tenant.role):
        raise Forbidden(
            f"You are {tenant.role} in {tenant.organization.name}; you cannot create a key with role {role}."
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise DomainError("The expiry must be in the future.", fields={"expires_at": ["Must be in the future."]})
    if parent is not None and parent.expires_at is not None:
        if expires_at is None:
            expires_at = parent.expires_at
        elif expires_at > parent.expires_at:
            message = (
                f"A key made with key {parent.prefix}… cannot outlive it: it expires at "
                f"{parent.expires_at.isoformat()}. Choose that or earlier, or leave the expiry out."
            )
            raise DomainError(message, code="outlives_parent", fields={"expires_at": [message]})
    for _attempt in range(5):
        token = new_token(settings.API_KEY_PREFIX)
        try:
            with transaction.atomic():
                # The parent's row lock orders this against its revocation (_revoke_with_descendants).
                if parent is not None and not _alive_and_locked(parent):
                    raise Forbidden("The key this request was made with has been revoked.", code="key_revoked")
                key = ApiKey.objects.create(
                    organization=tenant.organization,
                    created_by=tenant.user,
                    name=name[:100],
                    role=role,
                    prefix=token.prefix,
                    secret_hash=token.digest,
                    expires_at=expires_at,
                    parent=parent,
                )
            break
        except IntegrityError:  # a prefix collision, one in four billion: draw again
            continue
    else:  # pragma: no cover - would need five collisions in a row
        raise RuntimeError("Could not allocate a unique API key prefix.")
    logger.info("API key %s… created in %s by %s", token.prefix, tenant.organization.slug, tenant.user.email)
    return key, token.plaintext


def _alive_and_locked(key: ApiKey) -> bool:
    return ApiKey.objects.select_for_update().filter(pk=key.pk, revoked_at__isnull=True).exists()


def api_key_authenticate(*, raw_key: str) -> ApiKey:
    """The live key for ``raw_key``, or InvalidApiKey. Compares digests in constant time."""
    token = parse(raw_key, settings.API_KEY_PREFIX)
    if token is None:
        raise InvalidApiKey
    key = ApiKey.objects.select_related("organization", "created_by").filter(prefix=token.prefix).first()
    if key is None or not matches(key.secret_hash, token):
        raise InvalidApiKey
    now = timezone.now()
    if key.revoked_at is not None or key.is_expired(now) or not key.created_by.is_active:
        raise InvalidApiKey
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def api_key_revoke(*, tenant: TenantContext, key: ApiKey) -> ApiKey:
    """Revoke a key. Admins and owners revoke any key of their organization; others their own."""
    if key.organization_id != tenant.organization.pk:  # selectors already scope; this is a backstop
        raise Forbidden("That key belongs to another organization.")
    if not tenant.is_admin and key.created_by_id != tenant.user.pk:
        raise Forbidden("Only admins and owners can revoke keys created by someone else.")
    if key.revoked_at is None:
        count = _revoke_with_descendants([key.pk])
        key.refresh_from_db(fields=["revoked_at"])
        logger.info(
            "API key %s… revoked in %s by %s (%d key(s) with the ones made with it)",
            key.prefix,
            tenant.organization.slug,
            tenant.user.email,
            count,
        )
    return key


def api_keys_revoke_as_operator(*, keys, actor: str) -> int:
    """Operators revoke across tenants (a leaked key reported to support), with every key made with
    them. Returns how many."""
    count = _revoke_with_descendants(list(keys.values_list("pk", flat=True)))
    logger.info("%d API key(s) revoked by operator %s", count, actor)
    return count


_DESCENDANTS = f"""
    WITH RECURSIVE tree(id) AS (
        SELECT id FROM {ApiKey._meta.db_table} WHERE id = ANY(%(roots)s)
        UNION
        SELECT k.id FROM {ApiKey._meta.db_table} k JOIN tree ON k.parent_id = tree.id
    )
    UPDATE {ApiKey._meta.db_table} SET revoked_at = %(now)s
    WHERE id IN (SELECT id FROM tree) AND revoked_at IS NULL
"""


@transaction.atomic
def _revoke_with_descendants(key_ids: list) -> int:
    """Revoke these keys and every key derived from them, at any depth. Repeated until a pass finds no
    more: a key being derived concurrently holds its parent's row lock (api_key_create), so a pass waits
    for it and the next pass, with a fresh snapshot, sees the new key."""
    total, now = 0, timezone.now()
    with connection.cursor() as cursor:
        while key_ids:
            cursor.execute(_DESCENDANTS, {"roots": [str(pk) for pk in key_ids], "now": now})
            if not cursor.rowcount:
                break
            total += cursor.rowcount
    return total
