"""Per-user limits: a token-bucket request rate and a cap on concurrent Chat streams.

In memory by default; in Redis when configured, so several replicas share one limit. Refusals
are RESOURCE_EXHAUSTED with the time until a request would be admitted in `RetryInfo`.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from healthagent_service.errors import ErrorKind, HealthAgentError

_MAX_TRACKED_USERS = 100_000
# Redis keys expire so abandoned users (and slots of a crashed replica) do not live forever.
_STREAM_SLOT_TTL_SECONDS = 3600


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
    async def _acquire_stream(self, user: str) -> bool:
        """Take a stream slot; False when the user has none left."""

    @abstractmethod
    async def _release_stream(self, user: str) -> None:
        """Give a stream slot back."""

    @contextlib.asynccontextmanager
    async def stream(self, user: str) -> AsyncIterator[None]:
        """Hold one of the user's concurrent stream slots for the duration."""
        if self.config.max_streams <= 0:
            yield
            return
        if not await self._acquire_stream(user):
            raise too_many_streams(self.config.max_streams)
        try:
            yield
        finally:
            await self._release_stream(user)

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

    async def _acquire_stream(self, user: str) -> bool:
        count = self._streams.get(user, 0)
        if count >= self.config.max_streams:
            return False
        self._streams[user] = count + 1
        return True

    async def _release_stream(self, user: str) -> None:
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
# KEYS[1] counter; ARGV: limit, ttl. Returns 1 if a slot was taken. The TTL is refreshed only
# when a slot is taken, so slots a crashed replica held do expire even if the user keeps trying.
_TAKE_SLOT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then
  return 0
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
# KEYS[1] counter. Never below zero, and never a key without a TTL.
_GIVE_SLOT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count <= 1 then
  redis.call('DEL', KEYS[1])
else
  redis.call('DECR', KEYS[1])
end
return 1
"""


class RedisLimiter(Limiter):
    """Limits shared by every replica using the same Redis."""

    def __init__(self, config: LimitConfig, url: str, prefix: str = "healthagent") -> None:
        import redis.asyncio as redis

        super().__init__(config)
        self._redis = redis.from_url(url)
        self._prefix = prefix
        self._bucket = self._redis.register_script(_TOKEN_BUCKET)
        self._take = self._redis.register_script(_TAKE_SLOT)
        self._give = self._redis.register_script(_GIVE_SLOT)

    def _key(self, kind: str, user: str) -> str:
        return f"{self._prefix}:{kind}:{user}"

    async def admit(self, user: str) -> None:
        rate = self.config.rate_per_minute / 60.0
        if rate <= 0:
            return
        admitted, wait_ms = await self._bucket(
            keys=[self._key("rate", user)], args=[rate, self.config.burst, time.time()]
        )
        if not int(admitted):
            raise rate_limited(max(0.001, int(wait_ms) / 1000))

    async def _acquire_stream(self, user: str) -> bool:
        taken = await self._take(
            keys=[self._key("streams", user)],
            args=[self.config.max_streams, _STREAM_SLOT_TTL_SECONDS],
        )
        return bool(int(taken))

    async def _release_stream(self, user: str) -> None:
        await self._give(keys=[self._key("streams", user)])

    async def ping(self) -> None:
        """Fail early (at start-up) when Redis is not there."""
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
