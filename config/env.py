"""Small helpers to read settings from the environment (no third-party parser needed)."""

import os
import re
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured


def _bad(name: str, value: str, wanted: str) -> ImproperlyConfigured:
    # Fail at start, naming the variable: a typo must not quietly become the default (or False).
    return ImproperlyConfigured(f"{name}={value!r} is not valid: {wanted}.")


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    word = value.strip().lower()
    if word not in TRUE | FALSE:
        raise _bad(name, value, "use 1/0, true/false, yes/no or on/off")
    return word in TRUE


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise _bad(name, value, "want a whole number") from None


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise _bad(name, value, "want a number") from None


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (case-insensitive); anything else fails at start, naming the variable."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    word = value.strip().lower()
    if word not in choices:
        raise _bad(name, value, f"use one of {', '.join(choices)}")
    return word


def env_currency(name: str, default: str = "USD") -> str:
    """An ISO 4217 currency code (three letters, e.g. USD, EUR); anything else fails at start."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    code = value.strip().upper()
    if not re.fullmatch(r"[A-Z]{3}", code):
        raise _bad(name, value, "want a three-letter ISO 4217 currency code such as USD or EUR")
    return code


def env_days(name: str) -> int | None:
    """A number of days (1 or more), or None (forever) when unset, empty or "forever"."""
    value = os.environ.get(name)
    if value is None or value.strip().lower() in ("", "forever", "none"):
        return None
    try:
        days = int(value)
    except ValueError:
        raise _bad(name, value, "want a whole number of days (1 or more), or forever") from None
    if days < 1:
        raise _bad(name, value, "want a whole number of days (1 or more), or forever")
    return days


def env_url(name: str, default: str = "") -> str:
    """An http(s) URL without a trailing slash, or ``default`` when unset; anything else fails at start."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _bad(name, value, "want an http:// or https:// URL such as http://127.0.0.1:8001")
    return value.rstrip("/")


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return list(default or [])
    return [item.strip() for item in value.split(",") if item.strip()]


def env_proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """The request header a trusted proxy sets to ``https`` for TLS requests, as Django's
    ``SECURE_PROXY_SSL_HEADER`` wants it: ``X-Forwarded-Proto`` or ``HTTP_X_FORWARDED_PROTO`` both
    give ``("HTTP_X_FORWARDED_PROTO", "https")``. Unset: None (no proxy is trusted)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    header = value.upper().replace("-", "_")
    if not header.startswith("HTTP_"):
        header = f"HTTP_{header}"
    if not re.fullmatch(r"HTTP_[A-Z0-9_]+", header):
        raise _bad(name, value, "want a header name such as X-Forwarded-Proto")
    return (header, "https")


def parse_database_url(url: str) -> dict:
    """Turn ``postgres://user:pass@host:port/name?opt=v`` or ``sqlite:///path`` into a DATABASES entry."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in {"postgres", "postgresql", "pgsql"}:
        options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parsed.path.lstrip("/")) or "postgres",
            "USER": unquote(parsed.username or ""),
            "PASSWORD": unquote(parsed.password or ""),
            "HOST": parsed.hostname or "",
            "PORT": str(parsed.port or ""),
            "OPTIONS": options,
            "CONN_MAX_AGE": 0,
        }
    if scheme == "sqlite":
        # sqlite:///relative.db or sqlite:////absolute/path.db
        path = parsed.path[1:]
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": path or ":memory:", "OPTIONS": {"timeout": 20}}
    raise ValueError(f"DATABASE_URL scheme {scheme!r} is not supported (use postgres:// or sqlite:///)")
