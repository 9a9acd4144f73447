"""Time-ordered ids (UUID version 7, RFC 9562) for rows written at a high rate.

A random UUID4 primary key puts every new row on a random leaf of the key's btree: once the index
outgrows shared_buffers, an insert reads a leaf from disk (or the OS cache) and dirties it, and
the insert's cost grows with the table (bench/README.md, "The query log at 10 M rows"). A UUIDv7
starts with the time in milliseconds, so new rows' keys land at the right edge of the index, on
pages already in memory.

Layout: 48 bits of Unix time in ms, the version (7), 12 random bits, the variant (0b10), 62
random bits: 74 random bits per id, from ``os.urandom`` (unguessable as a capability: an id that
admits a caller, a query id a client polls, is no easier to guess than a 74-bit secret; it does
tell when it was made, which ``created_at`` tells anyway). Ids made in the same millisecond are
not ordered among themselves, which costs nothing here (they land on the same page).
Python 3.11 has no ``uuid.uuid7`` (3.14 has).
"""

import os
import time
import uuid
from datetime import datetime


def uuid7(at: datetime | None = None) -> uuid.UUID:
    """A new UUIDv7 for ``at`` (now when None)."""
    ms = int(at.timestamp() * 1000) if at is not None else time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 of them used
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 62 & 0xFFF) << 64  # rand_a: 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b: 62 bits
    return uuid.UUID(int=value)


def uuid7_time(value: uuid.UUID) -> int | None:
    """The ms timestamp of a UUIDv7, None for another version."""
    return value.int >> 80 if value.version == 7 else None
