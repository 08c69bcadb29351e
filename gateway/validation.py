"""Request bodies: parsed as JSON, validated by the API's request model, and validation
errors worded as Fireworks words them (`Extra inputs are not permitted, field:
'messages[1].reasoning'`), for every API."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import orjson
from pydantic import BaseModel, Field, ValidationError

from gateway.config import Settings
from gateway.errors import GatewayError

RequestModel = TypeVar("RequestModel", bound=BaseModel)

# Request metadata, kept with every usage record and stored response: bounded as OpenAI
# bounds it (and Fireworks, whose API follows it): 16 pairs, keys of at most 64 characters,
# values of at most 512.
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
Metadata = Annotated[dict[Annotated[str, Field(max_length=METADATA_KEY)],
                          Annotated[str, Field(max_length=METADATA_VALUE)]],
                     Field(max_length=METADATA_PAIRS)]


def check_metadata(metadata: Any) -> None:
    """The same bound on the shared path, for whatever metadata an API's Call carries
    (a 400 naming `metadata`)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY
            and len(v) <= METADATA_VALUE for k, v in metadata.items()):
        raise GatewayError(400, f"metadata holds at most {METADATA_PAIRS} string values, "
                                f"keys of at most {METADATA_KEY} characters and values of at "
                                f"most {METADATA_VALUE}", param="metadata")


class FieldError(ValueError):
    """A cross-field problem, naming the field to report in the error's `param`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def known_fields(model: type[BaseModel]) -> set[str]:
    """The top-level field names (by alias) a request model accepts."""
    return {info.alias or name for name, info in model.model_fields.items()}


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """Fireworks' wording: `Extra inputs are not permitted, field: 'messages[1].reasoning'`."""
    first = error.errors(include_url=False)[0]
    # Union members add their type names to the location; keep only real field names.
    loc = tuple(p for p in first["loc"]
                if isinstance(p, int) or (not any(c in str(p) for c in "[]-")
                and str(p) not in {"str", "int", "float", "bool", "list", "dict"}))
    field = _location(loc) or None
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # it names the field more precisely than the location
        field = cause.field
    message = first["msg"].removeprefix("Value error, ")
    return (f"{message}, field: '{field}'" if field else message), field


def parse_body(raw: bytes, model: type[RequestModel], settings: Settings) -> RequestModel:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise GatewayError(400, "Request body must be a JSON object")
    if not settings.strict_validation and model.model_config.get("extra") == "forbid":
        allowed = known_fields(model)
        payload = {key: value for key, value in payload.items() if key in allowed}
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        message, field = validation_message(exc)
        raise GatewayError(400, message, param=field) from exc
