"""One try of a request on one replica: its lease, what its worker reported, its answer,
and, for a stream that could go on elsewhere, its way off the replica."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.api import Served, StreamFraming
from gateway.dataplane.queries import ReplicaWorker
from gateway.dataplane.replicas import Lease, ReplicaSet
from gateway.dataplane.workers import WorkerAnswer


@dataclass
class Attempt:
    """One try on one replica."""

    lease: Lease
    served: Served
    worker: ReplicaWorker
    answer: WorkerAnswer | None = None
    # Its stream's way off its replica, and the replica's set it is registered in.
    move: Callable[[], None] | None = None
    moves: set[Callable[[], None]] | None = None

    def movable(self, replicas: ReplicaSet, framing: StreamFraming) -> None:
        """Its stream may be moved off its replica (ReplicaSet.move_streams) while it could
        go on elsewhere."""
        answer = self.answer
        assert answer is not None

        def move() -> None:
            if framing.continuable():
                answer.cut()

        self.move, self.moves = move, replicas.streams[self.lease.replica.url]
        self.moves.add(move)

    def close(self) -> None:
        """Abort the worker request if it is still open, and give the replica back."""
        try:
            if self.moves is not None and self.move is not None:
                self.moves.discard(self.move)
            if self.answer is not None:
                self.answer.close()
        finally:
            self.lease.release()
