"""Whom a failed attempt blames: the replica, or the request itself (pure).

Many accounts share one deployment, so a request that fails on every replica (a prompt
that crashes the engine, an answer the gateway cannot read) must not eject them one after
the other. The rule:

- a replica that cannot be reached (refused, reset, timed out) has failed: blamed at once;
- a replica whose answer failed (a 5xx, a malformed answer) is a suspect: it may have been
  given a request that fails anywhere. It is blamed once another replica answered the
  same request well, or could not be asked (the request ends with the suspect standing);
- a second bad answer on another replica clears the suspect: the request caused both, and
  neither replica is blamed;
- a refusal that judges the request (a 4xx from the worker) clears the suspect too.

`tests/unit/dataplane/test_blame.py` holds the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gateway.errors import GatewayError, WorkerFault


class Failure(Enum):
    UNREACHABLE = "unreachable"  # the replica could not be asked
    BAD_ANSWER = "bad answer"  # it answered, with a 5xx or something that is not an answer
    REFUSED = "refused"  # it judged the request (the client's fault)

    @classmethod
    def of(cls, exc: GatewayError) -> Failure:
        if not exc.replica_fault:
            return cls.REFUSED
        return cls.BAD_ANSWER if isinstance(exc, WorkerFault) else cls.UNREACHABLE


@dataclass(frozen=True)
class Verdict:
    blame_now: str | None  # the replica to count a failure against now
    retry: bool  # the request may go to another replica
    request_caused: bool  # two replicas failed alike: the request's doing


@dataclass
class Blame:
    """One request's attempts, judged one after another."""

    suspect: str | None = None

    def failed(self, replica: str, failure: Failure) -> Verdict:
        if failure is Failure.UNREACHABLE:
            return Verdict(replica, retry=True, request_caused=False)
        if failure is Failure.REFUSED:
            self.suspect = None  # another replica judged the request itself
            return Verdict(None, retry=False, request_caused=False)
        if self.suspect is None:
            self.suspect = replica
            return Verdict(None, retry=True, request_caused=False)
        self.suspect = None
        return Verdict(None, retry=False, request_caused=True)

    def settle(self) -> str | None:
        """At the end of the attempts, however they ended: the suspect still standing."""
        suspect, self.suspect = self.suspect, None
        return suspect
