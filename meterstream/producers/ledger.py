"""The shared reservation ledger of hard caps: every guard of every process, one count, on Redis.

Per customer and period the ledger holds (in micro-credits, integers):

- ``counted`` — the credits the worker has stored for the customer this period
  (it sets this after each batch is written, so it follows the money);
- reservations — one per call checked and not yet settled, keyed by the call's
  id, each with its own expiry (a caller that dies frees its credits after
  ``reservation_ttl``);
- settled calls — one per usage event a guard settled and the worker has not
  counted yet, keyed by ``event_id``; the worker removes them in the same
  atomic step that raises ``counted``, so a call is never counted twice nor
  dropped early, whatever its ``occurred_at`` says.

A call is reserved only if ``counted + reserved + settled + estimate <= cap``,
in one Lua script (atomic on the server), so P processes x T threads cannot
pass the cap by more than the sum over calls in flight of (actual - estimate),
plus usage recorded without a guard check. Amounts are rounded *up* to the
micro-credit, so the ledger never holds less than the Decimal amounts.

Redis keys share the hash tag ``{customer|period}``, so a cluster keeps a
customer's ledger in one slot; every key expires 40 days after its last write.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from meterstream.config import LedgerSettings

MICRO = Decimal("0.000001")
_KEY_TTL_SECONDS = 40 * 86_400


class LedgerUnavailable(RuntimeError):
    """The ledger did not answer (down, unreachable, too slow): the budget's ``if_ledger_down`` decides."""


def to_micro(credits: Decimal) -> int:
    """Credits as integer micro-credits, rounded up (the ledger never holds less than the amount)."""
    return int((credits / MICRO).to_integral_value(rounding=ROUND_CEILING))


def from_micro(micro: int) -> Decimal:
    return Decimal(micro) * MICRO


@dataclass(frozen=True)
class Reserved:
    ok: bool
    #: Credits left for further calls after this one (before it, when refused).
    available: Decimal


@dataclass(frozen=True)
class LedgerSnapshot:
    counted: Decimal
    reserved: Decimal
    settled: Decimal
    reservations: int
    settled_calls: int


# KEYS: counted, reservations, reservation expiries, settled, settled expiries, sums, counted ids
_PURGE = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local function purge(hash, zset, field)
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  for _, id in ipairs(expired) do
    local amount = redis.call('HGET', hash, id)
    if amount then
      redis.call('HDEL', hash, id)
      redis.call('HINCRBY', KEYS[6], field, -tonumber(amount))
    end
    redis.call('ZREM', zset, id)
  end
end
purge(KEYS[2], KEYS[3], 'reserved')
purge(KEYS[4], KEYS[5], 'settled')
local function touch()
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], %d) end
end
""" % _KEY_TTL_SECONDS  # noqa: UP031 (the Lua text has braces; %d is the one hole)

# ARGV: call id, amount, cap, ttl ms
_RESERVE = _PURGE + """
local counted = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = tonumber(redis.call('HGET', KEYS[6], 'reserved') or '0')
local settled = tonumber(redis.call('HGET', KEYS[6], 'settled') or '0')
local amount = tonumber(ARGV[2])
local available = tonumber(ARGV[3]) - counted - reserved - settled
if amount > available then
  return {0, available}
end
redis.call('HSET', KEYS[2], ARGV[1], amount)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HINCRBY', KEYS[6], 'reserved', amount)
touch()
return {1, available - amount}
"""

# ARGV: call id, event id, actual amount, ttl ms
_SETTLE = _PURGE + """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[6], 'reserved', -tonumber(held))
end
if ARGV[2] ~= '' and not redis.call('ZSCORE', KEYS[7], ARGV[2]) and redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 then
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('HINCRBY', KEYS[6], 'settled', tonumber(ARGV[3]))
end
touch()
return 1
"""

# ARGV: counted total, counted-ids memory ms, event ids...
_COUNT = _PURGE + """
redis.call('SET', KEYS[1], ARGV[1])
for i = 3, #ARGV do
  local id = ARGV[i]
  local amount = redis.call('HGET', KEYS[4], id)
  if amount then
    redis.call('HDEL', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('HINCRBY', KEYS[6], 'settled', -tonumber(amount))
  end
  redis.call('ZADD', KEYS[7], now, id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - tonumber(ARGV[2]))
touch()
return 1
"""


class RedisLedger:
    """The reservation ledger on a Redis server (redis-py; one connection pool, thread-safe)."""

    def __init__(
        self,
        url: str,
        *,
        reservation_ttl: float = 60.0,
        settled_ttl: float = 3600.0,
        timeout: float = 0.5,
        counted_ids_memory: float = 600.0,
        client: object | None = None,
    ) -> None:
        import redis

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.client = client or redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self.reservation_ttl = reservation_ttl
        self.settled_ttl = settled_ttl
        #: How long the worker's counted ids are remembered, for a settle that arrives after them.
        self.counted_ids_memory = counted_ids_memory
        self._reserve = self.client.register_script(_RESERVE)  # type: ignore[attr-defined]
        self._settle = self.client.register_script(_SETTLE)  # type: ignore[attr-defined]
        self._count = self.client.register_script(_COUNT)  # type: ignore[attr-defined]

    @classmethod
    def from_settings(cls, settings: LedgerSettings) -> RedisLedger | None:
        """The configured ledger, or None when ``METERSTREAM_LEDGER__REDIS_URL`` is unset."""
        if settings.redis_url is None:
            return None
        return cls(
            settings.redis_url.get_secret_value(),
            reservation_ttl=settings.reservation_ttl_seconds,
            settled_ttl=settings.settled_ttl_seconds,
            timeout=settings.timeout_seconds,
        )

    @staticmethod
    def keys(customer_id: str, period: str) -> list[str]:
        tag = "{" + f"{customer_id}|{period}" + "}"
        return [f"meterstream:ledger:{tag}:{name}" for name in
                ("counted", "reserved", "reserved-expiry", "settled", "settled-expiry", "sums", "counted-ids")]  # fmt: skip

    def _call(self, script: object, keys: list[str], args: list[object]) -> object:
        try:
            return script(keys=keys, args=args)  # type: ignore[operator]
        except self._errors as exc:
            raise LedgerUnavailable(f"reservation ledger unreachable: {exc}") from exc

    def reserve(
        self, customer_id: str, period: str, credits: Decimal, cap: Decimal, *, ttl: float | None = None
    ) -> tuple[str, Reserved]:
        """Hold ``credits`` for a new call if the cap allows it; returns the call's id and the outcome."""
        call_id = uuid.uuid4().hex
        ms = int((ttl if ttl is not None else self.reservation_ttl) * 1000)
        ok, available = cast(
            "tuple[int, int]",
            self._call(self._reserve, self.keys(customer_id, period), [call_id, to_micro(credits), to_micro(cap), ms]),
        )
        return call_id, Reserved(bool(ok), from_micro(int(available)))

    def settle(self, customer_id: str, period: str, call_id: str, event_id: str, credits: Decimal) -> None:
        """The call happened: its reservation becomes the event's actual credits until the worker counts it."""
        args = [call_id, event_id, to_micro(credits), int(self.settled_ttl * 1000)]
        self._call(self._settle, self.keys(customer_id, period), args)

    def release(self, customer_id: str, period: str, call_id: str) -> None:
        """The call did not happen: free its reservation."""
        self._call(self._settle, self.keys(customer_id, period), [call_id, "", 0, 0])

    def count(self, customer_id: str, period: str, counted: Decimal, event_ids: Iterable[str]) -> None:
        """The worker stored ``counted`` credits for the period, including ``event_ids``: settle them."""
        args: list[object] = [to_micro(counted), int(self.counted_ids_memory * 1000), *event_ids]
        self._call(self._count, self.keys(customer_id, period), args)

    def snapshot(self, customer_id: str, period: str) -> LedgerSnapshot:
        keys = self.keys(customer_id, period)
        try:
            pipe = self.client.pipeline(transaction=True)  # type: ignore[attr-defined]
            pipe.get(keys[0]).hgetall(keys[5]).hlen(keys[1]).hlen(keys[3])
            counted, sums, reservations, settled_calls = pipe.execute()
        except self._errors as exc:
            raise LedgerUnavailable(f"reservation ledger unreachable: {exc}") from exc
        return LedgerSnapshot(
            counted=from_micro(int(counted or 0)),
            reserved=from_micro(int(sums.get(b"reserved", 0))),
            settled=from_micro(int(sums.get(b"settled", 0))),
            reservations=int(reservations),
            settled_calls=int(settled_calls),
        )

    def close(self) -> None:
        self.client.close()  # type: ignore[attr-defined]
