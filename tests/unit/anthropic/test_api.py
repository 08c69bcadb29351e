"""The Messages API object, as tables: every request field's effect on the worker request and
the Call (or the 400 naming it), the estimate and the affinity material, the error shapes,
the usage read from answers and events, and the framing of a stream event by event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from gateway.anthropic.api import CountTokensApi, MessageFraming, MessagesApi, MessagesCall
from gateway.anthropic.protocol import CountTokensRequest, MessagesRequest, usage_of
from gateway.api import Served, Worker, coerce_usage
from gateway.config import Settings
from gateway.controlplane.registry import Deployment, Lora, Route
from gateway.errors import GatewayError, WorkerFault
from gateway.validation import known_fields, parse_body

API = MessagesApi()
DEPLOYMENT = Deployment(id="d", account="acct", model="accounts/acct/models/m")
BASE = {"model": "accounts/acct/models/m", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Capital of France?"}]}


@dataclass
class Row:
    value: Any
    body: dict[str, Any] = field(default_factory=dict)  # expected in the worker request
    call: dict[str, Any] = field(default_factory=dict)  # expected Call attributes
    refused: bool = False  # a 400 naming the field


ROWS: dict[str, list[Row]] = {
    "model": [Row("accounts/acct/models/m", body={"model": "accounts/acct/models/m"}),
              Row(7, refused=True)],
    "max_tokens": [Row(300, body={"max_tokens": 300}, call={"max_tokens": 300}),
                   Row(0, refused=True), Row(1 << 31, refused=True), Row(2.5, refused=True)],
    "messages": [Row([{"role": "user", "content": "hi"}],
                     body={"messages": [{"role": "user", "content": "hi"}]}),
                 Row([], refused=True), Row("hi", refused=True)],
    "stream": [Row(True, body={"stream": True}, call={"stream": True}),
               Row(False, body={"stream": False}, call={"stream": False}),
               Row("yes", refused=True)],
}
# Anthropic's other fields that vLLM takes go to the worker as they are (vLLM judges them).
PASSED_ON = {"system": "Be brief.", "temperature": 0.2, "stop_sequences": ["\n"],
             "tools": [{"name": "f", "input_schema": {"type": "object"}}],
             "metadata": {"user_id": "u"}, "thinking": {"type": "disabled"},
             "tool_choice": {"type": "auto"}, "top_k": 5, "top_p": 0.5,
             "output_config": {"effort": "low"}}
ROWS |= {name: [Row(value, body={name: value})] for name, value in PASSED_ON.items()}
# Read by the gateway for the affinity key; not sent to the worker.
ROWS |= {name: [Row("k", call={"affinity": "k"})] for name in ("prompt_cache_key", "user")}


def translate(fields: dict[str, Any], lora: Lora | None = None) -> MessagesCall:
    request = parse_body(orjson.dumps(BASE | fields), MessagesRequest, Settings())
    return API.translate(request, Route(DEPLOYMENT, "accounts/acct/models/asked", lora),
                         Settings(), account="acct", nonce="n")


def test_every_field_has_a_row() -> None:
    assert known_fields(MessagesRequest) == set(ROWS)


CASES = [(name, i) for name, rows in ROWS.items() for i in range(len(rows))]


@pytest.mark.parametrize("name,index", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_each_field_takes_effect_or_is_refused(name: str, index: int) -> None:
    row = ROWS[name][index]
    if row.refused:
        with pytest.raises(GatewayError) as refused:
            translate({name: row.value})
        assert refused.value.status == 400
        assert (refused.value.param or "").split(".")[0].split("[")[0] == name
        return
    call = translate({name: row.value})
    for key, value in row.body.items():
        assert call.body[key] == value, key
    for key, value in row.call.items():
        assert getattr(call, key) == value, key


@pytest.mark.parametrize("name,value", PASSED_ON.items())
def test_other_fields_reach_the_worker_as_sent(name: str, value: Any) -> None:
    assert translate({name: value}).body[name] == value


def test_answers_carry_the_model_asked_and_adapters_keep_their_name() -> None:
    call = translate({})
    assert call.model == "accounts/acct/models/asked" and not call.adapter
    lora = Lora(id="ad", account="acct", deployment="d", source="/x")
    assert translate({}, lora).adapter


class NamedWorker:
    """A worker that only says the name it serves."""

    url = "http://w:1"

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("Messages asks no tokens")

    async def detokenize(self, ids: list[int]) -> str:
        raise AssertionError("Messages asks no tokens")

    async def token_texts(self, model: str, ids: Any) -> dict[int, str]:
        raise AssertionError("Messages asks no tokens")

    async def served_model(self) -> str:
        return "served-name"


async def test_each_attempt_names_the_model_its_worker_serves() -> None:
    worker: Worker = NamedWorker()
    call = translate({})
    sent = orjson.loads(await call.prepare(worker, orjson.dumps(call.body)))
    assert sent["model"] == "served-name" and sent["messages"] == BASE["messages"]
    lora = Lora(id="ad", account="acct", deployment="d", source="/x")
    adapter = translate({}, lora)
    assert await adapter.prepare(worker, b"as encoded") == b"as encoded"


@pytest.mark.parametrize("messages,expected", [
    ([{"role": "user", "content": "x" * 400}], (len('[{"role":"user","content":""}]') + 400)
     // 4 + 4),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     len(orjson.dumps([{"role": "user", "content": "a"},
                       {"role": "assistant", "content": "b"}])) // 4 + 8),
])
def test_prompt_estimates(messages: list[dict[str, Any]], expected: int) -> None:
    assert translate({"messages": messages}).prompt_estimate() == expected


def test_prefix_material_is_the_system_the_tools_and_the_first_turn() -> None:
    first = translate({"system": "S"})
    later = translate({"system": "S", "messages": [
        *BASE["messages"], {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And Spain?"}]})
    other = translate({"system": "T"})
    assert first.prefix_material(4096) == later.prefix_material(4096)
    assert first.prefix_material(4096) != other.prefix_material(4096)
    assert len(first.prefix_material(10) or b"") == 10


@pytest.mark.parametrize("extra,key", [
    ({}, None), ({"prompt_cache_key": "k"}, "k"), ({"user": "u"}, "u"),
    ({"user": {"not": "a string"}}, None),
])
def test_a_client_key_in_the_body(extra: dict[str, Any], key: str | None) -> None:
    assert translate(extra).affinity == key


@pytest.mark.parametrize("status,kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (408, "timeout_error"), (413, "request_too_large"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
    (503, "overloaded_error"), (504, "timeout_error"),
])
def test_errors_in_anthropic_shape(status: int, kind: str) -> None:
    assert API.error_body(GatewayError(status, "m"), "r1") == {
        "type": "error", "error": {"type": kind, "message": "m"}}


@pytest.mark.parametrize("payload,usage", [
    ({"usage": {"input_tokens": 9, "output_tokens": 2}},
     {"prompt_tokens": 9, "completion_tokens": 2}),
    ({"message": {"usage": {"input_tokens": 9, "output_tokens": 0}}},
     {"prompt_tokens": 9, "completion_tokens": 0}),
    ({"usage": {"output_tokens": 5}}, {"completion_tokens": 5}),
    ({"usage": {"input_tokens": -1, "output_tokens": True}}, None),
    ({"usage": "many"}, None), ({}, None),
])
def test_usage_read_from_answers_and_events(payload: dict[str, Any],
                                            usage: dict[str, int] | None) -> None:
    assert usage_of(payload) == usage


def served() -> Served:
    return Served(deployment="d", backend_host="w:1", concurrent=1, started=0.0)


def event(name: str, data: dict[str, Any]) -> tuple[str, bytes]:
    return name, orjson.dumps(data)


START = event("message_start", {"type": "message_start", "message": {
    "model": "served-name", "usage": {"input_tokens": 9, "output_tokens": 0}}})
DELTA = event("content_block_delta", {"type": "content_block_delta",
                                      "delta": {"type": "text_delta", "text": "Paris"}})
END = event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2}})
STOP = event("message_stop", {"type": "message_stop"})


async def test_a_stream_framed_event_by_event() -> None:
    record = served()
    framing = MessageFraming("accounts/acct/models/asked", record)
    out = await framing.take([START])
    assert framing.ready and not framing.done and record.first_token_at is None
    assert b'"model":"accounts/acct/models/asked"' in out[0]
    assert out[0].startswith(b"event: message_start\ndata: ")
    await framing.take([DELTA])
    assert record.first_token_at is not None
    await framing.take([END])
    assert not framing.done
    stop = await framing.take([STOP, DELTA])  # nothing after the last event
    assert stop == [b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
    assert framing.done
    assert coerce_usage(record.usage) == {"prompt_tokens": 9, "completion_tokens": 2,
                                          "total_tokens": 0,
                                          "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("bad", [("error", b'{"type":"error"}'),
                                 ("message_start", b"not json"), ("message_delta", b"[1]")])
async def test_bad_events_are_worker_faults(bad: tuple[str, bytes]) -> None:
    with pytest.raises(WorkerFault):
        await MessageFraming("m", served()).take([bad])


def test_the_error_event_after_the_first_byte() -> None:
    framing = MessageFraming("m", served())
    sent = framing.error_event(GatewayError(502, "The worker failed"), "r1")
    name, _, data = sent.partition(b"\ndata: ")
    assert name == b"event: error" and sent.endswith(b"\n\n")
    assert orjson.loads(data) == {"type": "error", "error": {
        "type": "api_error", "message": "The worker failed (request r1)"}}
    assert framing.drain() == []


@pytest.mark.parametrize("answer,ok", [
    ({"type": "message", "content": [], "usage": {"input_tokens": 1, "output_tokens": 1}},
     True),
    ({"type": "error", "content": []}, False), ({"type": "message"}, False), ([], False),
])
async def test_plain_answers_checked(answer: Any, ok: bool) -> None:
    call, record = translate({}), served()
    if not ok:
        with pytest.raises(WorkerFault):
            await call.reply(orjson.dumps(answer), NamedWorker(), record)
        return
    reply = await call.reply(orjson.dumps(answer), NamedWorker(), record)
    assert orjson.loads(reply.body)["model"] == "accounts/acct/models/asked"
    assert record.usage == {"prompt_tokens": 1, "completion_tokens": 1}


COUNT = CountTokensApi()


@pytest.mark.parametrize("fields,refused", [
    ({}, None), ({"messages": []}, "messages"), ({"model": 3}, "model"),
    ({"system": "S", "tools": []}, None),
])
def test_count_tokens_requests(fields: dict[str, Any], refused: str | None) -> None:
    body = {"model": "accounts/acct/models/m", "messages": BASE["messages"]} | fields
    if refused:
        with pytest.raises(GatewayError) as error:
            parse_body(orjson.dumps(body), CountTokensRequest, Settings())
        assert error.value.status == 400 and error.value.param == refused
        return
    request = parse_body(orjson.dumps(body), CountTokensRequest, Settings())
    call = COUNT.translate(request, Route(DEPLOYMENT, "accounts/acct/models/asked"),
                           Settings(), account="acct", nonce="n")
    assert call.body == body and not call.stream and call.max_tokens == 0
    assert call.prompt_estimate() == 0  # a count reserves no tokens


@pytest.mark.parametrize("answer,count", [
    ({"input_tokens": 12, "context_management": {"original_input_tokens": 12}}, 12),
    ({"input_tokens": -1}, None), ({"input_tokens": True}, None), ({}, None), ([], None),
])
async def test_count_tokens_replies(answer: Any, count: int | None) -> None:
    request = CountTokensRequest.model_validate({"model": "m", "messages": BASE["messages"]})
    call = COUNT.translate(request, Route(DEPLOYMENT, "m"), Settings(), account="a", nonce="n")
    record = served()
    if count is None:
        with pytest.raises(WorkerFault):
            await call.reply(orjson.dumps(answer), NamedWorker(), record)
        return
    reply = await call.reply(orjson.dumps(answer), NamedWorker(), record)
    assert orjson.loads(reply.body) == {"input_tokens": count}
    assert record.usage is None  # counting is recorded with no tokens


@pytest.mark.parametrize("name", ["prompt_cache_key", "user"])
def test_what_the_gateway_reads_goes_no_further(name: str) -> None:
    assert name not in translate({name: "k"}).body


@pytest.mark.parametrize("name,value", [
    ("cache_salt", "another-accounts-salt"), ("priority", -100),
    ("kv_transfer_params", {"do_remote_decode": True}), ("request_id", "x"),
    ("mm_payload", "none"), ("service_tier", "priority"),
])
def test_engine_and_unknown_fields_are_refused_by_name(name: str, value: Any) -> None:
    count = {k: v for k, v in BASE.items() if k != "max_tokens"}
    for model, base in ((MessagesRequest, BASE), (CountTokensRequest, count)):
        with pytest.raises(GatewayError) as refused:
            parse_body(orjson.dumps(base | {name: value}), model, Settings())
        assert refused.value.status == 400 and refused.value.param == name
