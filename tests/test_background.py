"""Stopping a background task that swallows a cancellation, as redis-py 8 does inside its connect."""

from __future__ import annotations

import asyncio

from serve_app.background import cancel_and_wait


async def test_a_task_that_swallows_the_first_cancel_still_stops() -> None:
    swallowed = 0

    async def retry_loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # the first one is lost, like a cancel inside redis-py's handshake

    task = asyncio.create_task(retry_loop())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(cancel_and_wait(task), 2)
    assert task.cancelled() and swallowed == 1


async def test_nothing_to_stop_is_fine() -> None:
    await cancel_and_wait(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait(done)
