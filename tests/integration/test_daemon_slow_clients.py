"""Slow clients do not hold connections: a request head or body that does not arrive in
time closes the connection, and one address cannot hold more than its cap of
connections that have not authenticated, while authenticated clients keep being served."""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deadlines import scaled
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import poll, running_daemon, unique

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
CAP = 8
PARTIAL_CONNECTIONS = 200
PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: rexecd\r\nUser-Agent: slow"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    http = {
        "header_timeout_s": HEADER_TIMEOUT,
        "body_timeout_s": BODY_TIMEOUT,
        "unauthenticated_per_ip": CAP,
    }
    with running_daemon(tmp_path_factory, overrides={"http": http}) as d:
        yield d


def connect(d: Daemon, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", d.port), timeout=scaled(10), source_address=(source, 0)
    )


def read_response(s: socket.socket) -> tuple[int, dict[str, Any] | None]:
    """One HTTP response with a Content-Length body: (status, JSON body or None)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    parsed = json.loads(body) if body and "json" in headers.get("content-type", "") else None
    return int(lines[0].split()[1]), parsed


def request(s: socket.socket, path: str, token: str | None = None) -> tuple[int, Any]:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: rexecd\r\n{auth}\r\n".encode())
    return read_response(s)


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def wait_closed(
    socks: list[socket.socket], timeout: float, opened: dict[socket.socket, float] | None = None
) -> tuple[list[float], int]:
    """Seconds from each socket's opening (``opened``, else from now) until the server
    closed it, and how many it did not close within ``timeout``."""
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    since = opened or {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed: list[float] = []
    deadline = t0 + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if closed_by_peer(s):
                closed.append(time.monotonic() - since.get(s, t0))
                sel.unregister(s)
    sel.close()
    return closed, len(socks) - len(closed)


def test_partial_heads_are_closed_after_the_header_timeout(daemon: Daemon) -> None:
    # Spread over loopback addresses so the per-address cap does not refuse them first.
    sources = [f"127.0.1.{i}" for i in range(1, PARTIAL_CONNECTIONS // (CAP // 2) + 1)]
    socks: list[socket.socket] = []
    opened: dict[socket.socket, float] = {}
    try:
        for i in range(PARTIAL_CONNECTIONS):
            s = connect(daemon, sources[i % len(sources)])
            opened[s] = time.monotonic()
            socks.append(s)
            s.sendall(PARTIAL_HEAD)
        trickler = connect(daemon, "127.0.2.1")
        socks.append(trickler)
        trickler.sendall(PARTIAL_HEAD)
        # A slowloris client: a byte of its head now and then never buys more time.
        t0 = time.monotonic()
        trickled_until_closed = False
        while time.monotonic() - t0 < scaled(HEADER_TIMEOUT + 10):
            try:
                trickler.sendall(b"X")
            except OSError:
                trickled_until_closed = True
                break
            trickler.settimeout(0.2)
            try:
                if trickler.recv(1) == b"":
                    trickled_until_closed = True
                    break
            except TimeoutError:
                pass
            except OSError:  # reset: closed with our bytes unread
                trickled_until_closed = True
                break
        assert trickled_until_closed, "a trickling client kept its connection"
        closed, still_open = wait_closed(socks[:-1], scaled(HEADER_TIMEOUT + 10), opened)
        assert still_open == 0
        print(
            f"{len(closed)} partial-head connections closed {min(closed):.2f}-{max(closed):.2f}s "
            f"after connecting (header_timeout_s={HEADER_TIMEOUT})"
        )
        # The daemon still serves a client that sends its request.
        with connect(daemon) as s:
            assert request(s, "/health")[0] == 200
    finally:
        for s in socks:
            s.close()


def test_stalled_body_is_closed_after_the_body_timeout(daemon: Daemon) -> None:
    token = daemon.token(unique("slowbody"))
    with connect(daemon) as s:
        s.sendall(
            b"POST /api/containers HTTP/1.1\r\nHost: rexecd\r\n"
            + f"Authorization: Bearer {token}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            + b'{"image": "b'
        )
        closed, still_open = wait_closed([s], scaled(BODY_TIMEOUT + 10))
        assert still_open == 0, "a stalled request body kept its connection"
        print(f"stalled body closed after {closed[0]:.2f}s (body_timeout_s={BODY_TIMEOUT})")


def test_unauthenticated_connections_are_capped_per_address(daemon: Daemon) -> None:
    token = daemon.token(unique("capped"))
    held: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        authed = stack.enter_context(connect(daemon))
        assert request(authed, "/api/containers", token)[0] == 200
        # Complete requests that need no token: each connection stays open (kept
        # alive) and counts until it authenticates.
        for _ in range(CAP):
            s = stack.enter_context(connect(daemon))
            held.append(s)
            assert request(s, "/health")[0] == 200
        with connect(daemon) as extra:
            status, body = read_response(extra)
            assert status == 429, body
            assert body is not None and body["code"] == "rate_limited", body
            assert closed_by_peer(extra)
        # An authenticated connection from the same address is still served...
        assert request(authed, "/api/containers", token)[0] == 200
        # ... and so is another address.
        with connect(daemon, "127.0.0.2") as other:
            assert request(other, "/health")[0] == 200
        # A connection that authenticates stops counting: the address gets a slot.
        assert request(held[0], "/api/containers", token)[0] == 200
        with connect(daemon) as s:
            assert request(s, "/health")[0] == 200
        for s in held:
            s.close()

        def slots_free() -> bool:
            with contextlib.ExitStack() as conns:
                for _ in range(CAP):
                    c = conns.enter_context(connect(daemon))
                    try:
                        if request(c, "/health")[0] != 200:
                            return False
                    except ConnectionError:
                        return False
            return True

        # Closed connections free their slots: CAP unauthenticated ones fit again.
        poll(slots_free, what="the closed connections' slots to be released")
