"""The OpenAPI 3.1 document, generated from the endpoint table and the pydantic models."""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from rexecd.api.endpoint import Endpoint, WsFrames
from rexecd.api.keys import OPENAPI
from rexecd.models import ErrorBody, StreamProgress

OPENAPI_PATH = "/api/openapi.json"
REF_TEMPLATE = "#/components/schemas/{model}"
_PATH_PARAM_RE = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_PATH_PARAM_DOC = {
    "id": "container runtime id (64 hex), db id (UUID) or name",
    "token_id": "token id",
    "ref": "image reference NAME[:TAG] (may contain '/')",
}
_RATE_HEADERS = {
    "X-RateLimit-Limit": {
        "description": "requests allowed per minute in this request's class",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Remaining": {
        "description": "requests left in the current window",
        "schema": {"type": "integer"},
    },
}
_MULTIPART_UPLOAD = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream"},
        "path": {"type": "string", "description": "target directory, if not in ?path="},
    },
    "required": ["file"],
}
_MESSAGE = {
    "type": "object",
    "properties": {"message": {"type": "string"}},
    "required": ["message"],
}


def _models(endpoints: Iterable[Endpoint]) -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {"ErrorBody": ErrorBody}
    for ep in endpoints:
        for item in (ep.body, ep.response):
            if isinstance(item, type):
                found[item.__name__] = item
        if ep.response == "text/event-stream":
            found["StreamProgress"] = StreamProgress
        if ep.frames is not None:
            for model in ep.frames.models():
                found[model.__name__] = model
    return [found[name] for name in sorted(found)]


def _ws_frames(frames: WsFrames, refs: dict[Any, Any]) -> dict[str, Any]:
    """``x-websocket``: each side's frames, text (JSON, one schema per ``type``) and
    binary (what their bytes are)."""

    def side(models: tuple[type[BaseModel], ...], binary: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": {
                "oneOf": [refs[m] for m in models],
                "discriminator": {"propertyName": "type"},
            }
        }
        if binary is not None:
            out["binary"] = {"description": binary}
        return out

    client = {"first": refs[frames.first]} if frames.first is not None else {}
    return {
        "client": {**client, **side(frames.client, frames.client_binary)},
        "server": side(frames.server, frames.server_binary),
    }


def _raw(media_type: str) -> dict[str, Any]:
    if media_type == "application/json":
        return {media_type: {"schema": {"type": "object"}}}
    return {media_type: {"schema": {"type": "string", "contentMediaType": media_type}}}


def _operation(ep: Endpoint, op_id: str, refs: dict[Any, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": ep.summary, "tags": [ep.tag]}
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": _PATH_PARAM_DOC.get(name, name),
            "schema": {"type": "string"},
        }
        for name in _PATH_PARAM_RE.findall(ep.path)
    ]
    params += [
        {
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": {"type": q.type},
        }
        for q in ep.query
    ]
    if params:
        op["parameters"] = params

    if isinstance(ep.body, type):
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[ep.body]}},
        }
    elif ep.body == "multipart/form-data":
        op["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": _MULTIPART_UPLOAD}},
        }
    elif ep.body is not None:
        op["requestBody"] = {"required": True, "content": _raw(ep.body)}

    ok: dict[str, Any] = {"description": HTTPStatus(ep.status).phrase}
    if ep.websocket:
        ok["description"] = "WebSocket upgrade; server frames are JSON text"
        if isinstance(ep.response, type):
            ok["x-websocket-frames"] = refs[ep.response]
        if ep.frames is not None:
            ok["description"] = (
                "WebSocket upgrade; frames either way are in x-websocket (JSON text "
                "frames by type; binary frames as described)"
            )
            ok["x-websocket"] = _ws_frames(ep.frames, refs)
    elif isinstance(ep.response, type):
        ok["content"] = {"application/json": {"schema": refs[ep.response]}}
    elif ep.response == "text/event-stream":
        ok["content"] = {
            "text/event-stream": {
                "schema": {"type": "string", "description": "`data: <StreamProgress>` frames"},
                "x-frame-schema": refs[StreamProgress],
            }
        }
    elif ep.response is not None:
        ok["content"] = _raw(ep.response)
    else:
        ok["content"] = {"application/json": {"schema": _MESSAGE}}
    if ep.authenticated:
        ok["headers"] = _RATE_HEADERS
    responses: dict[str, Any] = {str(ep.status): ok}
    for status in ep.errors:
        responses[str(status)] = {
            "description": HTTPStatus(status).phrase,
            "content": {"application/json": {"schema": refs[ErrorBody]}},
        }
    op["responses"] = responses
    if not ep.authenticated:
        op["security"] = []
    return op


def build_openapi(endpoints: Iterable[Endpoint], *, version: str) -> dict[str, Any]:
    endpoints = list(endpoints)
    # Validation mode for responses too: a model serializer (the _OmitNone ones)
    # hides the fields from the serialization-mode schema.
    mapping, defs = models_json_schema(
        [(m, "validation") for m in _models(endpoints)], ref_template=REF_TEMPLATE
    )
    refs = {model: schema for (model, _mode), schema in mapping.items()}
    paths: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for ep in endpoints:
        op_id = ep.handler.__name__
        suffix = 2
        while op_id in used:
            op_id = f"{ep.handler.__name__}_{suffix}"
            suffix += 1
        used.add(op_id)
        # aiohttp's "{ref:.+}" (a parameter spanning slashes) is plain "{ref}" in OpenAPI.
        path = _PATH_PARAM_RE.sub(r"{\1}", ep.path)
        paths.setdefault(path, {})[ep.method.lower()] = _operation(ep, op_id, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Rexec Container API",
            "version": version,
            "description": "rexecd: the Rexec Container API served by a self-contained runtime.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "rexec_<48 hex>"}
            },
        },
        "security": [{"bearerAuth": []}],
        "tags": [{"name": t} for t in dict.fromkeys(ep.tag for ep in endpoints)],
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=request.app[OPENAPI], content_type="application/json")


ENDPOINT = Endpoint(
    "GET",
    OPENAPI_PATH,
    openapi_json,
    "This OpenAPI 3.1 document",
    "system",
    response="application/json",
    errors=(401, 429),
)
