"""One try of a request on one replica: its lease, what its worker reported, its answer,
and, for a stream that could go on elsewhere, its way off the replica."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.api import Served
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
    moved: bool = False  # the gateway cut it to move its stream

    def movable(self, replicas: ReplicaSet, can_move: Callable[[], bool]) -> None:
        """Its stream is moved off its replica (ReplicaSet.move_streams: the replica was
        ejected, or drained past its time) when `can_move` says it could go on elsewhere;
        the connection is cut, which the relay reads as the worker's failure."""
        answer = self.answer
        assert answer is not None

        def move() -> None:
            if can_move():
                self.moved = True  # (not the replica's failure: nobody is charged)
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
