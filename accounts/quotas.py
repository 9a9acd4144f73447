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

import redis
from django.conf import settings

from config.errors import ApiError
from config.ids import uuid7
from config.redis import client as redis_client
from config.redis import key as redis_key

QUOTA_FIELDS = ("requests_per_minute", "requests_per_day", "tokens_per_month", "max_concurrent_requests")
WINDOW_MS = 60_000
UNAVAILABLE_RETRY_SECONDS = 5


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
    """How long a committed query holds its slot at most (its holder may have died)."""
    return int((settings.MAX_QUEUED_SECONDS + settings.INFERENCE_HARD_TIME_LIMIT + 60) * 1000)


def admission_lease_ms() -> int:
    """How long an admission holds its slot before its row is committed."""
    return int(settings.ADMISSION_LEASE_SECONDS * 1000)


@dataclass(frozen=True)
class Held:
    """A reservation the month counter still carries: the admission's id, its day and its tokens."""

    member: str
    day: str
    reserve: int
    unfinished: bool = False  # restored from a queued or running row: it holds a slot too
    created_ms: int = 0

    @property
    def value(self) -> str:
        return f"{self.day}|{self.reserve}"


def _parse_held(value) -> tuple[str, int]:
    text = value.decode() if isinstance(value, bytes) else value
    day, _, reserve = text.partition("|")
    return day, int(reserve)


# --- the two backends ---------------------------------------------------------------------------
# A key's counters: rpm (sorted set of admissions, by time), day:<date> and month:<month> (counts),
# slots (sorted set of holders, by lease end), held (hash admission -> "<day>|<reserved tokens>").
# A reservation is refunded only by the call that removes it from ``held`` (exactly once, whoever
# ends it), and a slot freed by its lease's end keeps its reservation until that call: a slot
# and a reservation are two things with two lives. ``pending`` (one sorted set for every key)
# lists admissions not yet vouched for by a committed row, by when they were last vouched for.
_ADMIT_LUA = """
local now = tonumber(ARGV[1])
local rpm, rpd, tpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local reserve, conc, member = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local lease, day_ttl, month_ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local held_value, pending_member, slots_ttl = ARGV[11], ARGV[12], tonumber(ARGV[13])
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
  redis.call('PEXPIRE', KEYS[4], slots_ttl)
  redis.call('HSET', KEYS[5], member, held_value)
  redis.call('ZADD', KEYS[6], now, pending_member)
  in_window = in_window + 1
  running = running + 1
  if not oldest then oldest = tostring(now) end
end
return {verdict, in_window, oldest or '', today, tokens, running}
"""

# The row is being committed: its admission is vouched for now, and its slot lasts the query.
# 0 when the reservation is gone (the sweeper settled an admission that took too long).
_COMMIT_LUA = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('ZADD', KEYS[3], 'XX', ARGV[3], ARGV[2])
return 1
"""

# Ends an admission: frees its slot and refunds what it did not use, once. With ARGV[5] (the
# sweeper's settling of an admission without a row) only if nobody vouched for it since.
_SETTLE_LUA = """
if ARGV[5] ~= '' and tonumber(redis.call('ZSCORE', KEYS[3], ARGV[2]) or '-1') ~= tonumber(ARGV[5]) then
  return -1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local sep = string.find(held, '|', 1, true)
local refund = tonumber(string.sub(held, sep + 1)) - tonumber(ARGV[3])
local month = ARGV[4] .. string.sub(held, 1, 7)
if refund > 0 and redis.call('EXISTS', month) == 1 then redis.call('DECRBY', month, refund) end
return 1
"""

# A row exists for a pending admission: the row's own end settles it; an unfinished one holds a slot.
_ADOPT_LUA = """
redis.call('ZREM', KEYS[3], ARGV[2])
if ARGV[3] ~= '0' and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[1], 'GT', tonumber(ARGV[3]), ARGV[1])
end
return 1
"""

# Counters rebuilt from PostgreSQL after Redis lost them. The reservations of the rows (ARGV[9..],
# member/value/slot-end triples) join those still held here (admissions since the loss); the day
# counts the rows plus admissions of today without a row; the month the rollups plus every
# reservation held.
_RESTORE_LUA = """
local db_day, db_tokens, today, month = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local day_ttl, month_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local now, pending_prefix = tonumber(ARGV[7]), ARGV[8]
local from_rows = {}
for i = 9, #ARGV, 3 do
  from_rows[ARGV[i]] = true
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    -- re-added from a row: the sweeper checks it again later, in case that row settled meanwhile
    redis.call('ZADD', KEYS[5], 'NX', now, pending_prefix .. ARGV[i])
  end
  if ARGV[i + 2] ~= '0' then redis.call('ZADD', KEYS[4], 'NX', tonumber(ARGV[i + 2]), ARGV[i]) end
end
local extra_day, held_tokens = 0, 0
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local value = all[i + 1]
  local sep = string.find(value, '|', 1, true)
  if string.sub(value, 1, 7) == month then held_tokens = held_tokens + tonumber(string.sub(value, sep + 1)) end
  if not from_rows[all[i]] and string.sub(value, 1, 10) == today then extra_day = extra_day + 1 end
end
redis.call('SET', KEYS[1], db_day + extra_day, 'PX', day_ttl)
redis.call('SET', KEYS[2], db_tokens + held_tokens, 'PX', month_ttl)
return {db_day + extra_day, db_tokens + held_tokens}
"""


def _day_ttl_ms(at: datetime) -> int:
    return _ms_until_tomorrow(at) + 3_600_000


def _month_ttl_ms(at: datetime) -> int:
    return _ms_until_next_month(at) + 86_400_000


class RedisQuotaBackend:
    def __init__(self):
        self._redis = redis_client
        self._scripts = {}

    def _prefix(self, key_id: int) -> str:
        return redis_key("quota", key_id)

    def _keys(self, key_id: int, at: datetime) -> list[str]:
        prefix = self._prefix(key_id)
        return [f"{prefix}:rpm", f"{prefix}:day:{_day(at)}", f"{prefix}:month:{_month(at)}", f"{prefix}:slots"]

    def _own(self, key_id: int) -> list[str]:
        """slots, held, pending: what the commit/settle/adopt scripts touch."""
        prefix = self._prefix(key_id)
        return [f"{prefix}:slots", f"{prefix}:held", redis_key("quota", "pending")]

    def _script(self, source: str):
        if source not in self._scripts:
            self._scripts[source] = self._redis().register_script(source)
        return self._scripts[source]

    def admit(self, key_id: int, limits: Limits, reserve: int, member: str, at: datetime) -> tuple[str, Snapshot]:
        now_ms = int(at.timestamp() * 1000)

        def arg(value):
            return -1 if value is None else value

        slots, held, pending = self._own(key_id)
        verdict, in_window, oldest, today, tokens, running = self._script(_ADMIT_LUA)(
            keys=[*self._keys(key_id, at), held, pending],
            args=[
                now_ms,
                arg(limits.requests_per_minute),
                arg(limits.requests_per_day),
                arg(limits.tokens_per_month),
                reserve,
                arg(limits.max_concurrent_requests),
                member,
                admission_lease_ms(),
                _day_ttl_ms(at),
                _month_ttl_ms(at),
                Held(member, _day(at), reserve).value,
                f"{key_id}:{member}",
                slot_lease_ms(),
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

    def commit(self, key_id: int, member: str, at: datetime) -> bool:
        args = [member, f"{key_id}:{member}", int(at.timestamp() * 1000), slot_lease_ms()]
        return bool(self._script(_COMMIT_LUA)(keys=self._own(key_id), args=args))

    def settle(self, key_id: int, member: str, used: int, *, if_pending_since: int | None = None) -> bool:
        args = [member, f"{key_id}:{member}", used, f"{self._prefix(key_id)}:month:"]
        args.append("" if if_pending_since is None else str(if_pending_since))
        return self._script(_SETTLE_LUA)(keys=self._own(key_id), args=args) == 1

    def pending(self, older_than: datetime) -> list[tuple[int, str, int]]:
        """Admissions nobody vouched for since ``older_than``: (key id, admission id, when)."""
        cutoff = int(older_than.timestamp() * 1000)
        found = self._redis().zrangebyscore(redis_key("quota", "pending"), "-inf", cutoff, withscores=True)
        out = []
        for name, score in found:
            key_id, _, member = (name.decode() if isinstance(name, bytes) else name).partition(":")
            out.append((int(key_id), member, int(score)))
        return out

    def adopt(self, key_id: int, member: str, slot_until: datetime | None) -> None:
        until = 0 if slot_until is None else int(slot_until.timestamp() * 1000)
        self._script(_ADOPT_LUA)(keys=self._own(key_id), args=[member, f"{key_id}:{member}", until])

    def restored(self) -> bool:
        return bool(self._redis().exists(redis_key("quota", "restored")))

    def mark_restored(self, at: datetime) -> None:
        self._redis().set(redis_key("quota", "restored"), at.isoformat())

    def restore(self, key_id: int, at: datetime, *, day_requests: int, month_tokens: int, held: list[Held]) -> tuple:
        rpm, day, month, slots = self._keys(key_id, at)
        args = [day_requests, month_tokens, _day(at), _month(at), _day_ttl_ms(at), _month_ttl_ms(at)]
        args += [int(at.timestamp() * 1000), f"{key_id}:"]
        for item in held:
            slot_end = item.created_ms + slot_lease_ms() if item.unfinished else 0
            args += [item.member, item.value, slot_end]
        keys = [day, month, f"{self._prefix(key_id)}:held", slots, redis_key("quota", "pending")]
        return tuple(self._script(_RESTORE_LUA)(keys=keys, args=args))

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
        self._held: dict[int, dict[str, tuple[str, int]]] = defaultdict(dict)
        self._pending: dict[tuple[int, str], int] = {}
        self._restored = False

    def _prune(self, key_id: int, now_ms: int) -> None:
        window = self._window[key_id]
        while window and window[0] <= now_ms - WINDOW_MS:
            window.popleft()
        slots = self._slots[key_id]
        for member in [m for m, expires in slots.items() if expires <= now_ms]:
            del slots[member]  # its reservation stays held until settled

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
            self._slots[key_id][member] = now_ms + admission_lease_ms()
            self._held[key_id][member] = (_day(at), reserve)
            self._pending[(key_id, member)] = now_ms
            return "ok", self._snapshot(key_id, at)

    def commit(self, key_id: int, member: str, at: datetime) -> bool:
        now_ms = int(at.timestamp() * 1000)
        with self._lock:
            if member not in self._held[key_id]:
                return False
            self._slots[key_id][member] = now_ms + slot_lease_ms()
            if (key_id, member) in self._pending:
                self._pending[(key_id, member)] = now_ms
            return True

    def settle(self, key_id: int, member: str, used: int, *, if_pending_since: int | None = None) -> bool:
        with self._lock:
            if if_pending_since is not None and self._pending.get((key_id, member)) != if_pending_since:
                return False
            self._slots[key_id].pop(member, None)
            self._pending.pop((key_id, member), None)
            held = self._held[key_id].pop(member, None)
            if held is None:  # settled already: a repeat changes nothing
                return False
            day, reserve = held
            if reserve > used:
                self._months[(key_id, day[:7])] -= reserve - used
            return True

    def pending(self, older_than: datetime) -> list[tuple[int, str, int]]:
        cutoff = int(older_than.timestamp() * 1000)
        with self._lock:
            return [(key_id, member, at) for (key_id, member), at in self._pending.items() if at <= cutoff]

    def adopt(self, key_id: int, member: str, slot_until: datetime | None) -> None:
        with self._lock:
            self._pending.pop((key_id, member), None)
            if slot_until is not None and member in self._held[key_id]:
                until = int(slot_until.timestamp() * 1000)
                self._slots[key_id][member] = max(self._slots[key_id].get(member, 0), until)

    def restored(self) -> bool:
        return self._restored

    def mark_restored(self, at: datetime) -> None:
        self._restored = True

    def restore(self, key_id: int, at: datetime, *, day_requests: int, month_tokens: int, held: list[Held]) -> tuple:
        with self._lock:
            mine = self._held[key_id]
            from_rows = set()
            for item in held:
                from_rows.add(item.member)
                if item.member not in mine:
                    mine[item.member] = (item.day, item.reserve)
                    self._pending.setdefault((key_id, item.member), int(at.timestamp() * 1000))
                if item.unfinished:
                    self._slots[key_id].setdefault(item.member, item.created_ms + slot_lease_ms())
            extra = sum(1 for m, (day, _) in mine.items() if m not in from_rows and day == _day(at))
            tokens = sum(reserve for day, reserve in mine.values() if day[:7] == _month(at))
            self._days[(key_id, _day(at))] = day_requests + extra
            self._months[(key_id, _month(at))] = month_tokens + tokens
            return day_requests + extra, month_tokens + tokens

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
def reservation(prompt, max_tokens, images: int = 1) -> int:
    """An upper bound of a query's tokens: max_tokens, the prompt's bytes (no token is shorter than
    a byte; ``prompt`` is all of the conversation's text), each image's tokens and the chat template's."""
    try:
        completion = int(max_tokens) if max_tokens not in (None, "") else settings.DEFAULT_MAX_TOKENS
    except (TypeError, ValueError):
        completion = settings.DEFAULT_MAX_TOKENS
    completion = min(max(completion, 1), settings.MAX_NEW_TOKENS)
    prompt_bytes = len(prompt.encode("utf-8")) if isinstance(prompt, str) else 0
    return completion + prompt_bytes + images * settings.IMAGE_TOKEN_BOUND + settings.TEMPLATE_TOKEN_BOUND


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


def admit(api_key, *, prompt=None, max_tokens=None, images: int = 1, model: str = "", endpoint: str = "") -> Admission:
    """Admit one request of ``api_key`` (``images`` images) or raise 429 (``rate_limited`` / ``quota_exceeded``).
    ``model`` and ``endpoint`` only label a refusal in the usage rollups."""
    limits = Limits.of(api_key)
    at = datetime.now(UTC)
    admission_id = uuid7(at)  # the query's id too: time-ordered (config/ids.py), 74 random bits
    reserve = reservation(prompt, max_tokens, images)
    try:
        verdict, snap = backend().admit(api_key.pk, limits, reserve, admission_id.hex, at)
    except redis.RedisError as exc:
        raise unavailable() from exc
    rate_headers = headers(limits, snap, at)
    if verdict != "ok":
        from inference import usage

        code, what = _REFUSALS[verdict]
        retry_ms = max(1, _retry_after_ms(verdict, snap, at))
        usage.record_rejection(api_key, code, at, model=model, endpoint=endpoint)
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


def commit(admission: Admission) -> None:
    """Called inside the transaction that writes the admission's row, just before it commits: the
    slot now lasts the whole query. Raises 503 when the admission expired meanwhile (its
    reservation was refunded) or Redis is unreachable; the row is then not written."""
    try:
        kept = backend().commit(admission.key_id, admission.id.hex, now())
    except redis.RedisError as exc:
        raise unavailable() from exc
    if not kept:
        raise ApiError(
            "service_unavailable",
            f"This request took over {settings.ADMISSION_LEASE_SECONDS:g} s to be accepted "
            "and its admission expired; retry it.",
            headers={"Retry-After": "1"},
        )


def settle(key_id: int | None, admission_id, *, used: int) -> bool:
    """End an admission: free its concurrent slot and refund what it reserved beyond ``used``.
    Exactly once whoever calls it first (the query's ender, the sweeper, a refused input); True
    when this call made the refund."""
    if key_id is None:
        return False
    return backend().settle(key_id, uuid.UUID(str(admission_id)).hex, max(0, used))


def unavailable() -> ApiError:
    return ApiError(
        "service_unavailable",
        "The quota service is unreachable for a moment; nothing was spent. Retry shortly.",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)},
    )


def now() -> datetime:
    return datetime.now(UTC)


def snapshot(api_key) -> tuple[Limits, Snapshot]:
    return Limits.of(api_key), backend().snapshot(api_key.pk, now())
