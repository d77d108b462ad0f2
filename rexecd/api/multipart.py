"""``multipart/form-data`` request bodies read part by part; a malformed one is a 400."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from rexecd.errors import InvalidMultipart

MSG_INVALID_MULTIPART = "malformed multipart/form-data body"
MSG_TRUNCATED = "the body ends inside a part, before its closing boundary"
# What aiohttp's multipart reader raises on a body it cannot parse: BadHttpMessage for
# a part header (InvalidHeader: a NUL in a name; LineTooLong; too many headers) or a
# broken transfer encoding, ValueError for a missing or bad boundary and a truncated
# body, RuntimeError for a bad ``_charset_`` part. A body past the request size cap
# is aiohttp's own 413 (an HTTPException), which passes through.
_PARSE_ERRORS = (BadHttpMessage, ValueError, RuntimeError)


@contextlib.contextmanager
def _parsing() -> Iterator[None]:
    try:
        yield
    except _PARSE_ERRORS as exc:
        detail = getattr(exc, "message", None) or str(exc)
        raise InvalidMultipart(MSG_INVALID_MULTIPART, details=str(detail)[:200]) from None


class Form:
    """A request's form body, one part at a time."""

    def __init__(self, reader: MultipartReader) -> None:
        self._reader = reader

    async def next(self) -> BodyPartReader | None:
        """The next part; None after the last. Nested multipart parts are skipped."""
        while True:
            with _parsing():
                part = await self._reader.next()
            if part is None or isinstance(part, BodyPartReader):
                return part


async def open_form(request: web.Request) -> Form:
    with _parsing():
        return Form(await request.multipart())


async def read_chunk(part: BodyPartReader, size: int) -> bytes:
    """Up to ``size`` bytes of a part's content; b"" at its end."""
    with _parsing():
        chunk = await part.read_chunk(size)
    if not chunk and not part.at_eof():
        # aiohttp answers b"" at the end of the body as it does at the part's closing
        # boundary: a part whose boundary never came was cut short, and must not be
        # taken for a whole file.
        raise InvalidMultipart(MSG_INVALID_MULTIPART, details=MSG_TRUNCATED)
    return chunk
