"""SessionPool: reuse, refresh at 80% of life, single flight, LRU bound, failures."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime

import pytest

from healthagent_service.domain.events import MintedSession, SessionOptions
from healthagent_service.domain.session_pool import SessionPool
from healthagent_service.errors import ErrorKind, HealthAgentError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingMinter:
    """Mints numbered sessions with a fixed lifetime, optionally slowly or failing."""

    def __init__(self, clock: FakeClock, lifetime: float = 600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls: list[SessionOptions] = []
        self.delay = 0.0
        self.fail_with: Exception | None = None
        self._ids = itertools.count(1)

    async def __call__(self, options: SessionOptions) -> MintedSession:
        self.calls.append(options)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        n = next(self._ids)
        return MintedSession(
            id=f"cksess_{n}",
            client_secret=f"secret-{n}",
            expires_at=datetime.now(UTC),
            workflow_id=options.workflow_id,
            user=options.user,
            minted_at_monotonic=self.clock(),
            lifetime_seconds=self.lifetime,
        )


def options(user: str = "u1") -> SessionOptions:
    return SessionOptions(user=user, workflow_id="wf")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def minter(clock: FakeClock) -> CountingMinter:
    return CountingMinter(clock)


async def test_reuses_until_80_percent_of_lifetime(
    clock: FakeClock, minter: CountingMinter
) -> None:
    pool = SessionPool(minter, max_size=10, refresh_fraction=0.8, clock=clock)
    first = await pool.get(options())
    clock.now += 479.0  # 79.8% of 600 s
    assert (await pool.get(options())).id == first.id
    clock.now += 2.0  # 80.2%
    refreshed = await pool.get(options())
    assert refreshed.id != first.id
    assert len(minter.calls) == 2
    assert pool.stats.hits == 1 and pool.stats.refreshes == 1


async def test_pooled_answers_only_a_fresh_hit_and_never_mints(
    clock: FakeClock, minter: CountingMinter
) -> None:
    pool = SessionPool(minter, max_size=2, refresh_fraction=0.8, clock=clock)
    assert pool.pooled(options("a")) is None  # nothing pooled: no mint either
    a = await pool.get(options("a"))
    await pool.get(options("b"))
    assert pool.pooled(options("a")) is a  # a hit, and a is now the most recent
    assert pool.stats.hits == 1 and pool.stats.misses == 2
    await pool.get(options("c"))  # evicts b, not a
    assert pool.pooled(options("b")) is None and pool.pooled(options("a")) is a
    clock.now += 481.0  # 80.2% of 600 s: due for a refresh
    assert pool.pooled(options("a")) is None
    assert len(minter.calls) == 3 and pool.stats.hits == 2 and pool.stats.refreshes == 0
    assert (await pool.get(options("a"))).id != a.id  # get() refreshes it
    assert pool.stats.refreshes == 1


async def test_concurrent_requests_mint_once(clock: FakeClock, minter: CountingMinter) -> None:
    minter.delay = 0.05
    pool = SessionPool(minter, max_size=10, clock=clock)
    sessions = await asyncio.gather(*(pool.get(options()) for _ in range(50)))
    assert {s.id for s in sessions} == {"cksess_1"}
    assert len(minter.calls) == 1


async def test_waiter_cancellation_does_not_cancel_shared_mint(
    clock: FakeClock, minter: CountingMinter
) -> None:
    minter.delay = 0.05
    pool = SessionPool(minter, max_size=10, clock=clock)
    impatient = asyncio.create_task(pool.get(options()))
    patient = asyncio.create_task(pool.get(options()))
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert (await patient).id == "cksess_1"
    assert impatient.cancelled()
    assert len(minter.calls) == 1


async def test_failure_reaches_every_waiter_and_is_not_cached(
    clock: FakeClock, minter: CountingMinter
) -> None:
    minter.delay = 0.02
    minter.fail_with = HealthAgentError(ErrorKind.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", "down")
    pool = SessionPool(minter, max_size=10, clock=clock)
    results = await asyncio.gather(*(pool.get(options()) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, HealthAgentError) for r in results)
    assert len(minter.calls) == 1
    minter.fail_with = None
    assert (await pool.get(options())).id == "cksess_1"
    assert len(minter.calls) == 2


async def test_bounded_with_least_recently_used_eviction(
    clock: FakeClock, minter: CountingMinter
) -> None:
    pool = SessionPool(minter, max_size=2, clock=clock)
    a = await pool.get(options("a"))
    await pool.get(options("b"))
    assert (await pool.get(options("a"))).id == a.id  # a is now the most recent
    await pool.get(options("c"))  # evicts b
    assert len(pool) == 2 and pool.stats.evictions == 1
    assert (await pool.get(options("a"))).id == a.id
    assert (await pool.get(options("b"))).id not in {a.id, "cksess_2"}


async def test_evict_only_the_named_session(clock: FakeClock, minter: CountingMinter) -> None:
    pool = SessionPool(minter, max_size=10, clock=clock)
    first = await pool.get(options())
    assert not pool.evict(options(), "cksess_other")
    assert pool.evict(options(), first.id)
    assert (await pool.get(options())).id != first.id


def test_minted_session_repr_hides_the_secret(clock: FakeClock) -> None:
    session = MintedSession(
        id="cksess_1",
        client_secret="very-secret",
        expires_at=datetime.now(UTC),
        workflow_id="wf",
        user="u",
        minted_at_monotonic=0,
        lifetime_seconds=1,
    )
    assert "very-secret" not in repr(session) and "very-secret" not in str(session)


async def test_a_session_minted_across_a_logout_is_never_handed_out(
    clock: FakeClock, minter: CountingMinter
) -> None:
    minter.delay = 0.05
    pool = SessionPool(minter, max_size=10, clock=clock)
    waiting = asyncio.create_task(pool.get(options()))
    await asyncio.sleep(0.01)
    clock.now += 1
    pool.evict_user("u1")  # logout while the first mint is in flight
    clock.now += 1
    session = await waiting
    assert session.id == "cksess_2" and len(minter.calls) == 2
    assert (await pool.get(options())).id == "cksess_2"  # and the dead one was not pooled
