"""Stopping background tasks that may be inside a Redis call."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel until the task ends.

    redis-py 8 swallows a cancellation that lands in its connect handshake (the maintenance-notifications
    probe): a single ``cancel()`` then leaves a retry loop running forever and hangs whoever awaits it.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    with contextlib.suppress(asyncio.CancelledError):
        await task
