"""The API key format: ``sl_<8-char prefix>_<32-char secret>``, both parts base62."""

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

ALPHABET = string.ascii_letters + string.digits  # base62
PREFIX_LENGTH = 8
SECRET_LENGTH = 32
KEY_RE = re.compile(rf"^sl_([A-Za-z0-9]{{{PREFIX_LENGTH}}})_([A-Za-z0-9]{{{SECRET_LENGTH}}})$")


@dataclass(frozen=True)
class NewKey:
    prefix: str
    plaintext: str
    key_hash: str


def _random(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def generate() -> NewKey:
    prefix = _random(PREFIX_LENGTH)
    plaintext = f"sl_{prefix}_{_random(SECRET_LENGTH)}"
    return NewKey(prefix=prefix, plaintext=plaintext, key_hash=hash_key(plaintext))


def parse_prefix(plaintext: str) -> str | None:
    """The public prefix of a well-formed key, or None when the text is not a Sightline key."""
    match = KEY_RE.match(plaintext)
    return match.group(1) if match else None


def matches(plaintext: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(plaintext), key_hash)


def generate_token() -> str:
    """A one-time link's token (an invitation's): 43 URL-safe characters, stored only as its hash."""
    return secrets.token_urlsafe(32)
