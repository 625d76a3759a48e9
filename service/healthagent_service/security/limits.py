"""Per-user limits: a token-bucket request rate and a cap on concurrent Chat streams.

In memory by default; in Redis when configured, so several replicas share one limit. Refusals
are RESOURCE_EXHAUSTED with the time until a request would be admitted in `RetryInfo`. When
Redis cannot be reached, requests are refused UNAVAILABLE (`LIMITS_UNAVAILABLE`, with
`RetryInfo`): the limits fail closed, and health says NOT_SERVING meanwhile.

In Redis a stream slot is a lease, not a count: each stream adds its own token to the user's
sorted set, scored with the moment its lease ends, which this process renews while the stream
lasts. A stream gives its token back however it ends, and a take whose outcome is unknown (the
caller left, or Redis failed, while it was under way) is given back too; what a crashed
process held, or a give-back that failed, ends with its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import RedisError

from healthagent_service.errors import ErrorKind, HealthAgentError
from healthagent_service.ids import UniqueIds

log = structlog.get_logger(__name__)

_MAX_TRACKED_USERS = 100_000
DEFAULT_STREAM_LEASE_SECONDS = 60.0
# A Redis that does not answer in this long is down, as far as a request is concerned.
_REDIS_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """Per user: `rate_per_minute` sustained with bursts of `burst`; `max_streams` at once.
    0 turns a limit off."""

    rate_per_minute: float
    burst: int
    max_streams: int


def rate_limited(retry_after: float) -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "USER_RATE_LIMITED",
        "too many requests for this user; slow down",
        retry_after_seconds=retry_after,
    )


def too_many_streams(limit: int) -> HealthAgentError:
    return HealthAgentError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "USER_STREAM_LIMIT",
        f"this user already has {limit} Chat streams open",
        retry_after_seconds=1.0,
    )


def limits_unavailable(exc: BaseException) -> HealthAgentError:
    """The limits cannot be checked (Redis unreachable): refused, to be retried."""
    return HealthAgentError(
        ErrorKind.UNAVAILABLE,
        "LIMITS_UNAVAILABLE",
        f"the per-user limits cannot be checked ({type(exc).__name__}); retry shortly",
        retry_after_seconds=1.0,
    )


class Limiter(ABC):
    """Admits or refuses a user's requests and streams."""

    def __init__(self, config: LimitConfig) -> None:
        self.config = config

    @property
    def limits_rate(self) -> bool:
        """False when the request rate is not limited: `admit` would admit every request."""
        return self.config.rate_per_minute > 0

    @abstractmethod
    async def admit(self, user: str) -> None:
        """Take one request from the user's bucket, or raise RESOURCE_EXHAUSTED."""

    @abstractmethod
    async def _acquire_stream(self, user: str) -> Any:
        """Take a stream slot: a handle to give it back with, or None when the user has none
        left."""

    @abstractmethod
    def _release_stream(self, user: str, slot: Any) -> None:
        """Give a stream slot back. Never waits and never raises: the stream's outcome must
        not depend on it."""

    @contextlib.asynccontextmanager
    async def stream(self, user: str) -> AsyncIterator[None]:
        """Hold one of the user's concurrent stream slots for the duration."""
        if self.config.max_streams <= 0:
            yield
            return
        slot = await self._acquire_stream(user)
        if slot is None:
            raise too_many_streams(self.config.max_streams)
        try:
            yield
        finally:
            self._release_stream(user, slot)

    async def ping(self) -> None:  # noqa: B027 - most limiters depend on nothing
        """Raise when the limits cannot be checked now."""

    async def close(self) -> None:  # noqa: B027 - most limiters hold nothing to release
        """Release connections."""


class MemoryLimiter(Limiter):
    """Limits for one process."""

    def __init__(self, config: LimitConfig, clock: Any = time.monotonic) -> None:
        super().__init__(config)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._streams: dict[str, int] = {}

    async def admit(self, user: str) -> None:
        rate = self.config.rate_per_minute / 60.0
        if rate <= 0:
            return
        now = self._clock()
        tokens, at = self._buckets.pop(user, (float(self.config.burst), now))
        tokens = min(float(self.config.burst), tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[user] = (tokens, now)
            raise rate_limited((1.0 - tokens) / rate)
        self._buckets[user] = (tokens - 1.0, now)
        while len(self._buckets) > _MAX_TRACKED_USERS:
            self._buckets.popitem(last=False)

    async def _acquire_stream(self, user: str) -> Any:
        count = self._streams.get(user, 0)
        if count >= self.config.max_streams:
            return None
        self._streams[user] = count + 1
        return True

    def _release_stream(self, user: str, slot: Any) -> None:
        count = self._streams.get(user, 1) - 1
        if count <= 0:
            self._streams.pop(user, None)
        else:
            self._streams[user] = count


# KEYS[1] bucket; ARGV: rate per second, burst, now (seconds). Returns {admitted, wait ms}.
_TOKEN_BUCKET = """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local admitted = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  admitted = 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {admitted, wait}
"""
# KEYS[1] the user's slots (token -> when its lease ends, in ms of Redis's clock); ARGV: limit,
# lease in ms, token. Returns 1 if the slot was taken. Ended leases are dropped first, and the
# key lives exactly as long as its longest lease.
_TAKE_SLOT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
# KEYS[1] the user's slots; ARGV: lease in ms, then the tokens to renew (only those still
# there: a slot given back, or whose lease ended, is not brought back).
_RENEW_SLOTS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 1
"""


class RedisLimiter(Limiter):
    """Limits shared by every replica using the same Redis."""

    def __init__(
        self,
        config: LimitConfig,
        url: str,
        prefix: str = "healthagent",
        *,
        stream_lease_seconds: float = DEFAULT_STREAM_LEASE_SECONDS,
    ) -> None:
        import redis.asyncio as redis

        super().__init__(config)
        self._redis = redis.from_url(
            url,
            socket_timeout=_REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
        )
        self._prefix = prefix
        self._bucket = self._redis.register_script(_TOKEN_BUCKET)
        self._take = self._redis.register_script(_TAKE_SLOT)
        self._renew = self._redis.register_script(_RENEW_SLOTS)
        self._lease_ms = max(1000, int(stream_lease_seconds * 1000))
        self._tokens = UniqueIds("slot_", counter_digits=8)
        self._held: dict[str, set[str]] = {}  # key -> tokens of streams open here
        # tokens to give back again on the next renewal, until their lease would have ended: a
        # give-back that failed, or one that may have overtaken its own take
        self._stale: dict[tuple[str, str], float] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def _key(self, kind: str, user: str) -> str:
        return f"{self._prefix}:{kind}:{user}"

    async def admit(self, user: str) -> None:
        rate = self.config.rate_per_minute / 60.0
        if rate <= 0:
            return
        try:
            admitted, wait_ms = await self._bucket(
                keys=[self._key("rate", user)], args=[rate, self.config.burst, time.time()]
            )
        except _REDIS_FAILURES as exc:
            raise limits_unavailable(exc) from None
        if not int(admitted):
            raise rate_limited(max(0.001, int(wait_ms) / 1000))

    async def _acquire_stream(self, user: str) -> Any:
        # a sorted set of leases: not the `streams` key, a counter in earlier versions
        key = self._key("stream-slots", user)
        token = self._tokens()
        try:
            taken = await self._take(
                keys=[key], args=[self.config.max_streams, self._lease_ms, token]
            )
        except BaseException as exc:
            # The take may have reached Redis (cancelled or timed out after it was sent):
            # give its token back, now and once more later.
            self._give_back(key, token, again_later=True)
            if isinstance(exc, _REDIS_FAILURES):
                raise limits_unavailable(exc) from None
            raise
        if not int(taken):
            return None
        self._held.setdefault(key, set()).add(token)
        self._ensure_renewer()
        return (key, token)

    def _ensure_renewer(self) -> None:
        if not self._closed and (self._renewer is None or self._renewer.done()):
            self._renewer = asyncio.create_task(self._renew_forever())

    def _release_stream(self, user: str, slot: Any) -> None:
        key, token = slot
        tokens = self._held.get(key)
        if tokens is not None:
            tokens.discard(token)
            if not tokens:
                del self._held[key]
        self._give_back(key, token, again_later=False)

    def _give_back(self, key: str, token: str, *, again_later: bool) -> None:
        if again_later:
            self._mark_stale(key, token)
        task = asyncio.ensure_future(self._remove(key, token))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remove(self, key: str, token: str) -> None:
        try:
            await self._redis.zrem(key, token)
        except _REDIS_FAILURES as exc:
            # tried again at the next renewal; its lease ends meanwhile in any case
            self._mark_stale(key, token)
            log.warning("could not give a stream slot back", error=type(exc).__name__)

    def _mark_stale(self, key: str, token: str) -> None:
        self._stale[(key, token)] = time.monotonic() + self._lease_ms / 1000
        self._ensure_renewer()

    async def _renew_forever(self) -> None:
        """Renew the leases of the streams open here, a third of a lease apart, and give back
        what is due; stops when this process holds nothing."""
        while self._held or self._stale:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self.renew_now()
            except _REDIS_FAILURES as exc:
                log.warning("could not renew stream slots", error=type(exc).__name__)

    async def renew_now(self) -> None:
        """One renewal: every held lease extended, every stale token given back."""
        now = time.monotonic()
        stale = {slot: until for slot, until in self._stale.items() if until > now}
        self._stale = {}
        held = {key: list(tokens) for key, tokens in self._held.items()}
        if not held and not stale:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, tokens in held.items():
                    await self._renew(keys=[key], args=[self._lease_ms, *tokens], client=pipe)
                for key, token in stale:
                    pipe.zrem(key, token)
                await pipe.execute()
        except BaseException:
            self._stale.update(stale)  # not given back: next time
            raise

    async def ping(self) -> None:
        """Raise when Redis cannot be reached."""
        await self._redis.ping()

    async def close(self) -> None:
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
        until = time.monotonic() + self._lease_ms / 1000
        for key, tokens in self._held.items():  # streams that outlived shutdown
            self._stale.update(((key, token), until) for token in tokens)
        self._held.clear()
        if self._background:
            await asyncio.wait(list(self._background), timeout=_REDIS_TIMEOUT_SECONDS)
        with contextlib.suppress(*_REDIS_FAILURES):
            await asyncio.wait_for(self.renew_now(), _REDIS_TIMEOUT_SECONDS)
        await self._redis.aclose()


_REDIS_FAILURES = (RedisError, OSError, TimeoutError)
