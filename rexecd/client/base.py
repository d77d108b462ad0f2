"""What the ``rexec`` CLI needs before it knows it needs aiohttp and pydantic: the
client's errors, ``REXEC_HOST`` parsing, and a small blocking JSON GET on the standard
library, so that ``rexec ls`` starts fast. The full client is ``rexecd.client.sdk``."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

DEFAULT_HOST: Final = "unix:/run/rexecd/rexecd.sock"
#: podman's and docker's default detach sequence: Ctrl-P then Ctrl-Q.
DEFAULT_DETACH_KEYS: Final = "ctrl-p,ctrl-q"


class RexecClientError(Exception):
    """Base of every error the client raises."""


class ApiError(RexecClientError):
    """The daemon answered with an error status; ``body`` is its JSON error object."""

    def __init__(
        self, status: int, body: Mapping[str, Any], *, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.body: dict[str, Any] = dict(body)
        error = self.body.get("error")
        self.message = error if isinstance(error, str) and error else f"HTTP {status}"
        self.retry_after = retry_after
        super().__init__(f"{self.message} ({status})")

    @property
    def code(self) -> str | None:
        """The daemon's stable error code (``container_not_found``, ...), when it sent one."""
        code = self.body.get("code")
        return code if isinstance(code, str) else None


class TransportError(RexecClientError):
    """The daemon could not be reached, or the connection broke or timed out."""


class ProtocolError(RexecClientError):
    """The daemon answered with something that is not the documented shape."""


def parse_host(host: str) -> tuple[str, str | None]:
    """Split a ``REXEC_HOST`` value into the base URL and the unix socket path (or None).

    Accepted: ``unix:/path``, ``unix:///path``, a bare ``/path``, ``http(s)://HOST:PORT[/prefix]``
    and the daemon's own ``tcp:HOST:PORT`` listen syntax.
    """
    if host.startswith("unix:"):
        path = host[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("REXEC_HOST unix: needs a socket path")
        return "http://localhost", path
    if host.startswith("/"):
        return "http://localhost", host
    if host.startswith("tcp:"):
        host = "http://" + host[len("tcp:") :]
    if host.startswith(("http://", "https://")):
        return host.rstrip("/"), None
    raise ValueError(f"REXEC_HOST must be unix:PATH or http://HOST:PORT, not {host!r}")


def _connect(host: str, base: str, sock_path: str | None, timeout: float) -> socket.socket:
    try:
        if sock_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(sock_path)
            except OSError:
                sock.close()
                raise
            return sock
        parts = urlsplit(base)
        return socket.create_connection((parts.hostname or "localhost", parts.port or 80), timeout)
    except TimeoutError as e:
        raise TransportError(f"timed out talking to the daemon at {host}") from e
    except OSError as e:
        raise TransportError(f"cannot reach the daemon at {host}: {e.strerror or e}") from e


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        line, _, rest = body.partition(b"\r\n")
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += rest[:size]
        body = rest[size + 2 :]


def get_json(host: str, token: str | None, path: str, timeout: float = 60.0) -> Any:
    """``GET path`` and its JSON answer; ApiError for an error status (with the body the
    daemon sent), TransportError when the daemon cannot be reached.

    Plain HTTP/1.1 on a socket: ``http.client`` (and the ``email`` package under it)
    would cost more to import than the request takes. ``https://`` is not handled
    here (the caller uses the full client for it).
    """
    base, sock_path = parse_host(host)
    if sock_path is None:
        parts = urlsplit(base)
        if parts.scheme != "http":
            raise ValueError("get_json speaks plain http only")
        path = parts.path + path
        netloc = parts.netloc
    else:
        netloc = "localhost"
    lines = [f"GET {path} HTTP/1.1", f"Host: {netloc}", "Accept: application/json"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += ["Connection: close", "", ""]
    sock = _connect(host, base, sock_path, timeout)
    try:
        sock.sendall("\r\n".join(lines).encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError as e:
        raise TransportError(f"timed out talking to the daemon at {host}") from e
    except OSError as e:
        raise TransportError(f"connection to the daemon at {host} failed: {e}") from e
    finally:
        sock.close()
    head, _, raw = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        raise ProtocolError(f"answer to GET {path} is not HTTP") from None
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raw = _dechunk(raw)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        body = None
    if status >= 400:
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            body = {"error": f"HTTP {status}"}
        return _raise(status, body, {"Retry-After": headers.get("retry-after", "")})
    if body is None:
        raise ProtocolError(f"answer to GET {path} is not JSON")
    return body


def _raise(status: int, body: dict[str, Any], headers: Mapping[str, str]) -> Any:
    retry = None
    if status == 429:
        value = body.get("retry_after", headers.get("Retry-After") or None)
        try:
            retry = float(value) if value is not None and not isinstance(value, bool) else None
        except (TypeError, ValueError):
            retry = None
    raise ApiError(status, body, retry_after=retry)
