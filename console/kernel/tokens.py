"""Bearer secrets of the form ``<scheme>_<prefix>_<secret>`` (API keys, node secrets, bootstrap
tokens): the prefix is visible and finds the row, only a SHA-256 digest of the secret is stored.

High-entropy random secrets need no slow hash: SHA-256 cannot be brute-forced from 256 bits."""

import hashlib
import hmac
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    scheme: str
    prefix: str
    secret: str

    @property
    def plaintext(self) -> str:
        return f"{self.scheme}_{self.prefix}_{self.secret}"

    @property
    def digest(self) -> str:
        return digest(self.secret)


def new_token(scheme: str) -> Token:
    return Token(scheme=scheme, prefix=secrets.token_hex(4), secret=secrets.token_urlsafe(32))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(plaintext: str, scheme: str) -> Token | None:
    """The parts of a presented token, or None when it is not one of ``scheme``'s."""
    parts = (plaintext or "").strip().split("_", 2)
    if len(parts) != 3 or parts[0] != scheme or not parts[1] or not parts[2]:
        return None
    return Token(scheme=parts[0], prefix=parts[1], secret=parts[2])


def matches(stored_digest: str, token: Token) -> bool:
    return hmac.compare_digest(stored_digest, token.digest)
