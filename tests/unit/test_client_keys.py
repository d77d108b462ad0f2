"""The keys ``rexec connect`` watches for (detach sequence, ``~.``) and how ``rexec
exec`` cuts its command line; no daemon involved."""

from __future__ import annotations

import pytest

from rexecd.client.cli import _split_exec, build_parser
from rexecd.client.terminal import KeyFilter, parse_detach_keys


def test_detach_keys_parse_like_podman() -> None:
    assert parse_detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    assert parse_detach_keys("ctrl-a,d") == b"\x01d"
    assert parse_detach_keys("ctrl-@,ctrl-_") == b"\x00\x1f"
    assert parse_detach_keys("") == b""
    for bad in ("ctrl-", "ctrl-1", "alt-x", "a,,b", "é"):
        with pytest.raises(ValueError):
            parse_detach_keys(bad)


def feed_all(f: KeyFilter, *chunks: bytes) -> tuple[bytes, str | None]:
    out = b""
    for chunk in chunks:
        sent, action = f.feed(chunk)
        out += sent
        if action:
            return out, action
    return out, None


def test_detach_sequence_even_split_across_reads() -> None:
    assert feed_all(KeyFilter(b"\x10\x11"), b"ls\r\x10", b"\x11") == (b"ls\r", "detach")


def test_partial_detach_sequence_is_sent_as_typed() -> None:
    # Ctrl-P alone is the shell's history key: it must still reach the shell.
    assert feed_all(KeyFilter(b"\x10\x11"), b"\x10", b"x") == (b"\x10x", None)
    assert feed_all(KeyFilter(b"\x10\x11"), b"\x10\x10\x11") == (b"\x10", "detach")


def test_escape_only_at_line_start() -> None:
    assert feed_all(KeyFilter(b""), b"~.") == (b"", "escape")
    assert feed_all(KeyFilter(b""), b"echo a~.", b"\r") == (b"echo a~.\r", None)
    assert feed_all(KeyFilter(b""), b"ls\r~.") == (b"ls\r", "escape")
    assert feed_all(KeyFilter(b""), b"\r~", b".") == (b"\r", "escape")


def test_escape_twice_sends_one_and_other_keys_pass() -> None:
    assert feed_all(KeyFilter(b""), b"~~.") == (b"~.", None)
    assert feed_all(KeyFilter(b""), b"~x") == (b"~x", None)
    assert feed_all(KeyFilter(b"", escape=None), b"~.") == (b"~.", None)


@pytest.mark.parametrize(
    ("argv", "container", "cmd", "timeout"),
    [
        (["exec", "box", "--timeout", "120", "--", "sleep", "1"], "box", ["sleep", "1"], 120),
        (["exec", "box", "--timeout=5", "ls", "-l"], "box", ["ls", "-l"], 5),
        (["exec", "-it", "box", "--", "tty"], "box", ["tty"], None),
        (
            ["--json", "exec", "box", "sh", "-c", "x --timeout 3"],
            "box",
            ["sh", "-c", "x --timeout 3"],
            None,
        ),
        (["exec", "box", "--", "--timeout", "9"], "box", ["--timeout", "9"], None),
    ],
)
def test_exec_options_after_the_name(
    argv: list[str], container: str, cmd: list[str], timeout: int | None
) -> None:
    parser = build_parser()
    head, words = _split_exec(parser, argv)
    a = parser.parse_args(head)
    assert (a.container, words, a.timeout) == (container, cmd, timeout)


def test_terminal_answers_do_not_end_the_line_start() -> None:
    # busybox ash asks for the cursor position after Enter; the answer comes as input.
    f = KeyFilter(b"\x10\x11")
    assert feed_all(f, b"\r", b"\x1b[7;14R", b"~.") == (b"\r\x1b[7;14R", "escape")
