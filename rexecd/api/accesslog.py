"""The access log, and the filter that keeps API tokens out of every log line.

aiohttp's default access line holds the whole request target and the Referer, either
of which can carry ``?token=``; whoever can read the log could then act as that user.
Here a query parameter named like a credential keeps its name and loses its value,
anything shaped like a rexec token is masked wherever it appears, and no header but
the Referer and User-Agent is written. ``scrub_log_handlers`` applies the token mask
to every record the daemon's handlers write, tracebacks included.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from rexecd.api.keys import PRINCIPAL

REDACTED = "<redacted>"
_SECRET_PARAM = re.compile(
    r"(access_?)?token|api_?key|key|secret|pass(word)?|auth(orization)?|session|sig(nature)?",
    re.IGNORECASE,
)
# Tokens are ``rexec_`` and 48 hex digits; a shorter run is masked too (a cut-off copy).
_TOKEN = re.compile(r"rexec_[0-9A-Fa-f]{8,}")
# Control characters would let a client forge lines of its own in the log.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _scrub(text: str) -> str:
    return _CONTROL.sub("?", _TOKEN.sub("rexec_" + REDACTED, text))


def redact_target(target: str) -> str:
    """``target`` (path and query, or a whole URL) with credential values removed."""
    head, sep, query = target.partition("?")
    if not sep:
        return _scrub(target)
    query, hash_, fragment = query.partition("#")
    params = []
    for item in query.split("&"):
        name, eq, _value = item.partition("=")
        if eq and _SECRET_PARAM.fullmatch(unquote_plus(name).strip()):
            item = f"{name}={REDACTED}"
        params.append(item)
    return _scrub(f"{head}?{'&'.join(params)}{hash_}{fragment}")


class AccessLogger(AbstractAccessLogger):
    """One line per request: ``remote user=NAME req=ID "METHOD target HTTP/x.y" status
    bytes seconds "referer" "user-agent"``; ``user=-`` before authentication. The user
    and request id also go as the journal's ``USER`` and ``REQUEST_ID`` fields."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        version = request.version
        who = request.get(PRINCIPAL)
        user = who.user_name if who is not None else None
        rid = request.get("request_id")
        self.logger.info(
            '%s user=%s req=%s "%s %s HTTP/%d.%d" %d %d %.3fs "%s" "%s"',
            request.remote or "-",
            _scrub(user) if user else "-",
            rid or "-",
            _scrub(request.method),
            redact_target(request.raw_path),
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
            redact_target(request.headers.get("Referer", "-")),
            _scrub(request.headers.get("User-Agent", "-")),
            extra={"USER": user, "REQUEST_ID": rid},
        )


class TokenScrubber(logging.Filter):
    """A handler filter: the record's final text, traceback included, with tokens masked.

    On a handler, not a logger, so records propagated from any library's logger pass it.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A malformed call: the handler reports it ("--- Logging error ---") when it
            # formats; raising here would raise at the caller's log call instead.
            return True
        clean = _TOKEN.sub("rexec_" + REDACTED, message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _TOKEN.sub("rexec_" + REDACTED, record.exc_text)
        return True


def scrub_log_handlers(logger: logging.Logger | None = None) -> None:
    """Install ``TokenScrubber`` on every handler of ``logger`` (the root by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, TokenScrubber) for f in handler.filters):
            handler.addFilter(TokenScrubber())
