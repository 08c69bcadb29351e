"""The gateway's background loops (health checks, discovery, adapters, registry poll, usage
ledger, slot refresh): how a periodic one runs, and the one way they all stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


def every(seconds: float, step: Callable[[], Awaitable[None]], name: str,
          logger: logging.Logger, *, first_after: float = 0.0) -> asyncio.Task[None]:
    """Run `step` every `seconds` (the first time after `first_after`) until cancelled. The
    loop outlives anything one round meets: an exception is logged, and the next round
    runs."""
    async def run() -> None:
        await asyncio.sleep(first_after)
        while True:
            try:
                await step()
            except Exception:
                logger.exception("%s failed; trying again", name)
            stop_if_cancelled()
            await asyncio.sleep(seconds)
    return asyncio.create_task(run(), name=name)


def stop_if_cancelled() -> None:
    """A loop's task cancelled inside a step that swallowed it (redis-py may turn a
    cancelled read into its own connection error, or return): stop all the same."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a loop started with asyncio.create_task and wait until it has stopped."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
