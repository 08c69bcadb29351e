"""A worker's slots, as vLLM's past --max-num-seqs: at most `size` requests run at once, the
rest wait in arrival order (the scripted workers of bench/tenancy.py and bench/batch.py)."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    def __init__(self, size: int) -> None:
        self.size = size
        self.running = 0
        self.waiting = 0
        self.queue: deque[asyncio.Future[None]] = deque()  # arrival order

    async def take(self) -> None:
        if self.running < self.size and not self.queue:
            self.running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.queue.append(turn)
        self.waiting += 1
        try:
            await turn  # the slot is handed over by the request that ends
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give()  # handed over just as the client left: pass it on
            else:
                self.queue.remove(turn)
            raise
        finally:
            self.waiting -= 1

    def give(self) -> None:
        while self.queue:
            turn = self.queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1

    def metrics(self) -> str:
        """As vLLM's /metrics reports them."""
        return (f"vllm:num_requests_running {self.running}\n"
                f"vllm:num_requests_waiting {self.waiting}\n")
