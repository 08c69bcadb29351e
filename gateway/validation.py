"""Request bodies: parsed as JSON, validated by the API's request model, and validation
errors worded as Fireworks words them (`Extra inputs are not permitted, field:
'messages[1].reasoning'`), for every API."""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from gateway.config import Settings
from gateway.errors import GatewayError

RequestModel = TypeVar("RequestModel", bound=BaseModel)


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
    if field is None and isinstance(cause, FieldError):
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
