"""The description of one HTTP endpoint, shared by the router and the OpenAPI generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiohttp.typedefs import Handler
from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    description: str
    type: Literal["string", "integer", "number", "boolean"] = "string"
    required: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A route and what its request and answers look like.

    ``body`` is a model for JSON bodies, or a media type for raw ones; ``response``
    likewise (``text/event-stream``, ``application/octet-stream``...).
    """

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type[BaseModel] | str | None = None
    response: type[BaseModel] | str | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    query: tuple[Query, ...] = ()
    authenticated: bool = True
    websocket: bool = False
