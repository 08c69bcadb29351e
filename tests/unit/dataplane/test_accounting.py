"""How a request ended, recorded once (dataplane/accounting.py): what a request that never
reached admission leaves in the metrics, by how it ended."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.dataplane.accounting import Tally, record_end
from gateway.tracing import NO_TRACE
from tests.unit.harness import build

ERRORS = 'fwgw_errors_total{code="%d",deployment=""}'


@pytest.mark.parametrize("status,http_status,refused,counted", [
    ("error", 401, True, True),  # refused with a reply: counted
    ("error", 500, False, False),  # the server cancelled its task: nothing was answered
    ("aborted", 499, False, False),  # the client left while sending its body
])
def test_a_request_ended_before_admission(tmp_path: Path, status: str, http_status: int,
                                          refused: bool, counted: bool) -> None:
    gateway = build(tmp_path).gateway
    record_end(gateway, Tally("/v1/completions", "r1", NO_TRACE), status, http_status,
               refused=refused)
    metrics = gateway.metrics.render().decode()
    assert (f"{ERRORS % http_status} 1.0" in metrics) is counted
    assert 'fwgw_requests_in_flight{deployment=""} -1.0' not in metrics
    assert not gateway.ledger.kept  # no usage record before admission
