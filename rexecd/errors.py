"""The one exception tree of rexecd; each class knows its HTTP status and stable code.

::

    RexecError (500, internal_error)
    ├── InvalidRequest (400, invalid_request)
    │   ├── UnsupportedImage (400, unsupported_image)
    │   ├── InvalidJson (400, invalid_json)         not JSON, or too deep or too big to decode
    │   ├── InvalidMultipart (400, invalid_multipart)  a form body that cannot be parsed
    │   └── UnreadableBody (400, invalid_body)      a broken content or transfer encoding
    ├── Unauthorized (401, unauthorized)
    ├── Forbidden (403, forbidden)
    │   └── QuotaExceeded (403, quota_exceeded)
    ├── NotFound (404, not_found)
    ├── Conflict (409, conflict)
    ├── PayloadTooLarge (413, payload_too_large)
    ├── RateLimited (429, rate_limited)
    │   └── ConcurrencyLimited (429, concurrency_limited)  too many requests in flight
    ├── ImageError (400, image_invalid)       bad archive, digest mismatch, unsafe member
    ├── RegistryError (502, registry_error)    a registry unreachable, refusing, or broken
    ├── RoleInstallFailed (500, role_install_failed)  a role's install exited non-zero
    ├── RuntimeFailure (500, runtime_failure)  kernel step failed: carries step and errno
    │   └── ChildSetupError (500, child_setup)  a container child reported a failed step
    ├── ExecTimeout (504, exec_timeout)
    └── RuntimeUnavailable (503, runtime_unavailable)

Kernel and netlink errors are translated into ``RuntimeFailure`` at the runtime
boundary, with the operation and the path attached. The API layer renders every
``RexecError`` as ``{"error": message, "code": code, **extra}``.
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


class NotFound(RexecError):
    status = 404
    code = "not_found"


class Conflict(RexecError):
    status = 409
    code = "conflict"


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


class ImageError(RexecError):
    """An image archive that cannot be imported: malformed, unsafe, or failing a digest."""

    status = 400
    code = "image_invalid"


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


class RuntimeUnavailable(RexecError):
    status = 503
    code = "runtime_unavailable"
