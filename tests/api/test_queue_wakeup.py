"""Which wake-ups end a waiting claim's wait (app/api/queue_wakeup.py): any for a claim of every
tenant; for a claim limited to one tenant, only those naming it or naming none (a payload that
is not a tenant id, as anyone's NOTIFY may send). The wait ends at its time otherwise."""

from __future__ import annotations

import asyncio

from app.api.queue_wakeup import HISTORY, QueueWakeup


async def waits_through(wakeup: QueueWakeup, scope: int | None, *payloads: object) -> bool:
    """Whether a claim limited to `scope` is still waiting after the payloads arrived."""
    seen = wakeup.generation
    waiting = asyncio.create_task(wakeup.wait(seen, 5, scope))
    await asyncio.sleep(0)
    for payload in payloads:
        wakeup.notified(payload)
    await asyncio.sleep(0.05)
    still = not waiting.done()
    waiting.cancel()
    return still


def test_a_wake_up_ends_the_waits_it_concerns() -> None:
    async def run() -> None:
        wakeup = QueueWakeup()
        assert not await waits_through(wakeup, None, "7")  # every tenant: any wake-up
        assert await waits_through(wakeup, 5, "7", "12")  # another tenant's files: waits on
        assert not await waits_through(wakeup, 5, "7", "5")
        assert not await waits_through(wakeup, 5, "")  # a wake-up naming no tenant
        assert not await waits_through(wakeup, 5, "spoofed")
        assert not await waits_through(wakeup, 5, "\u00b2")  # a digit to str.isdigit, no int
        assert not await waits_through(wakeup, 5, None)  # the listener reconnected: may have missed some
        assert await waits_through(wakeup, 5)  # nothing came

    asyncio.run(run())


def test_a_wait_ends_at_its_time_and_at_once_for_wake_ups_it_missed() -> None:
    async def run() -> None:
        wakeup = QueueWakeup()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await wakeup.wait(wakeup.generation, 0.2, 5)
        assert loop.time() - started >= 0.2
        seen = wakeup.generation
        wakeup.notified("5")  # between the claim and its wait
        await asyncio.wait_for(wakeup.wait(seen, 5, 5), 1)
        seen = wakeup.generation
        for _ in range(HISTORY + 1):  # more than remembered: it cannot tell, so it looks
            wakeup.notified("7")
        await asyncio.wait_for(wakeup.wait(seen, 5, 5), 1)

    asyncio.run(run())
