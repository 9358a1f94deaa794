"""SSH public keys: a member's own, or the organization's shared ones (issue 15, docs/access.md).

A key is pasted as OpenSSH writes it (``ssh-ed25519 AAAA… comment``) and parsed by ``cryptography``'s
OpenSSH loader, not by hand. Accepted: ssh-ed25519, ecdsa-sha2-nistp256/384/521, and ssh-rsa of at least
3072 bits; anything else is refused with what would be taken. A private key pasted by mistake is refused
without being kept or logged. The fingerprint is OpenSSH's: ``SHA256:`` and the unpadded base64 of the
SHA-256 of the key's wire form.
"""

import base64
import binascii
import hashlib
import logging
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from django.db import IntegrityError, transaction

from console.kernel.errors import Conflict, DomainError, Forbidden
from marketplace.choices import Role
from marketplace.models import Reservation, SshKey
from marketplace.tenant_context import TenantContext

logger = logging.getLogger(__name__)

# Who is told that keys were deleted, with the reservations that had them (services.reservations.access
# sends those their new key lists). Registered in MarketplaceConfig.ready, so tenancy imports no
# reservation service.
_on_keys_removed: list = []


def on_keys_removed(callback) -> None:
    """Register ``callback(reservation_ids)``, called in the deleting transaction after the delete."""
    if callback not in _on_keys_removed:
        _on_keys_removed.append(callback)


MIN_RSA_BITS = 3072
MAX_KEY_CHARS = 16_384  # an RSA key of 16,384 bits is about 2,800 characters
ACCEPTED = "ssh-ed25519, ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, ecdsa-sha2-nistp521 or ssh-rsa of 3072 bits or more"
CURVES = {"secp256r1": "ecdsa-sha2-nistp256", "secp384r1": "ecdsa-sha2-nistp384", "secp521r1": "ecdsa-sha2-nistp521"}


@dataclass(frozen=True)
class ParsedKey:
    key_type: str
    bits: int
    public_key: str  # "<type> <base64>"
    fingerprint: str
    comment: str


def _refuse(message: str, code: str = "invalid_ssh_key") -> DomainError:
    return DomainError(message, code=code, fields={"public_key": [message]})


def ssh_key_parse(text: str) -> ParsedKey:
    """The key in ``text`` checked, or DomainError saying what is wrong with it (pure)."""
    text = (text or "").strip()
    if not text:
        raise _refuse("Paste a public key: the one line of your .pub file, e.g. ~/.ssh/id_ed25519.pub.")
    if "PRIVATE KEY" in text:
        raise _refuse(
            "That is a private key. Paste the public one (the .pub file next to it) and keep the private key "
            "to yourself; nothing of what you pasted was kept.",
            code="private_key_pasted",
        )
    if len(text) > MAX_KEY_CHARS or "\n" in text:
        raise _refuse("A public key is one line: <type> <base64> [comment], as in your .pub file.")
    parts = text.split(None, 2)
    if len(parts) < 2:
        raise _refuse("A public key is <type> <base64> [comment], as in your .pub file.")
    key_type, encoded = parts[0], parts[1]
    comment = parts[2].strip() if len(parts) > 2 else ""
    try:
        key = load_ssh_public_key(f"{key_type} {encoded}".encode("ascii"))
        blob = base64.b64decode(encoded, validate=True)
    except UnsupportedAlgorithm:
        raise _refuse(f"{key_type} keys are not accepted; use {ACCEPTED}.", code="ssh_key_type") from None
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise _refuse(f"That is not an OpenSSH public key we can read ({ACCEPTED}).") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        kind, bits = "ssh-ed25519", 256
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in CURVES:
        kind, bits = CURVES[key.curve.name], key.curve.key_size
    elif isinstance(key, rsa.RSAPublicKey):
        kind, bits = "ssh-rsa", key.key_size
        if bits < MIN_RSA_BITS:
            raise _refuse(
                f"This RSA key has {bits} bits; at least {MIN_RSA_BITS} are needed. Make a new key with "
                "ssh-keygen -t ed25519 (or -t rsa -b 4096).",
                code="ssh_key_too_short",
            )
    else:
        raise _refuse(f"{key_type} keys are not accepted; use {ACCEPTED}.", code="ssh_key_type")
    if kind != key_type:
        raise _refuse(f"The key says it is {key_type} but holds a {kind} key.")
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return ParsedKey(key_type=kind, bits=bits, public_key=f"{kind} {encoded}", fingerprint=fingerprint, comment=comment)


def ssh_key_add(*, tenant: TenantContext, public_key: str, name: str = "", shared: bool = False) -> SshKey:
    """Add a key for ``tenant.user``, or for the whole organization (``shared``: admins and owners)."""
    tenant.require(Role.MEMBER, "adding SSH keys")
    if shared and not tenant.is_admin:
        raise Forbidden("Only admins and owners add keys shared by the whole organization.")
    parsed = ssh_key_parse(public_key)
    name = (name or parsed.comment or parsed.key_type).strip()[:100]
    owner = None if shared else tenant.user
    try:
        with transaction.atomic():
            key = SshKey.objects.create(
                organization=tenant.organization,
                owner=owner,
                name=name,
                key_type=parsed.key_type,
                bits=parsed.bits,
                public_key=parsed.public_key,
                fingerprint=parsed.fingerprint,
                created_by=tenant.user,
            )
    except IntegrityError:
        existing = SshKey.objects.filter(
            organization=tenant.organization, owner=owner, fingerprint=parsed.fingerprint
        ).first()
        raise Conflict(
            f"This key ({parsed.fingerprint}) is already added as {existing.name if existing else 'another key'}.",
            code="ssh_key_exists",
        ) from None
    logger.info("SSH key %s added in %s by %s", parsed.fingerprint, tenant.organization.slug, tenant.user.email)
    return key


def ssh_key_remove(*, tenant: TenantContext, key: SshKey) -> None:
    """Remove a key: one's own, or (admins and owners) any of the organization's."""
    if key.organization_id != tenant.organization.pk:  # selectors already scope; this is a backstop
        raise Forbidden("That key belongs to another organization.")
    if not tenant.is_admin and key.owner_id != tenant.user.pk:
        raise Forbidden("Only admins and owners remove keys that are shared or someone else's.")
    logger.info("SSH key %s removed in %s by %s", key.fingerprint, tenant.organization.slug, tenant.user.email)
    _keys_delete(SshKey.objects.filter(pk=key.pk))


def ssh_keys_remove_as_operator(*, keys, actor: str) -> int:
    """Operators (the admin): remove keys, e.g. one known to be leaked, from wherever they let someone in."""
    fingerprints = sorted(keys.values_list("fingerprint", flat=True))
    logger.warning("SSH keys %s removed by operator %s", ", ".join(fingerprints), actor)
    return _keys_delete(keys)


def ssh_keys_of_member_remove(*, organization_id, user_id) -> int:
    """A member leaves: their own keys go with them, out of every reservation they were let into."""
    return _keys_delete(SshKey.objects.filter(organization_id=organization_id, owner_id=user_id))


@transaction.atomic
def _keys_delete(keys) -> int:
    """Delete ``keys``, and tell the reservations that had them (the callbacks of on_keys_removed)."""
    reservation_ids = list(
        Reservation.ssh_keys.through.objects.filter(sshkey__in=keys).values_list("reservation_id", flat=True)
    )
    deleted, _ = keys.delete()
    for callback in _on_keys_removed:
        callback(reservation_ids)
    return deleted
