"""The gateway's error bodies, status by status, as the official clients read them: the
`openai` and `fireworks-ai` SDKs and LiteLLM's `fireworks_ai/` provider, unchanged, each
raise the exception class its users catch. A loopback server answers with exactly what the
gateway sends for that status (its envelope, `errors.error_envelope`); the statuses the
gateway produces itself are also checked through the gateway (tests/e2e/test_clients.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import fireworks
import litellm
import openai
import orjson
import pytest

from gateway.errors import GatewayError
from gateway.fireworks.generation import check_context

MODEL = "accounts/fireworks/models/m"
# status -> (openai, fireworks-ai, LiteLLM) exception classes
TABLE: dict[int, tuple[type[Exception], type[Exception], type[Exception]]] = {
    400: (openai.BadRequestError, fireworks.BadRequestError, litellm.BadRequestError),
    401: (openai.AuthenticationError, fireworks.AuthenticationError,
          litellm.AuthenticationError),
    403: (openai.PermissionDeniedError, fireworks.PermissionDeniedError, litellm.APIError),
    404: (openai.NotFoundError, fireworks.NotFoundError, litellm.NotFoundError),
    408: (openai.APIStatusError, fireworks.APIStatusError, litellm.Timeout),
    413: (openai.APIStatusError, fireworks.APIStatusError, litellm.BadRequestError),
    422: (openai.UnprocessableEntityError, fireworks.UnprocessableEntityError,
          litellm.BadRequestError),
    429: (openai.RateLimitError, fireworks.RateLimitError, litellm.RateLimitError),
    500: (openai.InternalServerError, fireworks.InternalServerError,
          litellm.InternalServerError),
    502: (openai.InternalServerError, fireworks.InternalServerError, litellm.BadGatewayError),
    503: (openai.InternalServerError, fireworks.InternalServerError,
          litellm.ServiceUnavailableError),
    504: (openai.InternalServerError, fireworks.InternalServerError, litellm.Timeout),
}


class LongPromptWorker:
    """A worker whose tokenizer counts 3,000 tokens in a 2,048-token context."""

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"count": 3000, "max_model_len": 2048, "tokens": []}


def context_message() -> str:
    """What the gateway says when the prompt and max_tokens do not fit."""
    with pytest.raises(GatewayError) as refused:
        asyncio.run(check_context(LongPromptWorker(), {"prompt": "x"},  # type: ignore[arg-type]
                                  10, "max_tokens"))
    assert refused.value.status == 400
    return refused.value.message


class ErrorServer:
    """Answers every request with the gateway's error body for `status`."""

    def __init__(self) -> None:
        self.status, self.message = 400, "boom"
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            server = self.loop.run_until_complete(
                asyncio.start_server(self.handle, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()
        threading.Thread(target=run, daemon=True).start()
        started.wait()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        error = GatewayError(self.status, self.message,
                             param="model" if self.status == 404 else None)
        body = orjson.dumps(error.envelope("req-1"))
        writer.write(b"HTTP/1.1 %d Error\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (self.status, len(body), body))
        await writer.drain()
        writer.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ErrorServer]:
    yield ErrorServer()


def raised(call: Any) -> type[Exception]:
    try:
        call()
    except Exception as exc:  # the class is what is asserted
        return type(exc)
    raise AssertionError("no exception")


def clients(server: ErrorServer) -> tuple[Any, Any, Any]:
    base = f"http://127.0.0.1:{server.port}"
    ask = [{"role": "user", "content": "hi"}]
    return (
        lambda: openai.OpenAI(base_url=f"{base}/inference/v1", api_key="k", max_retries=0)
        .chat.completions.create(model=MODEL, messages=ask),  # type: ignore[arg-type]
        lambda: fireworks.Fireworks(base_url=base, api_key="k", max_retries=0)
        .chat.completions.create(model=MODEL, messages=ask),  # type: ignore[arg-type]
        lambda: litellm.completion(model=f"fireworks_ai/{MODEL}", messages=ask,
                                   api_base=f"{base}/inference/v1", api_key="k",
                                   num_retries=0, max_retries=0),
    )


@pytest.mark.parametrize("status", sorted(TABLE))
def test_each_client_raises_the_class_its_users_catch(server: ErrorServer,
                                                      status: int) -> None:
    server.status, server.message = status, "what went wrong"
    for call, expected in zip(clients(server), TABLE[status], strict=True):
        assert issubclass(raised(call), expected), (status, raised(call), expected)


def test_a_404_is_not_a_bad_request_anywhere(server: ErrorServer) -> None:
    server.status, server.message = 404, f"Model not found: {MODEL}"
    body = GatewayError(404, "x").envelope()
    assert body["error"]["type"] == "error" and body["error"]["code"] == "NOT_FOUND"
    for call in clients(server):
        assert not issubclass(raised(call), (openai.BadRequestError, litellm.BadRequestError))


def test_a_context_overflow_is_a_context_window_error_for_litellm(
        server: ErrorServer) -> None:
    server.status, server.message = 400, context_message()
    openai_call, fireworks_call, litellm_call = clients(server)
    assert raised(litellm_call) is litellm.ContextWindowExceededError
    assert issubclass(raised(openai_call), openai.BadRequestError)
    assert issubclass(raised(fireworks_call), fireworks.BadRequestError)
