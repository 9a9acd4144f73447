"""Per-key quotas, enforced before any inference is spent.

Four limits, each from the key's override or else its tenant's default (None = unlimited):

* requests per minute — a sliding window over the last 60 s, exact under concurrency;
* requests per UTC day;
* tokens per UTC calendar month — an admission *reserves* an upper bound of the query's tokens
  (``max_tokens`` plus a bound on the prompt's, image included) and the real count is settled when
  the query ends, the rest refunded, so the budget is never overshot;
* concurrent requests — a slot held from admission until the query ends, whatever the outcome,
  and freed by expiry (a lease) if its holder died without releasing it;
* monthly budgets in money — the key's own and its tenant's (one counter shared by all the
  tenant's keys): an admission reserves its worst-case cost (config/money.py, in integer
  nano-units of the currency) against both, and the real cost is settled when the query ends.

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
from decimal import Decimal

import redis
from django.conf import settings

from config import money
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
    # Monthly budgets (Decimal, in the currency): the key's own and its tenant's; both apply.
    key_budget: Decimal | None = None
    tenant_budget: Decimal | None = None

    @classmethod
    def of(cls, api_key) -> "Limits":
        tenant = api_key.tenant
        values = {}
        for name in QUOTA_FIELDS:
            override = getattr(api_key, name)
            values[name] = override if override is not None else getattr(tenant, name)
        return cls(**values, key_budget=api_key.monthly_budget, tenant_budget=tenant.monthly_budget)


@dataclass
class Snapshot:
    """Counters of a key right now."""

    requests_last_minute: int = 0
    oldest_in_window_ms: int | None = None
    requests_today: int = 0
    tokens_this_month: int = 0
    concurrent: int = 0
    spend_this_month: int = 0  # nano-units: the key's settled spend plus its reservations
    tenant_spend_this_month: int = 0  # nano-units: the same over every key of its tenant


@dataclass
class Admission:
    """An admitted request: its id (the query's id), its reservation and its rate-limit headers."""

    id: uuid.UUID
    key_id: int
    reserved_tokens: int
    month: str
    at: datetime
    headers: dict = field(default_factory=dict)
    reserved_cost: Decimal = money.ZERO  # the worst-case cost reserved against the budgets


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
    """A reservation the month counters still carry: the admission's id, its day, its tokens, its
    worst-case cost (nano-units) and its tenant (whose shared spend counter carries the cost too)."""

    member: str
    day: str
    reserve: int
    unfinished: bool = False  # restored from a queued or running row: it holds a slot too
    created_ms: int = 0
    cost: int = 0
    tenant_id: int | None = None

    @property
    def value(self) -> str:
        return f"{self.day}|{self.reserve}|{self.cost}|{'' if self.tenant_id is None else self.tenant_id}"


def _parse_held(value) -> tuple[str, int, int, int | None]:
    """(day, tokens, cost, tenant) of a held value; one a previous release wrote ("day|tokens") holds no cost."""
    text = value.decode() if isinstance(value, bytes) else value
    parts = text.split("|")
    day, reserve = parts[0], int(parts[1])
    cost = int(parts[2]) if len(parts) > 2 and parts[2] else 0
    tenant = int(parts[3]) if len(parts) > 3 and parts[3] else None
    return day, reserve, cost, tenant


# --- the two backends ---------------------------------------------------------------------------
# A key's counters: rpm (sorted set of admissions, by time), day:<date> and month:<month> (counts),
# slots (sorted set of holders, by lease end), held (hash admission ->
# "<day>|<reserved tokens>|<reserved cost, nano-units>|<tenant id>"), spend:<month> (nano-units);
# and per tenant, tenant:<id>:spend:<month> (nano-units, shared by all its keys).
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
local cost, key_budget, tenant_budget = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local in_window = redis.call('ZCARD', KEYS[1])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
local today = tonumber(redis.call('GET', KEYS[2]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
local running = redis.call('ZCARD', KEYS[4])
local spend = tonumber(redis.call('GET', KEYS[7]) or '0')
local tenant_spend = tonumber(redis.call('GET', KEYS[8]) or '0')
local verdict = 'ok'
if rpm >= 0 and in_window >= rpm then verdict = 'requests_per_minute'
elseif rpd >= 0 and today >= rpd then verdict = 'requests_per_day'
elseif tpm >= 0 and tokens + reserve > tpm then verdict = 'tokens_per_month'
elseif key_budget >= 0 and spend + cost > key_budget then verdict = 'key_budget'
elseif tenant_budget >= 0 and tenant_spend + cost > tenant_budget then verdict = 'tenant_budget'
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
  if cost > 0 then
    spend = redis.call('INCRBY', KEYS[7], ARGV[14])
    redis.call('PEXPIRE', KEYS[7], month_ttl)
    tenant_spend = redis.call('INCRBY', KEYS[8], ARGV[14])
    redis.call('PEXPIRE', KEYS[8], month_ttl)
  end
  in_window = in_window + 1
  running = running + 1
  if not oldest then oldest = tostring(now) end
end
-- nano-units as whole-number strings: tostring() would write a large one as 1.2345678901234e+14
return {verdict, in_window, oldest or '', today, tokens, running, string.format('%.0f', spend),
        string.format('%.0f', tenant_spend)}
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
# sweeper's settling of an admission without a row) only if nobody vouched for it since. Money
# (ARGV[6], the real cost in nano-units) replaces the reserved cost in the key's and the tenant's
# spend counters: they then hold the real spend (a cost above its reservation, which only a price
# added in the instant of an admission could cause, is charged too).
_SETTLE_LUA = """
if ARGV[5] ~= '' and tonumber(redis.call('ZSCORE', KEYS[3], ARGV[2]) or '-1') ~= tonumber(ARGV[5]) then
  return -1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local parts = {}
for part in string.gmatch(held .. '|', '([^|]*)|') do parts[#parts + 1] = part end
local refund = tonumber(parts[2]) - tonumber(ARGV[3])
local month = ARGV[4] .. string.sub(held, 1, 7)
if refund > 0 and redis.call('EXISTS', month) == 1 then redis.call('DECRBY', month, refund) end
if parts[3] and parts[3] ~= '' then
  local back = string.format('%.0f', tonumber(parts[3]) - tonumber(ARGV[6]))
  if back ~= '0' and back ~= '-0' then
    local spend = ARGV[7] .. string.sub(held, 1, 7)
    if redis.call('EXISTS', spend) == 1 then redis.call('DECRBY', spend, back) end
    if parts[4] and parts[4] ~= '' then
      local tenant_spend = ARGV[8] .. parts[4] .. ':spend:' .. string.sub(held, 1, 7)
      if redis.call('EXISTS', tenant_spend) == 1 then redis.call('DECRBY', tenant_spend, back) end
    end
  end
end
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

# Counters rebuilt from PostgreSQL after Redis lost them. The reservations of the rows (ARGV[10..],
# member/value/slot-end triples) join those still held here (admissions since the loss); the day
# counts the rows plus admissions of today without a row; the month's tokens and spend (ARGV[9],
# nano-units) the rollups plus every reservation held.
_RESTORE_LUA = """
local db_day, db_tokens, today, month = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local day_ttl, month_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local now, pending_prefix, db_spend = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local from_rows = {}
for i = 10, #ARGV, 3 do
  from_rows[ARGV[i]] = true
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    -- re-added from a row: the sweeper checks it again later, in case that row settled meanwhile
    redis.call('ZADD', KEYS[5], 'NX', now, pending_prefix .. ARGV[i])
  end
  if ARGV[i + 2] ~= '0' then redis.call('ZADD', KEYS[4], 'NX', tonumber(ARGV[i + 2]), ARGV[i]) end
end
local extra_day, held_tokens, held_cost = 0, 0, 0
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local value = all[i + 1]
  local parts = {}
  for part in string.gmatch(value .. '|', '([^|]*)|') do parts[#parts + 1] = part end
  if string.sub(value, 1, 7) == month then
    held_tokens = held_tokens + tonumber(parts[2])
    if parts[3] and parts[3] ~= '' then held_cost = held_cost + tonumber(parts[3]) end
  end
  if not from_rows[all[i]] and string.sub(value, 1, 10) == today then extra_day = extra_day + 1 end
end
redis.call('SET', KEYS[1], db_day + extra_day, 'PX', day_ttl)
redis.call('SET', KEYS[2], db_tokens + held_tokens, 'PX', month_ttl)
redis.call('SET', KEYS[6], string.format('%.0f', db_spend + held_cost), 'PX', month_ttl)
return {db_day + extra_day, db_tokens + held_tokens, string.format('%.0f', db_spend + held_cost)}
"""

# A tenant's shared spend counter rebuilt (after every key's own restore): its rollups' spend of the
# month (ARGV[1], nano-units) plus the reserved cost of every reservation its keys' held hashes
# (KEYS[2..]) carry for this tenant and month.
_RESTORE_TENANT_LUA = """
local total, month, tenant = tonumber(ARGV[1]), ARGV[2], ARGV[4]
for k = 2, #KEYS do
  local all = redis.call('HGETALL', KEYS[k])
  for i = 2, #all, 2 do
    local value = all[i]
    local parts = {}
    for part in string.gmatch(value .. '|', '([^|]*)|') do parts[#parts + 1] = part end
    if string.sub(value, 1, 7) == month and parts[4] == tenant and parts[3] ~= '' then
      total = total + tonumber(parts[3])
    end
  end
end
redis.call('SET', KEYS[1], string.format('%.0f', total), 'PX', tonumber(ARGV[3]))
return string.format('%.0f', total)
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

    def _spend(self, key_id: int, tenant_id: int | None, at: datetime) -> list[str]:
        """The key's and its tenant's spend counters of ``at``'s month."""
        return [f"{self._prefix(key_id)}:spend:{_month(at)}", self._tenant_spend(tenant_id, _month(at))]

    def _tenant_spend(self, tenant_id: int | None, month: str) -> str:
        return redis_key("quota", "tenant", "none" if tenant_id is None else tenant_id, "spend", month)

    def _own(self, key_id: int) -> list[str]:
        """slots, held, pending: what the commit/settle/adopt scripts touch."""
        prefix = self._prefix(key_id)
        return [f"{prefix}:slots", f"{prefix}:held", redis_key("quota", "pending")]

    def _script(self, source: str):
        if source not in self._scripts:
            self._scripts[source] = self._redis().register_script(source)
        return self._scripts[source]

    def admit(
        self,
        key_id: int,
        limits: Limits,
        reserve: int,
        member: str,
        at: datetime,
        *,
        cost: int = 0,
        tenant_id: int | None = None,
    ) -> tuple[str, Snapshot]:
        """``cost``: the worst-case cost in nano-units, reserved against the key's and the tenant's budgets."""
        now_ms = int(at.timestamp() * 1000)

        def arg(value):
            return -1 if value is None else value

        def budget(value):
            return -1 if value is None else money.to_nano(value)

        slots, held, pending = self._own(key_id)
        verdict, in_window, oldest, today, tokens, running, spend, tenant_spend = self._script(_ADMIT_LUA)(
            keys=[*self._keys(key_id, at), held, pending, *self._spend(key_id, tenant_id, at)],
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
                Held(member, _day(at), reserve, cost=cost, tenant_id=tenant_id).value,
                f"{key_id}:{member}",
                slot_lease_ms(),
                cost,
                budget(limits.key_budget),
                budget(limits.tenant_budget),
            ],
        )
        snapshot = Snapshot(
            requests_last_minute=int(in_window),
            oldest_in_window_ms=int(float(oldest)) if oldest else None,
            requests_today=int(today),
            tokens_this_month=int(tokens),
            concurrent=int(running),
            spend_this_month=int(spend),
            tenant_spend_this_month=int(tenant_spend),
        )
        return verdict.decode() if isinstance(verdict, bytes) else verdict, snapshot

    def commit(self, key_id: int, member: str, at: datetime) -> bool:
        args = [member, f"{key_id}:{member}", int(at.timestamp() * 1000), slot_lease_ms()]
        return bool(self._script(_COMMIT_LUA)(keys=self._own(key_id), args=args))

    def settle(
        self, key_id: int, member: str, used: int, *, if_pending_since: int | None = None, cost: int = 0
    ) -> bool:
        """``used`` tokens and ``cost`` nano-units replace what the admission reserved, once."""
        args = [member, f"{key_id}:{member}", used, f"{self._prefix(key_id)}:month:"]
        args.append("" if if_pending_since is None else str(if_pending_since))
        args += [cost, f"{self._prefix(key_id)}:spend:", redis_key("quota", "tenant", "")]
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

    def restore(
        self,
        key_id: int,
        at: datetime,
        *,
        day_requests: int,
        month_tokens: int,
        held: list[Held],
        month_spend: int = 0,
    ) -> tuple:
        rpm, day, month, slots = self._keys(key_id, at)
        args = [day_requests, month_tokens, _day(at), _month(at), _day_ttl_ms(at), _month_ttl_ms(at)]
        args += [int(at.timestamp() * 1000), f"{key_id}:", month_spend]
        for item in held:
            slot_end = item.created_ms + slot_lease_ms() if item.unfinished else 0
            args += [item.member, item.value, slot_end]
        keys = [day, month, f"{self._prefix(key_id)}:held", slots, redis_key("quota", "pending")]
        keys.append(f"{self._prefix(key_id)}:spend:{_month(at)}")
        day_count, tokens, spend = self._script(_RESTORE_LUA)(keys=keys, args=args)
        return int(day_count), int(tokens), int(spend)

    def restore_tenant(self, tenant_id: int, at: datetime, *, month_spend: int, key_ids) -> int:
        """The tenant's shared spend counter: its rollups' spend plus what its keys hold (after their restore)."""
        keys = [self._tenant_spend(tenant_id, _month(at))] + [f"{self._prefix(k)}:held" for k in sorted(key_ids)]
        args = [month_spend, _month(at), _month_ttl_ms(at), str(tenant_id)]
        return int(self._script(_RESTORE_TENANT_LUA)(keys=keys, args=args))

    def snapshot(self, key_id: int, at: datetime, tenant_id: int | None = None) -> Snapshot:
        rpm, day, month, slots = self._keys(key_id, at)
        spend, tenant_spend = self._spend(key_id, tenant_id, at)
        now_ms = int(at.timestamp() * 1000)
        client = self._redis()
        with client.pipeline() as pipe:
            pipe.zcount(rpm, now_ms - WINDOW_MS, "+inf")
            pipe.zrangebyscore(rpm, now_ms - WINDOW_MS, "+inf", start=0, num=1, withscores=True)
            pipe.get(day)
            pipe.get(month)
            pipe.zcount(slots, now_ms, "+inf")
            pipe.get(spend)
            pipe.get(tenant_spend)
            in_window, oldest, today, tokens, running, spent, tenant_spent = pipe.execute()
        return Snapshot(
            requests_last_minute=in_window,
            oldest_in_window_ms=int(oldest[0][1]) if oldest else None,
            requests_today=int(today or 0),
            tokens_this_month=int(tokens or 0),
            concurrent=running,
            spend_this_month=int(spent or 0),
            tenant_spend_this_month=int(tenant_spent or 0) if tenant_id is not None else 0,
        )


class LocalQuotaBackend:
    """The embedded default: the same rules in process memory (one process serves everything)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._window: dict[int, deque] = defaultdict(deque)
        self._days: dict[tuple[int, str], int] = defaultdict(int)
        self._months: dict[tuple[int, str], int] = defaultdict(int)
        self._slots: dict[int, dict[str, int]] = defaultdict(dict)
        self._held: dict[int, dict[str, tuple[str, int, int, int | None]]] = defaultdict(dict)
        self._spend: dict[tuple[int, str], int] = defaultdict(int)  # (key, month) -> nano-units
        self._tenant_spend: dict[tuple[int | None, str], int] = defaultdict(int)  # (tenant, month) -> nano-units
        self._pending: dict[tuple[int, str], int] = {}
        self._restored = False

    def _prune(self, key_id: int, now_ms: int) -> None:
        window = self._window[key_id]
        while window and window[0] <= now_ms - WINDOW_MS:
            window.popleft()
        slots = self._slots[key_id]
        for member in [m for m, expires in slots.items() if expires <= now_ms]:
            del slots[member]  # its reservation stays held until settled

    def _snapshot(self, key_id: int, at: datetime, tenant_id: int | None = None) -> Snapshot:
        window = self._window[key_id]
        return Snapshot(
            requests_last_minute=len(window),
            oldest_in_window_ms=window[0] if window else None,
            requests_today=self._days[(key_id, _day(at))],
            tokens_this_month=self._months[(key_id, _month(at))],
            concurrent=len(self._slots[key_id]),
            spend_this_month=self._spend[(key_id, _month(at))],
            tenant_spend_this_month=self._tenant_spend[(tenant_id, _month(at))] if tenant_id is not None else 0,
        )

    def admit(
        self,
        key_id: int,
        limits: Limits,
        reserve: int,
        member: str,
        at: datetime,
        *,
        cost: int = 0,
        tenant_id: int | None = None,
    ) -> tuple[str, Snapshot]:
        now_ms = int(at.timestamp() * 1000)
        with self._lock:
            self._prune(key_id, now_ms)
            snap = self._snapshot(key_id, at, tenant_id)

            def nano(budget):
                return None if budget is None else money.to_nano(budget)

            checks = (
                ("requests_per_minute", limits.requests_per_minute, snap.requests_last_minute + 1),
                ("requests_per_day", limits.requests_per_day, snap.requests_today + 1),
                ("tokens_per_month", limits.tokens_per_month, snap.tokens_this_month + reserve),
                ("key_budget", nano(limits.key_budget), snap.spend_this_month + cost),
                ("tenant_budget", nano(limits.tenant_budget), snap.tenant_spend_this_month + cost),
                ("max_concurrent_requests", limits.max_concurrent_requests, snap.concurrent + 1),
            )
            for name, limit, wanted in checks:
                if limit is not None and wanted > limit:
                    return name, snap
            window = self._window[key_id]
            window.insert(bisect_right(window, now_ms), now_ms)
            self._days[(key_id, _day(at))] += 1
            self._months[(key_id, _month(at))] += reserve
            self._spend[(key_id, _month(at))] += cost
            self._tenant_spend[(tenant_id, _month(at))] += cost
            self._slots[key_id][member] = now_ms + admission_lease_ms()
            self._held[key_id][member] = (_day(at), reserve, cost, tenant_id)
            self._pending[(key_id, member)] = now_ms
            return "ok", self._snapshot(key_id, at, tenant_id)

    def commit(self, key_id: int, member: str, at: datetime) -> bool:
        now_ms = int(at.timestamp() * 1000)
        with self._lock:
            if member not in self._held[key_id]:
                return False
            self._slots[key_id][member] = now_ms + slot_lease_ms()
            if (key_id, member) in self._pending:
                self._pending[(key_id, member)] = now_ms
            return True

    def settle(
        self, key_id: int, member: str, used: int, *, if_pending_since: int | None = None, cost: int = 0
    ) -> bool:
        with self._lock:
            if if_pending_since is not None and self._pending.get((key_id, member)) != if_pending_since:
                return False
            self._slots[key_id].pop(member, None)
            self._pending.pop((key_id, member), None)
            held = self._held[key_id].pop(member, None)
            if held is None:  # settled already: a repeat changes nothing
                return False
            day, reserve, reserved_cost, tenant_id = held
            if reserve > used:
                self._months[(key_id, day[:7])] -= reserve - used
            self._spend[(key_id, day[:7])] -= reserved_cost - cost
            self._tenant_spend[(tenant_id, day[:7])] -= reserved_cost - cost
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

    def restore(
        self,
        key_id: int,
        at: datetime,
        *,
        day_requests: int,
        month_tokens: int,
        held: list[Held],
        month_spend: int = 0,
    ) -> tuple:
        with self._lock:
            mine = self._held[key_id]
            from_rows = set()
            for item in held:
                from_rows.add(item.member)
                if item.member not in mine:
                    mine[item.member] = (item.day, item.reserve, item.cost, item.tenant_id)
                    self._pending.setdefault((key_id, item.member), int(at.timestamp() * 1000))
                if item.unfinished:
                    self._slots[key_id].setdefault(item.member, item.created_ms + slot_lease_ms())
            this_month = [value for value in mine.values() if value[0][:7] == _month(at)]
            extra = sum(1 for m, value in mine.items() if m not in from_rows and value[0] == _day(at))
            tokens = sum(value[1] for value in this_month)
            spend = month_spend + sum(value[2] for value in this_month)
            self._days[(key_id, _day(at))] = day_requests + extra
            self._months[(key_id, _month(at))] = month_tokens + tokens
            self._spend[(key_id, _month(at))] = spend
            return day_requests + extra, month_tokens + tokens, spend

    def restore_tenant(self, tenant_id: int, at: datetime, *, month_spend: int, key_ids) -> int:
        with self._lock:
            total = month_spend
            for key_id in key_ids:
                total += sum(
                    cost
                    for day, _, cost, tenant in self._held[key_id].values()
                    if day[:7] == _month(at) and tenant == tenant_id
                )
            self._tenant_spend[(tenant_id, _month(at))] = total
            return total

    def snapshot(self, key_id: int, at: datetime, tenant_id: int | None = None) -> Snapshot:
        with self._lock:
            self._prune(key_id, int(at.timestamp() * 1000))
            return self._snapshot(key_id, at, tenant_id)


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
def bounds(prompt, max_tokens, images: int = 1) -> tuple[int, int]:
    """Upper bounds of a query's (prompt, completion) tokens: the prompt's bytes (no token is shorter
    than a byte; ``prompt`` is all of the conversation's text), each image's tokens and the chat
    template's; and max_tokens."""
    try:
        completion = int(max_tokens) if max_tokens not in (None, "") else settings.DEFAULT_MAX_TOKENS
    except (TypeError, ValueError):
        completion = settings.DEFAULT_MAX_TOKENS
    completion = min(max(completion, 1), settings.MAX_NEW_TOKENS)
    prompt_bytes = len(prompt.encode("utf-8")) if isinstance(prompt, str) else 0
    return prompt_bytes + images * settings.IMAGE_TOKEN_BOUND + settings.TEMPLATE_TOKEN_BOUND, completion


def reservation(prompt, max_tokens, images: int = 1) -> int:
    """An upper bound of a query's tokens (``bounds`` summed)."""
    return sum(bounds(prompt, max_tokens, images))


def cost_reservation(price: money.Price, prompt, max_tokens, images: int = 1) -> Decimal:
    """The worst-case cost reserved against the budgets: the prompt's bound at the input price,
    max_tokens at the output price, the images at the image price, rounded up to 10^-9."""
    prompt_bound, completion = bounds(prompt, max_tokens, images)
    return money.worst_case(price, prompt_tokens=prompt_bound, completion_tokens=completion, images=images)


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
    "key_budget": ("budget_exceeded", "monthly budget"),
    "tenant_budget": ("budget_exceeded", "monthly budget"),
    "max_concurrent_requests": ("rate_limited", "concurrent requests"),
}


def _amount(value: Decimal) -> str:
    """An amount for a message: its digits without trailing zeros, at least two decimals, and the currency."""
    text = format(value.normalize(), "f")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')} {settings.CURRENCY}"


def _budget_message(verdict: str, limits: Limits, snap: Snapshot, cost: int) -> str:
    whose, budget, spent = (
        ("This key's", limits.key_budget, snap.spend_this_month)
        if verdict == "key_budget"
        else ("This tenant's", limits.tenant_budget, snap.tenant_spend_this_month)
    )
    left = max(0, money.to_nano(budget) - spent)
    return (
        f"{whose} monthly budget of {_amount(budget)} cannot cover this request: it would reserve up to "
        f"{_amount(money.from_nano(cost))} (its worst case: max_tokens at the model's output price, the "
        f"prompt's bound at its input price, its images at the image price) and {_amount(money.from_nano(left))} "
        "is left this month. Lower max_tokens or raise the budget (or retry next month)."
    )


def _retry_after_ms(verdict: str, snap: Snapshot, at: datetime) -> int:
    now_ms = int(at.timestamp() * 1000)
    if verdict == "requests_per_minute" and snap.oldest_in_window_ms is not None:
        return snap.oldest_in_window_ms + WINDOW_MS - now_ms
    if verdict == "requests_per_day":
        return _ms_until_tomorrow(at)
    if verdict in ("tokens_per_month", "key_budget", "tenant_budget"):
        return _ms_until_next_month(at)
    return 1000  # a concurrent slot frees when a running query ends


def admit(
    api_key,
    *,
    prompt=None,
    max_tokens=None,
    images: int = 1,
    price: money.Price = money.FREE,
    at: datetime | None = None,
    model: str = "",
    endpoint: str = "",
) -> Admission:
    """Admit one request of ``api_key`` (``images`` images) or raise 429 (``rate_limited`` /
    ``quota_exceeded`` / ``budget_exceeded``). ``price``: its model's price at ``at`` (the
    admission's instant, which becomes the query's ``created_at``), for the budgets. ``model`` and
    ``endpoint`` only label a refusal in the usage rollups."""
    limits = Limits.of(api_key)
    at = at or datetime.now(UTC)
    admission_id = uuid7(at)  # the query's id too: time-ordered (config/ids.py), 74 random bits
    reserve = reservation(prompt, max_tokens, images)
    reserved_cost = cost_reservation(price, prompt, max_tokens, images)
    cost = money.to_nano(reserved_cost)
    try:
        verdict, snap = backend().admit(
            api_key.pk, limits, reserve, admission_id.hex, at, cost=cost, tenant_id=api_key.tenant_id
        )
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
        elif code == "budget_exceeded":
            message = _budget_message(verdict, limits, snap, cost)
        raise ApiError(code, message, headers={**rate_headers, "Retry-After": str(max(1, -(-retry_ms // 1000)))})
    return Admission(admission_id, api_key.pk, reserve, _month(at), at, rate_headers, reserved_cost)


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


def settle(key_id: int | None, admission_id, *, used: int, cost: Decimal | None = None) -> bool:
    """End an admission: free its concurrent slot and refund what it reserved beyond ``used``
    tokens and ``cost`` (its real cost; None or 0 when it ran nothing). Exactly once whoever calls
    it first (the query's ender, the sweeper, a refused input); True when this call made the refund."""
    if key_id is None:
        return False
    return backend().settle(key_id, uuid.UUID(str(admission_id)).hex, max(0, used), cost=money.to_nano(cost))


def unavailable() -> ApiError:
    return ApiError(
        "service_unavailable",
        "The quota service is unreachable for a moment; nothing was spent. Retry shortly.",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)},
    )


def now() -> datetime:
    return datetime.now(UTC)


def snapshot(api_key) -> tuple[Limits, Snapshot]:
    return Limits.of(api_key), backend().snapshot(api_key.pk, now(), api_key.tenant_id)
