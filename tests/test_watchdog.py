"""The coarse deadline watchdog: fires once, late by at most its resolution, never early, and
never for a wait that is not armed or was forgotten."""

from __future__ import annotations

import asyncio

from healthagent_service.watchdog import NOT_ARMED, Deadline, Watchdog


async def test_deadlines_fire_once_in_their_window_and_only_when_armed() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(resolution=0.05)
    fired: dict[str, float] = {}

    def deadline(name: str) -> Deadline:
        def on_expiry() -> None:
            fired.setdefault(name, loop.time())

        made = Deadline(on_expiry)
        watchdog.watch(made)
        return made

    armed, unarmed, disarmed, forgotten = (deadline(n) for n in ("a", "u", "d", "f"))
    start = loop.time()
    armed.at = start + 0.2
    disarmed.at = start + 0.1
    forgotten.at = start + 0.1
    watchdog.forget(forgotten)
    await asyncio.sleep(0.05)
    disarmed.at = NOT_ARMED  # the wait ended in time
    await asyncio.sleep(0.4)
    assert set(fired) == {"a"}
    assert armed.expired and not unarmed.expired
    assert 0.2 <= fired["a"] - start <= 0.2 + 0.05 + 0.1  # resolution, plus a busy machine
    watchdog.forget(unarmed)
    watchdog.forget(disarmed)
    await asyncio.sleep(0.1)
    assert watchdog._timer is None  # nothing watched: no timer left running
