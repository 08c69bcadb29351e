"""Whom a failed attempt blames (dataplane/blame.py), as a table: each row is a request's
attempts in order, and what each one's failure decides, then the suspect still standing at
the end."""

from __future__ import annotations

import pytest

from gateway.dataplane.blame import Blame, Failure, Verdict
from gateway.errors import GatewayError, WorkerFault

U, B, R = Failure.UNREACHABLE, Failure.BAD_ANSWER, Failure.REFUSED
NOTHING = Verdict(None, retry=True, request_caused=False)


@pytest.mark.parametrize("attempts,verdicts,standing", [
    # a replica that cannot be reached is blamed at once, and the request goes elsewhere
    ([("a", U)], [Verdict("a", retry=True, request_caused=False)], None),
    # a bad answer is a suspect: blamed once another replica answered well (the request
    # ends with it standing) ...
    ([("a", B)], [NOTHING], "a"),
    # ... or could not be asked
    ([("a", B), ("b", U)], [NOTHING, Verdict("b", retry=True, request_caused=False)], "a"),
    # two bad answers: the request caused both, neither replica is blamed, no more retries
    ([("a", B), ("b", B)], [NOTHING, Verdict(None, retry=False, request_caused=True)], None),
    # another replica judged the request itself (a 4xx): the suspect is cleared
    ([("a", B), ("b", R)], [NOTHING, Verdict(None, retry=False, request_caused=False)], None),
    # a refusal on the first replica: nobody blamed, no retry
    ([("a", R)], [Verdict(None, retry=False, request_caused=False)], None),
    # unreachable, then a bad answer: the first blamed at once, the second a suspect
    ([("a", U), ("b", B)], [Verdict("a", retry=True, request_caused=False), NOTHING], "b"),
])
def test_whom_a_failure_blames(attempts: list[tuple[str, Failure]], verdicts: list[Verdict],
                               standing: str | None) -> None:
    blame = Blame()
    assert [blame.failed(replica, failure) for replica, failure in attempts] == verdicts
    assert blame.settle() == standing
    assert blame.settle() is None  # settled once


@pytest.mark.parametrize("exc,failure", [
    (GatewayError(503, "No worker reachable", replica_fault=True), U),
    (WorkerFault("not JSON"), B),
    (GatewayError(400, "bad request"), R),
])
def test_which_failure_an_error_is(exc: GatewayError, failure: Failure) -> None:
    assert Failure.of(exc) is failure
