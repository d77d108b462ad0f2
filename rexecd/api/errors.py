"""Error rendering: every failure leaves the API as a JSON body with an ``error`` key."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from rexecd.api.wire import respond_json
from rexecd.errors import (
    HttpError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    OperationTimeout,
    PayloadTooLarge,
    RateLimited,
    RexecError,
    Unauthorized,
    UnreadableBody,
)

log = logging.getLogger("rexecd.api")

MSG_INTERNAL = "internal server error"
MSG_TIMEOUT = "operation timed out"
MSG_UNREADABLE_BODY = "request body could not be read"
# Headers describing an aiohttp error's text body, which a JSON body replaces.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


def render_rexec_error(exc: RexecError) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="rexec"'} if isinstance(exc, Unauthorized) else {}
    if isinstance(exc, RateLimited) and "retry_after" in exc.extra:
        headers["Retry-After"] = str(exc.extra["retry_after"])
    return respond_json(exc.to_json(), exc.status, headers)


# aiohttp's own error answers by status, as the classes of the one tree.
_HTTP_ERRORS: dict[int, type[RexecError]] = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def http_error(exc: web.HTTPException) -> RexecError:
    """The ``RexecError`` an aiohttp error stands for; the message is its reason phrase."""
    message = (exc.reason or "error").lower()
    cls = _HTTP_ERRORS.get(exc.status)
    return cls(message) if cls is not None else HttpError(exc.status, message)


def render_http_exception(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown route, wrong method, body too big) as JSON."""
    # Allow (405) and the like stay; only the body and its type change.
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    err = http_error(exc)
    return respond_json(err.to_json(), err.status, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: one place that maps exceptions to HTTP answers."""
    try:
        return await handler(request)
    except Exception as exc:
        if request.writer.output_size > 0:
            # A streamed answer (download, SSE, WebSocket) has sent its headers: a
            # second response cannot follow. Re-raised, aiohttp drops the connection,
            # so the client sees a truncated body rather than one that looks whole.
            log.warning("%s %s failed mid-response: %r", request.method, request.path, exc)
            raise
        return render_exception(request, exc)


def render_exception(request: web.Request, exc: Exception) -> web.Response:
    if isinstance(exc, RexecError):
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc, exc_info=exc)
        return render_rexec_error(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            # Redirects and the like are answers, not errors: aiohttp sends them as is.
            raise exc
        return render_http_exception(exc)
    if isinstance(exc, RequestPayloadError):
        # aiohttp's parser found the body broken (bad gzip, bad chunking) while a
        # handler read it: whichever handler, it is the client's fault. The rest of
        # the body cannot be skipped to reach a next request, so the connection ends.
        detail = " ".join(str(exc).split())[:200]
        response = render_rexec_error(UnreadableBody(MSG_UNREADABLE_BODY, details=detail))
        response.force_close()
        return response
    if isinstance(exc, TimeoutError):
        log.warning("%s %s timed out", request.method, request.path, exc_info=exc)
        return render_rexec_error(OperationTimeout(MSG_TIMEOUT))
    # The traceback may name host paths and internals: it goes to the log only.
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return render_rexec_error(RexecError(MSG_INTERNAL))
