"""What the gateway's own protocol (gateway/server/protocol.py) relies on in uvicorn, named
one by one: a uvicorn release that renames or drops any of it fails here, by name, before
anything fails in a way that is hard to read. pyproject.toml pins uvicorn to the range this
has passed on; widen the pin only with this test green."""

from __future__ import annotations

import inspect

import pytest
from uvicorn.protocols.http import flow_control, httptools_impl

from gateway.server.protocol import ConnectionClient

# The protocol's attributes and methods EdgeProtocol reads, calls or overrides.
PROTOCOL = ("app", "loop", "transport", "flow", "cycle", "parser", "url", "headers",
            "connections", "tasks", "server_state", "expect_100_continue",
            "limit_concurrency", "on_response_complete")
OVERRIDDEN = ("connection_made", "connection_lost", "data_received", "on_headers_complete",
              "on_message_complete")
# What uvicorn's protocol reads of its request cycle, which ConnectionClient stands in for.
CYCLE = ("body", "more_body", "message_event", "disconnected", "keep_alive",
         "response_started", "response_complete")


def protocol_source() -> str:
    return inspect.getsource(httptools_impl.HttpToolsProtocol)


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_the_methods_edge_protocol_overrides_exist(name: str) -> None:
    assert callable(getattr(httptools_impl.HttpToolsProtocol, name, None)), name


@pytest.mark.parametrize("name", PROTOCOL)
def test_the_protocol_attributes_edge_protocol_uses_exist(name: str) -> None:
    source = protocol_source()
    assert f"self.{name}" in source or hasattr(httptools_impl.HttpToolsProtocol, name), name


@pytest.mark.parametrize("name", CYCLE)
def test_the_cycle_attributes_the_protocol_reads_exist(name: str) -> None:
    cycle = inspect.getsource(httptools_impl.RequestResponseCycle)
    assert f"self.{name}" in cycle, name  # uvicorn's own cycle still has it ...
    client = inspect.getsource(ConnectionClient)
    assert f"self.{name}" in client, name  # ... and so does the stand-in


def test_flow_control_pauses_resumes_and_drains() -> None:
    for name in ("resume_reading", "drain", "pause_reading"):
        assert callable(getattr(flow_control.FlowControl, name, None)), name
    assert "self.write_paused" in inspect.getsource(flow_control.FlowControl)


def test_the_protocol_is_built_as_edge_protocol_builds_it() -> None:
    parameters = inspect.signature(httptools_impl.HttpToolsProtocol.__init__).parameters
    assert list(parameters)[1:4] == ["config", "server_state", "app_state"]
