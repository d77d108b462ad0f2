"""JSON on the wire: request bodies into models, models into responses, query values."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from rexecd.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)

MSG_INVALID_BODY = "invalid request body"
MSG_INVALID_JSON = "invalid JSON body"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def respond(model: BaseModel, status: int = 200) -> web.Response:
    # by_alias: ContainerOut's "async" key is a Python keyword, held as async_.
    return web.Response(
        status=status,
        text=model.model_dump_json(by_alias=True),
        content_type="application/json",
    )


def respond_json(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    # default=str: an error's extra fields may hold a path or a datetime.
    return web.Response(
        status=status,
        text=json.dumps(data, default=str),
        content_type="application/json",
        headers=headers,
    )


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    # Through .json(): a validator's ctx holds the exception object, which only the
    # pydantic serialiser knows how to turn into text. Inputs are not echoed back.
    details: list[dict[str, Any]] = json.loads(exc.json(include_url=False, include_input=False))
    return details


def parse_model(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(MSG_INVALID_BODY, details=validation_details(exc)) from None


async def read_json(request: web.Request) -> Any:
    """The decoded JSON body; None when there is no body at all."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(MSG_INVALID_JSON, details=str(exc)) from None


async def read_model(request: web.Request, model: type[M]) -> M:
    """The body validated as ``model``; a bad body is a 400 naming each fault."""
    data = await read_json(request)
    # No body means no fields, so "image is required" rather than "not JSON".
    return parse_model(model, {} if data is None else data)


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidRequest(f"query parameter {name!r} must be true or false", value=value)


def query_seconds(request: web.Request, name: str, default: float, maximum: float) -> float:
    """A non-negative number of seconds; values above ``maximum`` are lowered to it."""
    value = request.query.get(name)
    if value is None or not value.strip():
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(
            f"query parameter {name!r} must be a non-negative number of seconds", value=value
        )
    return min(seconds, maximum)
