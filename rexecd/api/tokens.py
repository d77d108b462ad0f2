"""API token endpoints: create (the secret shown once), list, revoke, validate."""

from __future__ import annotations

from aiohttp import web

from rexecd.api.auth import principal
from rexecd.api.containers import COMMON_ERRORS
from rexecd.api.endpoint import Endpoint
from rexecd.api.keys import STORE
from rexecd.api.wire import read_model, respond, respond_json
from rexecd.models import TokenCreate, TokenCreated, TokenList, TokenValidation
from rexecd.service import auth
from rexecd.service.storethread import in_store_thread


async def create_token(request: web.Request) -> web.Response:
    body = await read_model(request, TokenCreate)
    # The store is SQLite behind a lock: off the event loop, on the store's thread.
    plaintext, out = await in_store_thread(
        auth.create_token_for, request.app[STORE], principal(request), body
    )
    created = TokenCreated.model_validate({**out.model_dump(), "token": plaintext})
    return respond(created, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await in_store_thread(auth.list_tokens, request.app[STORE], principal(request))
    return respond(TokenList(tokens=tokens, count=len(tokens)))


async def revoke_token(request: web.Request) -> web.Response:
    token_id = request.match_info["token_id"]
    await in_store_thread(auth.revoke_token, request.app[STORE], principal(request), token_id)
    return respond_json({"message": "token revoked", "id": token_id})


async def validate_token(request: web.Request) -> web.Response:
    return respond(auth.token_validation(principal(request)))


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/api/tokens",
        create_token,
        "Create a token for the caller (the secret is in this answer only)",
        "tokens",
        body=TokenCreate,
        response=TokenCreated,
        status=201,
        errors=(400, *COMMON_ERRORS),
    ),
    Endpoint(
        "GET",
        "/api/tokens",
        list_tokens,
        "List the caller's tokens",
        "tokens",
        response=TokenList,
        errors=COMMON_ERRORS,
    ),
    # Before /api/tokens/{token_id}, so "validate" is never taken for a token id.
    Endpoint(
        "GET",
        "/api/tokens/validate",
        validate_token,
        "Who this token is and what it may do",
        "tokens",
        response=TokenValidation,
        errors=COMMON_ERRORS,
    ),
    Endpoint(
        "DELETE",
        "/api/tokens/{token_id}",
        revoke_token,
        "Revoke one of the caller's tokens",
        "tokens",
        errors=(*COMMON_ERRORS, 404),
    ),
)
