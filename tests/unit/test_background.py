"""The background loops' one way to run and to stop (gateway/background.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.background import cancel, every

logger = logging.getLogger("test")


async def test_a_loop_stops_even_when_its_step_swallows_the_cancellation() -> None:
    """A step that turns its cancellation into an error of its own (as redis-py may for a
    read it was reading) must not keep the loop, and whoever cancels it, waiting."""
    started = asyncio.Event()

    async def swallowing() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ConnectionError("the read was cancelled") from None

    task = every(60, swallowing, "swallowing", logger)
    await started.wait()
    stopping = asyncio.create_task(cancel(task))
    done, _ = await asyncio.wait({stopping}, timeout=2)
    assert done == {stopping} and task.cancelled()


async def test_a_failing_step_is_run_again(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def failing() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("once more")

    task = every(0.01, failing, "failing", logger)
    await asyncio.sleep(0.1)
    await cancel(task)
    assert runs >= 3 and "failing failed; trying again" in caplog.text
