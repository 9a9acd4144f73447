"""Per-key quotas, enforced before any inference is spent.

Four limits, each from the key's override or else its tenant's default (None = unlimited):

* requests per minute — a sliding window over the last 60 s, exact under concurrency;
* requests per UTC day;
* tokens per UTC calendar month — an admission *reserves* an upper bound of the query's tokens
  (``max_tokens`` plus a bound on the prompt's, image included) and the real count is settled when
  the query ends, the rest refunded, so the budget is never overshot;
* concurrent requests — a slot held from admission until the query ends, whatever the outcome,
  and freed by expiry (a lease) if its holder died without releasing it.

Production keeps the counters in Redis and admits with one Lua script (atomic across every web
process); the embedded default keeps the same counters in process memory under a lock. Both
implement ``admit``/``settle``/``snapshot``; everything else is shared.
"""

import threading
import uuid
from bisect import bisect_right
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings

from config.errors import ApiError
from config.redis import client as redis_client
from config.redis import key as redis_key

QUOTA_FIELDS = ("requests_per_minute", "requests_per_day", "tokens_per_month", "max_concurrent_requests")
WINDOW_MS = 60_000


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None
    requests_per_day: int | None
    tokens_per_month: int | None
    max_concurrent_requests: int | None

    @classmethod
    def of(cls, api_key) -> "Limits":
        tenant = api_key.tenant
        values = {}
        for name in QUOTA_FIELDS:
            override = getattr(api_key, name)
            values[name] = override if override is not None else getattr(tenant, name)
        return cls(**values)


@dataclass
class Snapshot:
    """Counters of a key right now."""

    requests_last_minute: int = 0
    oldest_in_window_ms: int | None = None
    requests_today: int = 0
    tokens_this_month: int = 0
    concurrent: int = 0


@dataclass
class Admission:
    """An admitted request: its id (the query's id), its reservation and its rate-limit headers."""

    id: uuid.UUID
    key_id: int
    reserved_tokens: int
    month: str
    at: datetime
    headers: dict = field(default_factory=dict)


def _month(at: datetime) -> str:
    return at.strftime("%Y-%m")


def _day(at: datetime) -> str:
    return at.strftime("%Y-%m-%d")


def _ms_until_tomorrow(at: datetime) -> int:
    tomorrow = (at + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return int((tomorrow - at).total_seconds() * 1000)


def _ms_until_next_month(at: datetime) -> int:
    first = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (first + timedelta(days=32)).replace(day=1)
    return int((following - at).total_seconds() * 1000)


def _duration(ms: int) -> str:
    """OpenAI's reset format: 1s, 6m0s, 2h3m4s."""
    seconds = max(0, ms) / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{seconds}s" if hours else f"{minutes}m{seconds}s"


def slot_lease_ms() -> int:
    return int((settings.MAX_QUEUED_SECONDS + settings.INFERENCE_HARD_TIME_LIMIT + 60) * 1000)


# --- the two backends ---------------------------------------------------------------------------
_ADMIT_LUA = """
local now = tonumber(ARGV[1])
local rpm, rpd, tpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local reserve, conc, member = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local lease, day_ttl, month_ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local in_window = redis.call('ZCARD', KEYS[1])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
local today = tonumber(redis.call('GET', KEYS[2]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
local running = redis.call('ZCARD', KEYS[4])
local verdict = 'ok'
if rpm >= 0 and in_window >= rpm then verdict = 'requests_per_minute'
elseif rpd >= 0 and today >= rpd then verdict = 'requests_per_day'
elseif tpm >= 0 and tokens + reserve > tpm then verdict = 'tokens_per_month'
elseif conc >= 0 and running >= conc then verdict = 'max_concurrent_requests'
end
if verdict == 'ok' then
  redis.call('ZADD', KEYS[1], now, member)
  redis.call('PEXPIRE', KEYS[1], 60000)
  today = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], day_ttl)
  tokens = redis.call('INCRBY', KEYS[3], reserve)
  redis.call('PEXPIRE', KEYS[3], month_ttl)
  redis.call('ZADD', KEYS[4], now + lease, member)
  redis.call('PEXPIRE', KEYS[4], lease)
  in_window = in_window + 1
  running = running + 1
  if not oldest then oldest = tostring(now) end
end
return {verdict, in_window, oldest or '', today, tokens, running}
"""

# Idempotent: the refund is made only by the call that frees the slot.
_SETTLE_LUA = """
local refund = tonumber(ARGV[1])
local freed = redis.call('ZREM', KEYS[2], ARGV[2])
if freed == 1 and refund ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('DECRBY', KEYS[1], refund) end
return freed
"""


class RedisQuotaBackend:
    def __init__(self):
        self._redis = redis_client
        self._admit = None
        self._settle = None

    def _keys(self, key_id: int, at: datetime) -> list[str]:
        prefix = redis_key("quota", key_id)
        return [f"{prefix}:rpm", f"{prefix}:day:{_day(at)}", f"{prefix}:month:{_month(at)}", f"{prefix}:slots"]

    def _scripts(self):
        if self._admit is None:
            client = self._redis()
            self._admit = client.register_script(_ADMIT_LUA)
            self._settle = client.register_script(_SETTLE_LUA)
        return self._admit, self._settle

    def admit(self, key_id: int, limits: Limits, reserve: int, member: str, at: datetime) -> tuple[str, Snapshot]:
        admit, _ = self._scripts()
        now_ms = int(at.timestamp() * 1000)

        def arg(value):
            return -1 if value is None else value

        verdict, in_window, oldest, today, tokens, running = admit(
            keys=self._keys(key_id, at),
            args=[
                now_ms,
                arg(limits.requests_per_minute),
                arg(limits.requests_per_day),
                arg(limits.tokens_per_month),
                reserve,
                arg(limits.max_concurrent_requests),
                member,
                slot_lease_ms(),
                _ms_until_tomorrow(at) + 3_600_000,
                _ms_until_next_month(at) + 86_400_000,
            ],
        )
        snapshot = Snapshot(
            requests_last_minute=int(in_window),
            oldest_in_window_ms=int(float(oldest)) if oldest else None,
            requests_today=int(today),
            tokens_this_month=int(tokens),
            concurrent=int(running),
        )
        return verdict.decode() if isinstance(verdict, bytes) else verdict, snapshot

    def settle(self, key_id: int, member: str, month_at: datetime, refund: int) -> None:
        _, settle = self._scripts()
        keys = self._keys(key_id, month_at)
        settle(keys=[keys[2], keys[3]], args=[refund, member])

    def snapshot(self, key_id: int, at: datetime) -> Snapshot:
        rpm, day, month, slots = self._keys(key_id, at)
        now_ms = int(at.timestamp() * 1000)
        client = self._redis()
        with client.pipeline() as pipe:
            pipe.zcount(rpm, now_ms - WINDOW_MS, "+inf")
            pipe.zrangebyscore(rpm, now_ms - WINDOW_MS, "+inf", start=0, num=1, withscores=True)
            pipe.get(day)
            pipe.get(month)
            pipe.zcount(slots, now_ms, "+inf")
            in_window, oldest, today, tokens, running = pipe.execute()
        return Snapshot(
            requests_last_minute=in_window,
            oldest_in_window_ms=int(oldest[0][1]) if oldest else None,
            requests_today=int(today or 0),
            tokens_this_month=int(tokens or 0),
            concurrent=running,
        )


class LocalQuotaBackend:
    """The embedded default: the same rules in process memory (one process serves everything)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._window: dict[int, deque] = defaultdict(deque)
        self._days: dict[tuple[int, str], int] = defaultdict(int)
        self._months: dict[tuple[int, str], int] = defaultdict(int)
        self._slots: dict[int, dict[str, int]] = defaultdict(dict)

    def _prune(self, key_id: int, now_ms: int) -> None:
        window = self._window[key_id]
        while window and window[0] <= now_ms - WINDOW_MS:
            window.popleft()
        slots = self._slots[key_id]
        for member in [m for m, expires in slots.items() if expires <= now_ms]:
            del slots[member]

    def _snapshot(self, key_id: int, at: datetime) -> Snapshot:
        window = self._window[key_id]
        return Snapshot(
            requests_last_minute=len(window),
            oldest_in_window_ms=window[0] if window else None,
            requests_today=self._days[(key_id, _day(at))],
            tokens_this_month=self._months[(key_id, _month(at))],
            concurrent=len(self._slots[key_id]),
        )

    def admit(self, key_id: int, limits: Limits, reserve: int, member: str, at: datetime) -> tuple[str, Snapshot]:
        now_ms = int(at.timestamp() * 1000)
        with self._lock:
            self._prune(key_id, now_ms)
            snap = self._snapshot(key_id, at)
            checks = (
                ("requests_per_minute", limits.requests_per_minute, snap.requests_last_minute + 1),
                ("requests_per_day", limits.requests_per_day, snap.requests_today + 1),
                ("tokens_per_month", limits.tokens_per_month, snap.tokens_this_month + reserve),
                ("max_concurrent_requests", limits.max_concurrent_requests, snap.concurrent + 1),
            )
            for name, limit, wanted in checks:
                if limit is not None and wanted > limit:
                    return name, snap
            window = self._window[key_id]
            window.insert(bisect_right(window, now_ms), now_ms)
            self._days[(key_id, _day(at))] += 1
            self._months[(key_id, _month(at))] += reserve
            self._slots[key_id][member] = now_ms + slot_lease_ms()
            return "ok", self._snapshot(key_id, at)

    def settle(self, key_id: int, member: str, month_at: datetime, refund: int) -> None:
        with self._lock:
            if self._slots[key_id].pop(member, None) is not None:  # idempotent, as in Redis
                self._months[(key_id, _month(month_at))] -= refund

    def snapshot(self, key_id: int, at: datetime) -> Snapshot:
        with self._lock:
            self._prune(key_id, int(at.timestamp() * 1000))
            return self._snapshot(key_id, at)


_backend = None
_backend_lock = threading.Lock()


def backend():
    global _backend
    with _backend_lock:
        wanted = LocalQuotaBackend if settings.EMBEDDED else RedisQuotaBackend
        if not isinstance(_backend, wanted):
            _backend = wanted()
        return _backend


# --- the rules ----------------------------------------------------------------------------------
def reservation(prompt, max_tokens) -> int:
    """An upper bound of a query's tokens: max_tokens, the prompt's bytes (no token is shorter than
    a byte), the image's tokens and the chat template's."""
    try:
        completion = int(max_tokens) if max_tokens not in (None, "") else settings.DEFAULT_MAX_TOKENS
    except (TypeError, ValueError):
        completion = settings.DEFAULT_MAX_TOKENS
    completion = min(max(completion, 1), settings.MAX_NEW_TOKENS)
    prompt_bytes = len(prompt.encode("utf-8")) if isinstance(prompt, str) else 0
    return completion + prompt_bytes + settings.IMAGE_TOKEN_BOUND + settings.TEMPLATE_TOKEN_BOUND


def headers(limits: Limits, snap: Snapshot, at: datetime) -> dict:
    now_ms = int(at.timestamp() * 1000)
    out = {}
    if limits.requests_per_minute is not None:
        reset = (snap.oldest_in_window_ms + WINDOW_MS - now_ms) if snap.oldest_in_window_ms is not None else 0
        out["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        out["x-ratelimit-remaining-requests"] = str(max(0, limits.requests_per_minute - snap.requests_last_minute))
        out["x-ratelimit-reset-requests"] = _duration(reset)
    if limits.tokens_per_month is not None:
        out["x-ratelimit-limit-tokens"] = str(limits.tokens_per_month)
        out["x-ratelimit-remaining-tokens"] = str(max(0, limits.tokens_per_month - snap.tokens_this_month))
        out["x-ratelimit-reset-tokens"] = _duration(_ms_until_next_month(at))
    return out


_REFUSALS = {
    "requests_per_minute": ("rate_limited", "requests per minute"),
    "requests_per_day": ("quota_exceeded", "requests per day"),
    "tokens_per_month": ("quota_exceeded", "tokens per month"),
    "max_concurrent_requests": ("rate_limited", "concurrent requests"),
}


def _retry_after_ms(verdict: str, snap: Snapshot, at: datetime) -> int:
    now_ms = int(at.timestamp() * 1000)
    if verdict == "requests_per_minute" and snap.oldest_in_window_ms is not None:
        return snap.oldest_in_window_ms + WINDOW_MS - now_ms
    if verdict == "requests_per_day":
        return _ms_until_tomorrow(at)
    if verdict == "tokens_per_month":
        return _ms_until_next_month(at)
    return 1000  # a concurrent slot frees when a running query ends


def admit(api_key, *, prompt=None, max_tokens=None) -> Admission:
    """Admit one request of ``api_key`` or raise 429 (``rate_limited`` / ``quota_exceeded``)."""
    limits = Limits.of(api_key)
    at = datetime.now(UTC)
    admission_id = uuid.uuid4()
    reserve = reservation(prompt, max_tokens)
    verdict, snap = backend().admit(api_key.pk, limits, reserve, admission_id.hex, at)
    rate_headers = headers(limits, snap, at)
    if verdict != "ok":
        from inference import usage

        code, what = _REFUSALS[verdict]
        retry_ms = max(1, _retry_after_ms(verdict, snap, at))
        usage.record_rejection(api_key, code, at)
        limit = getattr(limits, verdict)
        message = f"This key's limit of {limit} {what} is reached; retry after {_duration(retry_ms)}."
        if verdict == "tokens_per_month":
            message = (
                f"This key's budget of {limit} tokens per month cannot cover this request "
                f"(up to {reserve} tokens reserved; {max(0, limit - snap.tokens_this_month)} left). "
                "Lower max_tokens, or retry next month."
            )
        raise ApiError(code, message, headers={**rate_headers, "Retry-After": str(max(1, -(-retry_ms // 1000)))})
    return Admission(admission_id, api_key.pk, reserve, _month(at), at, rate_headers)


def settle(key_id: int, admission_id, created_at: datetime, reserved: int, used: int) -> None:
    """End an admission: free the concurrent slot and refund the unused reservation (once)."""
    if key_id is None:
        return
    backend().settle(key_id, uuid.UUID(str(admission_id)).hex, created_at, max(0, reserved - used))


def now() -> datetime:
    return datetime.now(UTC)


def snapshot(api_key) -> tuple[Limits, Snapshot]:
    return Limits.of(api_key), backend().snapshot(api_key.pk, now())
