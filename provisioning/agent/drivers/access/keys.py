"""The public keys a reservation's tenant logs in with (``params.access``: ``keys`` and their ``version``).

The console has checked them already; the agent checks again that each is one line of ``<type> <base64>
[comment]`` and nothing else, because it writes them into an authorized_keys file, where a line break
would start a line of the tenant's choosing and a leading word that is not a key type would be read as
options (``command=...``, ``from=...``). So each key is parsed, and written back rebuilt from its
parts."""

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from provisioning.agent.drivers.base import DriverError, Params

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
MAX_KEYS = 100
MAX_KEY_CHARS = 16_384  # an RSA key of 16384 bits is under 3 KiB in base64


@dataclass(frozen=True)
class Keys:
    """The key lines to authorize, and the version of the key list they are (the console's count)."""

    lines: tuple[str, ...]
    version: int

    def authorized_keys(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)


def access_of(params: Params) -> Keys | None:
    """``params.access`` of a provisioning checked, or None when it asks for no access."""
    access = params.get("access")
    if access is None:
        return None
    if not isinstance(access, dict):
        raise DriverError("params.access must be an object")
    return keys_of(access, where="params.access")


def keys_of(holder: Params, *, where: str = "params") -> Keys:
    """``keys`` and ``version`` of ``holder`` (``params.access`` of a provisioning, the params of an
    ``access`` command) checked."""
    version = holder.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise DriverError(f"{where}.version must be an integer from 0")
    keys = holder.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_KEYS:
        raise DriverError(f"{where}.keys must be a list of at most {MAX_KEYS} public keys")
    return Keys(
        lines=tuple(_key_line(key, f"{where}.keys[{number}]") for number, key in enumerate(keys)), version=version
    )


def _key_line(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise DriverError(f"{where} must be a public key, '<type> <base64> [comment]'")
    if "\n" in key or "\r" in key:
        raise DriverError(f"{where} holds a line break; a public key is one line")
    if len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise DriverError(f"{where} is not one line of printable text of at most {MAX_KEY_CHARS} characters")
    kind, *rest = key.strip().split(None, 2)
    if kind not in KEY_TYPES:
        raise DriverError(f"{where} starts with {kind[:40]!r}, not a key type ({', '.join(sorted(KEY_TYPES))})")
    if not rest or _blob_type(rest[0]) != kind:
        raise DriverError(f"{where} is not a {kind} key: its base64 part does not hold one")
    return " ".join([kind, *rest])


def _blob_type(data: str) -> str | None:
    """The key type a key's base64 part says it holds (its first field), or None when it is no key."""
    try:
        blob = base64.b64decode(data, validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        return blob[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        return None


def fingerprint(public_key_line: str) -> str:
    """``SHA256:<base64>``, as ``ssh-keygen -l`` and ssh's host key prompt write a key's fingerprint."""
    digest = hashlib.sha256(base64.b64decode(public_key_line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")
