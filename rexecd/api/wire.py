"""JSON on the wire: request bodies into models, models into responses, query values."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from rexecd.errors import InvalidJson, InvalidRequest

M = TypeVar("M", bound=BaseModel)

MSG_INVALID_BODY = "invalid request body"
MSG_INVALID_JSON = "invalid JSON body"
# No field of the API needs more; a longer integer is refused before Python converts it
# (quadratic in its length, and past sys.get_int_max_str_digits() a ValueError).
MAX_INT_DIGITS = 1000
# An escaped UTF-16 surrogate in the text: only a walk of the decoded value tells a
# lone one (not Unicode, so never encodable as UTF-8) from half of a valid pair.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")
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


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _has_lone_surrogate(value: Any) -> bool:
    # A loop, not recursion: the value may be nested as deep as the decoder allowed.
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            # The decoder joins an escaped pair into one code point: what is left is lone.
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            todo.extend(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def decode_json(raw: str | bytes) -> Any:
    """Strict JSON (UTF-8, finite numbers, Unicode strings) or ``InvalidJson``.

    Hostile text meets a clear refusal here rather than an error further in: nesting
    past the decoder's recursion limit, an integer of thousands of digits, a lone
    surrogate that no UTF-8 encoder (SQLite, a PTY write) would accept.
    """
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        value = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant
        )
    except RecursionError:
        raise InvalidJson(MSG_INVALID_JSON, details="nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise InvalidJson(MSG_INVALID_JSON, details=str(exc)) from None
    suspect = _SURROGATE_ESCAPE.search(text) or _SURROGATE.search(text)
    if suspect and _has_lone_surrogate(value):
        raise InvalidJson(MSG_INVALID_JSON, details="a string holds a lone UTF-16 surrogate")
    return value


async def read_json(request: web.Request) -> Any:
    """The decoded JSON body; None when there is no body at all."""
    raw = await request.read()
    if not raw.strip():
        return None
    return decode_json(raw)


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
