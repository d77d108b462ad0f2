"""The access log and the log filter keep tokens out of every line they write."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from rexecd.api.accesslog import AccessLogger, TokenScrubber, redact_target, scrub_log_handlers

TOKEN = "rexec_" + "0123456789abcdef" * 3


def test_credential_query_values_are_redacted() -> None:
    assert (
        redact_target(f"/ws/terminal/x?id=main&token={TOKEN}&newSession=true")
        == "/ws/terminal/x?id=main&token=<redacted>&newSession=true"
    )
    for name in ("access_token", "Token", "api_key", "password", "tok%65n", "key"):
        assert redact_target(f"/p?{name}=hunter2") == f"/p?{name}=<redacted>", name
    # Harmless parameters stay readable; so does a URL with no query.
    assert redact_target("/api/files?path=/etc&timeout=5") == "/api/files?path=/etc&timeout=5"
    assert redact_target("/api/containers") == "/api/containers"


def test_a_token_anywhere_is_masked() -> None:
    for target in (f"/api/{TOKEN}", f"/p?x={TOKEN}", f"http://h/?ref={TOKEN}#frag"):
        assert TOKEN not in redact_target(target)
        assert "rexec_<redacted>" in redact_target(target)


def test_control_characters_cannot_forge_lines() -> None:
    assert "\n" not in redact_target("/p?x=1\n2026 INFO forged")


def test_access_line_has_no_token(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.access")
    req = make_mocked_request(
        "GET",
        f"/api/containers/events?token={TOKEN}",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Referer": f"https://app.invalid/term?token={TOKEN}",
            "User-Agent": f"agent {TOKEN}",
            "Sec-WebSocket-Protocol": f"rexec.v1, rexec.token.{TOKEN}",
        },
    )
    with caplog.at_level(logging.INFO, logger="test.access"):
        AccessLogger(logger, "").log(req, web.Response(status=101), 0.25)
    line = caplog.records[-1].getMessage()
    assert TOKEN not in line
    assert '"GET /api/containers/events?token=<redacted> HTTP/1.1" 101' in line
    assert "https://app.invalid/term?token=<redacted>" in line


def test_scrubber_masks_messages_args_and_tracebacks() -> None:
    logger = logging.getLogger("test.scrub")
    logger.propagate = False
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    handler = Keep()
    logger.addHandler(handler)
    try:
        scrub_log_handlers(logger)
        scrub_log_handlers(logger)  # idempotent
        assert sum(isinstance(f, TokenScrubber) for f in handler.filters) == 1
        logger.warning("request with %s", TOKEN)
        try:
            raise ValueError(f"bad token {TOKEN}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 2
    assert all(TOKEN not in text for text in seen), seen
    assert "rexec_<redacted>" in seen[0] and "ValueError: bad token rexec_<redacted>" in seen[1]


def test_scrubber_lets_a_malformed_record_through() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s %s", ("one",), None)
    assert TokenScrubber().filter(record) is True
