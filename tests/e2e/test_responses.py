"""The Responses API with the openai SDK on a real worker, behind two gateway processes that
share one redis-server: a conversation continued on the other gateway, a stream, retrieve,
delete, and another account's 404s."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import API_KEY, MODEL, OTHER_KEY
from tests.e2e.test_shared_state import PREFIX, Pair, pair

pytestmark = pytest.mark.e2e
__all__ = ["pair"]  # the two gateways over Redis (a module fixture)
GREEDY = {"max_output_tokens": 16, "temperature": 0}


def client(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{url}/inference/v1", max_retries=0)


def test_a_conversation_across_gateways(pair: Pair) -> None:
    first, second = client(pair.urls[0]), client(pair.urls[1])
    one = first.responses.create(model=MODEL, input="What is the capital of France?",
                                 **GREEDY)
    assert one.model == MODEL and one.output_text and one.status in ("completed",
                                                                     "incomplete")
    assert one.usage is not None and one.usage.input_tokens > 0
    question = "And what is the capital of Germany?"
    two = second.responses.create(model=MODEL, input=question, previous_response_id=one.id,
                                  **GREEDY)
    alone = second.responses.create(model=MODEL, input=question, store=False,
                                    **GREEDY)
    assert two.usage is not None and alone.usage is not None
    # The second turn's prompt holds the first question and answer: more tokens than the
    # question alone by at least the first answer's.
    assert two.usage.input_tokens >= alone.usage.input_tokens + one.usage.output_tokens
    assert two.previous_response_id == one.id
    kept = first.responses.retrieve(two.id)
    assert kept.output_text == two.output_text and kept.id == two.id
    with pytest.raises(openai.NotFoundError):
        first.responses.retrieve(alone.id)  # store: false
    records = pair.records("fireworks")
    assert {r.record_id for r in records if r.endpoint == "/v1/responses"} >= \
        {one.id[-32:], two.id[-32:]}

    other = client(pair.urls[1], OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(one.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="hi", previous_response_id=one.id,
                               **GREEDY)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(one.id)
    second.responses.delete(one.id)
    with pytest.raises(openai.NotFoundError):
        first.responses.retrieve(one.id)
    keys = pair.redis.client().keys(f"{PREFIX}response:fireworks:*")
    assert f"{PREFIX}response:fireworks:{two.id}".encode() in keys


def test_a_streamed_response(pair: Pair) -> None:
    first, second = client(pair.urls[0]), client(pair.urls[1])
    deltas = []
    with first.responses.stream(model=MODEL, input="Say hello.",
                                **GREEDY) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert deltas and "".join(deltas) == final.output_text and final.model == MODEL
    assert second.responses.retrieve(final.id).output_text == final.output_text
    raw = first.responses.create(model=MODEL, input="Say hi.", stream=True,
                                 **GREEDY)
    kinds = [event.type for event in raw]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed",
                                                              "response.incomplete")
