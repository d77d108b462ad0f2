"""The one exception tree of rexecd: each class is a wire contract, its HTTP status and
its stable ``code``. A raise site picks the class; it never overrides the code.

::

    RexecError (500, internal_error)               an unexpected fault, message generic
    ├── InvalidRequest (400, invalid_request)
    │   ├── UnsupportedImage (400, unsupported_image)
    │   ├── InvalidJson (400, invalid_json)         not JSON, or too deep or too big to decode
    │   ├── InvalidMultipart (400, invalid_multipart)  a form body that cannot be parsed
    │   └── UnreadableBody (400, invalid_body)      a broken content or transfer encoding
    ├── Unauthorized (401, unauthorized)
    ├── Forbidden (403, forbidden)                  a scope the token lacks
    │   ├── QuotaExceeded (403, quota_exceeded)
    │   └── SessionExpired (403, session_expired)   the tier's session time is over
    ├── NotFound (404, not_found)                   also an unknown route
    │   ├── ContainerNotFound (404, container_not_found)  unknown, or another user's
    │   ├── PortForwardNotFound (404, port_forward_not_found)
    │   └── VolumeNotFound (404, volume_not_found)
    ├── MethodNotAllowed (405, method_not_allowed)  a known route, another method
    ├── Conflict (409, conflict)                    the state forbids it (name taken...)
    │   ├── ContainerNotRunning (409, container_stopped)
    │   │   └── TerminalNotRunning (400, container_stopped)  the terminal route's 400
    │   └── NoNetwork (409, no_network)             network_mode none: nothing to reach
    ├── PayloadTooLarge (413, payload_too_large)
    ├── RateLimited (429, rate_limited)
    │   └── ConcurrencyLimited (429, concurrency_limited)  too many requests in flight
    ├── HttpError (4xx/5xx, http_error)             any other error aiohttp raised itself
    ├── ImageError (400, image_invalid)             bad archive, digest mismatch, unsafe member
    │   └── ImageTooLarge (400, image_too_large)    past an images.unpack limit (a bomb)
    ├── RegistryError (502, registry_error)         a registry unreachable, refusing, or broken
    ├── RoleInstallFailed (500, role_install_failed)  a role's install exited non-zero
    ├── RuntimeFailure (500, runtime_failure)       kernel step failed: carries step and errno
    │   └── ChildSetupError (500, child_setup)      a container child reported a failed step
    ├── ExecTimeout (504, exec_timeout)             an exec's command ran past its timeout
    ├── OperationTimeout (504, timeout)             any other step that timed out
    ├── SessionEnded (410, session_ended)          a terminal session's end, as a frame
    ├── RuntimeUnavailable (503, runtime_unavailable)
    └── ConfigError (500, config_invalid)           a config file that cannot be used (also
                                                    a ValueError: the CLIs report it so)

Each code is defined by exactly one class; a subclass that keeps its parent's code
(``TerminalNotRunning``) changes only the status, for a route whose answer predates
the tree. ``tests/unit/test_errors.py`` holds the tree to that. Kernel and netlink
errors are translated into ``RuntimeFailure`` at the runtime boundary, with the
operation and the path attached. The API layer renders every ``RexecError`` as
``{"error": message, "code": code, **extra}``.
"""

from __future__ import annotations

from typing import Any


class RexecError(Exception):
    """Base of every error rexecd raises on purpose."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        body.update(self.extra)
        return body


class InvalidRequest(RexecError):
    status = 400
    code = "invalid_request"


class UnsupportedImage(InvalidRequest):
    code = "unsupported_image"


class InvalidJson(InvalidRequest):
    """A body or frame that is not strict JSON: bad syntax, not UTF-8, lone surrogates,
    NaN, nesting past the decoder's depth, or an integer past Python's digit limit."""

    code = "invalid_json"


class InvalidMultipart(InvalidRequest):
    """A ``multipart/form-data`` body the parser rejects: no boundary, a malformed part
    header (a NUL in a name), a truncated body."""

    code = "invalid_multipart"


class UnreadableBody(InvalidRequest):
    """A body that cannot be read at all: a ``Content-Encoding: gzip`` that is not gzip,
    a broken chunked encoding found while the handler reads."""

    code = "invalid_body"


class Unauthorized(RexecError):
    status = 401
    code = "unauthorized"


class Forbidden(RexecError):
    status = 403
    code = "forbidden"


class QuotaExceeded(Forbidden):
    code = "quota_exceeded"


class SessionExpired(Forbidden):
    """A container of a tier with a session limit, past it: it may only be deleted."""

    code = "session_expired"


class NotFound(RexecError):
    status = 404
    code = "not_found"


class ContainerNotFound(NotFound):
    """No container of the caller by that id, db id or name (another user's included)."""

    code = "container_not_found"


class PortForwardNotFound(NotFound):
    code = "port_forward_not_found"


class VolumeNotFound(NotFound):
    code = "volume_not_found"


class MethodNotAllowed(RexecError):
    """A route that exists, asked with a method it does not serve (``Allow`` says which)."""

    status = 405
    code = "method_not_allowed"


class Conflict(RexecError):
    status = 409
    code = "conflict"


class ContainerNotRunning(Conflict):
    """The operation needs a running container; ``status`` says what it is instead."""

    code = "container_stopped"


class TerminalNotRunning(ContainerNotRunning):
    """``GET /ws/terminal/{id}`` of a container that is not running: a 400, as the
    terminal route has always answered, where the other routes answer 409."""

    status = 400


class NoNetwork(Conflict):
    """A container without a network (``network_mode: none``) asked for a network feature."""

    code = "no_network"


class PayloadTooLarge(RexecError):
    """A request body past its endpoint's cap (file uploads)."""

    status = 413
    code = "payload_too_large"


class RateLimited(RexecError):
    status = 429
    code = "rate_limited"


class ConcurrencyLimited(RateLimited):
    """One user already has as many requests of a kind in flight as it may."""

    code = "concurrency_limited"


class HttpError(RexecError):
    """An error answer aiohttp chose itself that no class above describes; the status
    is aiohttp's (the one class whose status is per instance)."""

    code = "http_error"

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.status = status


class ImageError(RexecError):
    """An image archive that cannot be imported: malformed, unsafe, or failing a digest."""

    status = 400
    code = "image_invalid"


class ImageTooLarge(ImageError):
    """An image that would unpack past one of the ``images.unpack`` limits (bytes,
    expansion ratio, entries, path depth or length, header size): refused while
    streaming, nothing of it kept. ``limit`` names the setting."""

    code = "image_too_large"


class RegistryError(RexecError):
    """An image registry could not be used: unreachable, timed out, refused our
    credentials, or answered something that is not the distribution API."""

    status = 502
    code = "registry_error"


class RoleInstallFailed(RexecError):
    """A role's install script failed or did not finish; the message ends with its log."""

    code = "role_install_failed"


class RuntimeFailure(RexecError):
    """A kernel operation failed; ``step`` names it and ``errno`` is the kernel's answer."""

    code = "runtime_failure"

    def __init__(self, step: str, message: str, errno: int | None = None, **extra: Any) -> None:
        super().__init__(f"{step}: {message}", **extra)
        self.step = step
        self.errno = errno

    @classmethod
    def from_oserror(cls, step: str, exc: OSError) -> RuntimeFailure:
        detail = exc.strerror or str(exc)
        if exc.filename is not None:
            detail = f"{detail} ({exc.filename})"
        return cls(step, detail, exc.errno)


class ChildSetupError(RuntimeFailure):
    """A container child failed during set-up and reported the step over the sync socket."""

    code = "child_setup"


class ExecTimeout(RexecError):
    status = 504
    code = "exec_timeout"


class OperationTimeout(RexecError):
    """A ``TimeoutError`` that escaped a handler: some wait had a deadline and missed it."""

    status = 504
    code = "timeout"


class SessionEnded(RexecError):
    """A terminal session ended (shell exit, idle, takeover): only ever the ``code`` of
    the last ``error`` or ``container_status`` frame on the socket, never an answer."""

    status = 410
    code = "session_ended"


class RuntimeUnavailable(RexecError):
    status = 503
    code = "runtime_unavailable"


class ConfigError(RexecError, ValueError):
    """A config file or value that cannot be used; the message says where and why."""

    code = "config_invalid"
