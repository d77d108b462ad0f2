"""The Rexec API wire shapes (request, response and frame bodies) and the container record."""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# --- shared vocabulary -----------------------------------------------------------------

# Names become paths and mount points: every check matches the whole string (\Z and
# fullmatch), since "$" also matches before a trailing newline and would let "x\n" in.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z"
NAME_RE = re.compile(NAME_PATTERN)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
RUNTIME_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")
# Image references as a user types them: "ubuntu", "alpine:3.20", "registry/x:tag".
_IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$"

ContainerStatus = Literal["creating", "configuring", "running", "stopped", "error", "expired"]
TierName = Literal["guest", "free", "pro", "enterprise"]
Scope = Literal["read", "write", "admin"]
NetworkMode = Literal["default", "none"]
EXEC_MAX_TIMEOUT_S = 300
EXEC_DEFAULT_TIMEOUT_S = 60


def utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(dt: datetime) -> datetime:
    # A naive datetime can only have come from our own code, which always means UTC.
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def format_rfc3339(dt: datetime) -> str:
    """``2024-05-01T12:00:00Z``: whole seconds, which every client's parser accepts."""
    return _as_utc(dt).strftime("%Y-%m-%dT%H:%M:%SZ")


UtcDatetime = Annotated[
    datetime,
    AfterValidator(_as_utc),
    PlainSerializer(format_rfc3339, return_type=str, when_used="json"),
]


def new_db_id() -> str:
    return str(uuid.uuid4())


def new_runtime_id() -> str:
    return secrets.token_hex(32)


def _no_nul(value: str, what: str) -> str:
    # A NUL cannot cross execve or a path syscall; refuse it at the door.
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    return value


class _Request(BaseModel):
    # A body with an unknown key is a 400 naming the key, never silently ignored.
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True, validate_by_name=True)


class _OmitNone(_Response):
    """A response whose optional keys are left out rather than sent as null."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_when_none)}


# --- containers ------------------------------------------------------------------------


def _check_name(v: str | None) -> str | None:
    if v is not None and not NAME_RE.fullmatch(v):
        raise ValueError("name must be 1-64 of [A-Za-z0-9_-] and must not start with '-' or '_'")
    return v


def _check_env_map(v: dict[str, str]) -> dict[str, str]:
    for key, value in v.items():
        if not ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"environment name {key!r} must match [A-Za-z_][A-Za-z0-9_]*")
        _no_nul(value, f"environment value of {key}")
    return v


class ContainerCreate(_Request):
    """Body of ``POST /containers`` and ``/containers/stream``.

    Sizes of 0 mean "not given", because some clients send zero values for unset
    fields; the service then applies the configured default.
    """

    image: str = Field(min_length=1, max_length=255, pattern=_IMAGE_PATTERN)
    name: str | None = None
    role: str | None = Field(default=None, max_length=64)
    custom_image: str | None = Field(default=None, max_length=255, pattern=_IMAGE_PATTERN)
    memory_mb: int | None = Field(default=None, ge=0)
    cpu_shares: int | None = Field(default=None, ge=0)
    disk_mb: int | None = Field(default=None, ge=0)
    environment: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network_mode: NetworkMode | None = None

    _name = field_validator("name")(_check_name)
    _env = field_validator("environment")(_check_env_map)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key or len(key) > 128:
                raise ValueError(f"label key {key!r} must be 1-128 characters")
            _no_nul(key, "label key")
            _no_nul(value, f"label {key}")
        return v


class ContainerResources(_Response):
    memory_mb: int
    cpu_shares: int
    disk_mb: int
    network_mbps: int


class ClampedSize(_Response):
    """A size the request asked for that the caller's tier (or the minimum) changed."""

    field: str
    requested: int
    granted: int


class ContainerOut(_OmitNone):
    """The container object as API.md lists it; ``error_message``, ``async`` and
    ``clamped`` (on create and update answers) only when set."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset({"error_message", "async", "clamped"})

    id: str
    db_id: str
    user_id: str
    name: str
    image: str
    role: str | None
    status: ContainerStatus
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None
    idle_seconds: int
    ip_address: str | None
    expires_at: UtcDatetime | None
    resources: ContainerResources
    error_message: str | None = None
    async_: bool | None = Field(default=None, alias="async")
    clamped: list[ClampedSize] | None = None


class ContainerList(_Response):
    containers: list[ContainerOut]
    count: int
    limit: int


class ActionResult(_Response):
    message: str
    id: str
    name: str
    status: ContainerStatus


class DeleteResult(_Response):
    message: str
    id: str
    db_id: str
    name: str


class SettingsPatch(_Request):
    name: str | None = None
    memory_mb: int | None = Field(default=None, ge=0)
    cpu_shares: int | None = Field(default=None, ge=0)
    disk_mb: int | None = Field(default=None, ge=0)

    _name = field_validator("name")(_check_name)


class SettingsResult(_Response):
    message: str
    restarted: bool
    container: ContainerOut


def clamped_sizes(
    requested: ContainerCreate | SettingsPatch, granted: ContainerResources
) -> list[ClampedSize] | None:
    """The sizes asked for (a 0 or null is "not given") that came out different."""
    pairs = (
        ("memory_mb", requested.memory_mb, granted.memory_mb),
        ("cpu_shares", requested.cpu_shares, granted.cpu_shares),
        ("disk_mb", requested.disk_mb, granted.disk_mb),
    )
    out = [
        ClampedSize(field=f, requested=want, granted=got)
        for f, want, got in pairs
        if want is not None and want > 0 and want != got
    ]
    return out or None


# --- exec ------------------------------------------------------------------------------


class ExecRequest(_Request):
    """Body of ``POST /containers/{id}/exec``: exactly one of ``command`` and ``cmd``.

    ``timeout_seconds`` above the maximum is lowered to it, like resource sizes
    are, instead of failing the request; 0 or null means the default.
    """

    command: str | None = Field(default=None, min_length=1)
    cmd: list[str] | None = Field(default=None, min_length=1)
    workdir: str | None = None
    env: list[str] = Field(default_factory=list)
    user: str | None = Field(default=None, min_length=1, max_length=64)
    timeout_seconds: int = Field(default=EXEC_DEFAULT_TIMEOUT_S, ge=0)

    @field_validator("command")
    @classmethod
    def _command(cls, v: str | None) -> str | None:
        return None if v is None else _no_nul(v, "command")

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for arg in v:
                _no_nul(arg, "cmd arguments")
            if not v[0]:
                raise ValueError("cmd[0] (the program) must not be empty")
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("workdir must be an absolute path")
        return None if v is None else _no_nul(v, "workdir")

    @field_validator("env")
    @classmethod
    def _env(cls, v: list[str]) -> list[str]:
        for item in v:
            key, sep, value = item.partition("=")
            if not sep or not ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"env entry {item!r} must be K=V with K of [A-Za-z_][A-Za-z0-9_]*")
            _no_nul(value, f"env value of {key}")
        return v

    @field_validator("timeout_seconds", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        if v is None or v == 0:
            return EXEC_DEFAULT_TIMEOUT_S
        if isinstance(v, int) and not isinstance(v, bool) and v > EXEC_MAX_TIMEOUT_S:
            return EXEC_MAX_TIMEOUT_S
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> ExecRequest:
        if (self.command is None) == (self.cmd is None):
            raise ValueError("give exactly one of command (a shell string) or cmd (an argv list)")
        return self

    def argv(self) -> list[str]:
        """The program and arguments to execute; ``command`` runs under ``sh -c``."""
        if self.cmd is not None:
            return list(self.cmd)
        assert self.command is not None
        return ["/bin/sh", "-c", self.command]


class ExecStreamStart(ExecRequest):
    """The first frame of the exec stream ``/api/containers/{id}/exec/stream``: what to
    run, as for ``POST /exec``, plus ``tty`` (a PTY of ``cols`` x ``rows``).

    ``timeout_seconds`` 0 (the default) means no deadline: the process lives as long
    as the socket does; a larger value is capped like a one-shot exec's.
    """

    type: Literal["start"] = "start"
    tty: bool = False
    cols: int = Field(default=80, ge=1, le=65535)
    rows: int = Field(default=24, ge=1, le=65535)
    timeout_seconds: int = Field(default=0, ge=0)

    @field_validator("timeout_seconds", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        if v is None:
            return 0
        if isinstance(v, int) and not isinstance(v, bool) and v > EXEC_MAX_TIMEOUT_S:
            return EXEC_MAX_TIMEOUT_S
        return v


class ExecStreamFrame(BaseModel):
    """A JSON (text) frame of the exec stream, either way; output and stdin travel as
    binary frames (see the README's protocol note)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["started", "exit", "error", "eof", "resize", "signal", "ping", "pong"]
    exit_code: int | None = None
    error: str | None = None
    code: str | None = None
    cols: int | None = Field(default=None, ge=0, le=65535)
    rows: int | None = Field(default=None, ge=0, le=65535)
    signal: str | int | None = None


class ExecResult(_Response):
    stdout: str
    stderr: str
    output: str
    exit_code: int
    duration_ms: int
    truncated: bool


class Stats(_Response):
    cpu_percent: float
    cpu_usage_usec: int
    memory: int
    memory_limit: int
    pids: int
    disk_read: int
    disk_write: int
    disk_usage: int
    disk_limit: int
    net_rx: int
    net_tx: int
    oom_kills: int


# --- port forwards ---------------------------------------------------------------------

PortProtocol = Literal["tcp", "udp"]


class PortForwardCreate(_Request):
    """Body of ``POST /containers/{id}/port-forwards``.

    ``host_port`` 0 or absent lets the daemon choose a free port in its configured
    range (clients that send zero values for unset fields get the same).
    """

    container_port: int = Field(ge=1, le=65535)
    host_port: int | None = Field(default=None, ge=0, le=65535)
    protocol: PortProtocol = "tcp"


class PortForwardOut(_Response):
    """A forward from ``host:host_port`` on the daemon's host to the container's port."""

    id: str
    container_id: str
    container_port: int
    host_port: int
    protocol: PortProtocol
    host: str
    created_at: UtcDatetime


class PortForwardList(_Response):
    port_forwards: list[PortForwardOut]
    count: int


class PortForwardDeleted(_Response):
    message: str
    id: str
    container_id: str
    host_port: int
    protocol: PortProtocol


# --- volumes ---------------------------------------------------------------------------


class VolumeOut(_Response):
    """One of the caller's /home/user volumes: in use by the container of its name, or
    kept (that container was deleted) until the same name is created again."""

    name: str
    # The size the volume holds at most, and what it takes on disk now (null where the
    # storage cannot tell).
    disk_mb: int
    used_bytes: int | None
    created_at: UtcDatetime
    last_used_at: UtcDatetime
    in_use: bool
    container_id: str | None
    # When a kept volume is removed for age (null: in use, or no age limit).
    expires_at: UtcDatetime | None


class VolumeList(_Response):
    volumes: list[VolumeOut]
    count: int
    # The kept volumes (not in use) against the tier's caps.
    kept: int
    kept_limit: int
    kept_mb: int
    kept_mb_limit: int


class VolumeDeleted(_Response):
    message: str
    name: str


# --- files -----------------------------------------------------------------------------


class FileInfo(_Response):
    name: str
    path: str
    size: int
    mode: str
    mod_time: UtcDatetime
    is_dir: bool


class FileList(_Response):
    path: str
    files: list[FileInfo]
    count: int


class FilePathBody(_Request):
    """Optional JSON body of the file endpoints, for clients that do not use ``?path=``."""

    path: str = Field(min_length=1)


# --- images and roles ------------------------------------------------------------------


class ImageInfo(_Response):
    name: str
    display_name: str
    description: str
    category: str
    tags: list[str]
    popular: bool
    # A create can use it now: it is local, or the catalogue lets a create pull it.
    available: bool
    # rexecd's additions: other names a create accepts, what is pulled, whether it is
    # already in the local store.
    aliases: list[str] = Field(default_factory=list)
    reference: str | None = None
    local: bool = False


class ImageList(_Response):
    images: list[ImageInfo]
    count: int


class Role(_Response):
    id: str
    name: str
    description: str
    packages: list[str]


class RoleList(_Response):
    roles: list[Role]


class ImportResult(_Response):
    name: str
    digest: str
    size: int
    layers: int


class PullRequest(_Request):
    """``POST /api/images/pull``: an image reference, and the local name to give it."""

    reference: str = Field(min_length=1, max_length=512)
    name: str | None = Field(default=None, max_length=255)


class PullOut(ImportResult):
    source: str
    downloaded: int
    layers_fetched: int
    layers_present: int
    seconds: float


class LocalImage(_Response):
    """An image in the local store (``GET /api/images/local``)."""

    name: str
    digest: str
    size: int
    layers: list[str]
    created: UtcDatetime
    imported: UtcDatetime
    # Containers made from it (their leases): it cannot be removed while any exist.
    containers: int


class LocalImageList(_Response):
    images: list[LocalImage]
    count: int


class ImageRemoved(_Response):
    message: str
    name: str
    digest: str
    layers_removed: int


class PruneOut(_Response):
    images_removed: list[str]
    layers_removed: int
    bytes_freed: int


# --- tokens ----------------------------------------------------------------------------


class TokenCreate(_Request):
    name: str = Field(min_length=1, max_length=64)
    scopes: list[Scope] | None = None
    expires_in: int | None = Field(default=None, ge=1, le=3650, description="days")


class TokenOut(_OmitNone):
    """A token as listed: never the secret itself."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset({"last_used_at"})

    id: str
    name: str
    token_prefix: str
    scopes: list[Scope]
    expires_at: UtcDatetime | None
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None = None


class TokenCreated(TokenOut):
    """The 201 answer to ``POST /api/tokens``: the only time the secret is shown."""

    token: str


class TokenList(_Response):
    tokens: list[TokenOut]
    count: int


class TokenValidation(_Response):
    """Answer of ``GET /api/tokens/validate``."""

    valid: bool
    user_id: str
    user_name: str
    tier: TierName
    scopes: list[Scope]
    token_id: str
    expires_at: UtcDatetime | None


# --- daemon ----------------------------------------------------------------------------


class Health(_OmitNone):
    """``status`` is "ok", or "degraded" with ``reason`` (e.g. no usable cgroups)."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset({"reason"})

    status: str
    containers_total: int
    containers_running: int
    cgroup: str
    version: str
    reason: str | None = None


class Version(_Response):
    version: str
    build: str


class ErrorBody(BaseModel):
    """Every error answer: ``error`` always, anything else beside it."""

    model_config = ConfigDict(extra="allow")

    error: str
    code: str | None = None
    details: Any = None


# --- streams and frames ----------------------------------------------------------------


class _ExecStreamKind(BaseModel):
    """One kind of JSON frame of the exec stream, as the OpenAPI document spells it (the
    wire is ExecStreamFrame's; these only name each kind's fields)."""

    model_config = ConfigDict(extra="forbid")


class ExecStreamStarted(_ExecStreamKind):
    """Server: the process runs; output follows."""

    type: Literal["started"]


class ExecStreamExit(_ExecStreamKind):
    """Server, last: the exit status (126/127 cannot run, 128+N signal N)."""

    type: Literal["exit"]
    exit_code: int


class ExecStreamError(ErrorBody):
    """Server, last: an error answer's body (``invalid_request``, ``exec_timeout``...)."""

    type: Literal["error"]


class ExecStreamPong(_ExecStreamKind):
    type: Literal["pong"]


class ExecStreamEof(_ExecStreamKind):
    """Client: close stdin (on a PTY: Ctrl-D)."""

    type: Literal["eof"]


class ExecStreamResize(_ExecStreamKind):
    type: Literal["resize"]
    cols: int = Field(ge=1, le=65535)
    rows: int = Field(ge=1, le=65535)


class ExecStreamSignal(_ExecStreamKind):
    """Client: a signal for the process group, by name (HUP INT QUIT TERM KILL USR1
    USR2 WINCH CONT STOP TSTP ALRM) or number."""

    type: Literal["signal"]
    signal: str | int


class ExecStreamPing(_ExecStreamKind):
    """Client: answered with a pong."""

    type: Literal["ping"]


EXEC_STREAM_SERVER_FRAMES: tuple[type[BaseModel], ...] = (
    ExecStreamStarted,
    ExecStreamPong,
    ExecStreamExit,
    ExecStreamError,
)
EXEC_STREAM_CLIENT_FRAMES: tuple[type[BaseModel], ...] = (
    ExecStreamEof,
    ExecStreamResize,
    ExecStreamSignal,
    ExecStreamPing,
)


EventType = Literal[
    "list", "created", "updated", "deleted", "started", "stopped", "progress", "oom", "pong"
]


class Event(_OmitNone):
    """A frame of the ``/containers/events`` WebSocket (server to client)."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset(
        {"container", "containers", "timestamp", "stage", "message", "progress"}
    )

    type: EventType
    container: ContainerOut | None = None
    containers: list[ContainerOut] | None = None
    timestamp: UtcDatetime | None = None
    # ``progress`` events: where a creation is (the stream's stage, message, percent).
    stage: str | None = None
    message: str | None = None
    progress: int | None = None


StreamStage = Literal["validating", "pulling", "creating", "starting", "configuring", "ready"]


class StreamProgress(_OmitNone):
    """One ``data:`` frame of ``POST /containers/stream``; a failure sets ``error`` at its stage."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset({"container_id", "container", "error"})

    stage: StreamStage
    message: str
    progress: int = Field(ge=0, le=100)
    complete: bool = False
    container_id: str | None = None
    container: ContainerOut | None = None
    error: str | None = None


TerminalFrameType = Literal[
    # client to server
    "input",
    "resize",
    # both ways
    "ping",
    "pong",
    # server to client
    "connected",
    "shell_starting",
    "shell_ready",
    "output",
    "stats",
    "error",
    "container_status",
]


class TerminalFrame(BaseModel):
    """A JSON frame of ``/ws/terminal/{id}``, either way.

    Unknown keys are ignored rather than refused: browser terminals add their own
    (timestamps, ids), and a frame is not a request body to be answered with a 400.
    """

    model_config = ConfigDict(extra="ignore")

    type: TerminalFrameType
    data: str | None = None
    # struct winsize holds unsigned shorts.
    cols: int | None = Field(default=None, ge=0, le=65535)
    rows: int | None = Field(default=None, ge=0, le=65535)
    # On the frame that ends a session because the shell exited: its exit status.
    exit_code: int | None = None

    def to_wire(self) -> str:
        return self.model_dump_json(exclude_none=True)


# --- the stored container --------------------------------------------------------------


class ContainerRecord(BaseModel):
    """One row of the containers table, as the service works with it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    db_id: str = Field(default_factory=new_db_id)
    id: str = Field(default_factory=new_runtime_id)
    user_id: str
    name: str
    image: str
    role: str | None = None
    status: ContainerStatus = "creating"
    error_message: str | None = None
    created_at: UtcDatetime = Field(default_factory=utcnow)
    last_used_at: UtcDatetime | None = None
    started_at: UtcDatetime | None = None
    expires_at: UtcDatetime | None = None
    resources: ContainerResources
    environment: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network_mode: NetworkMode = "default"
    ip_address: str | None = None
    pid: int | None = None
    # Start time of pid in clock ticks since boot (/proc/PID/stat field 22): with it a
    # restarted daemon can tell its container's init from a recycled pid.
    pid_start_time: int | None = None
    spec: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _runtime_id(cls, v: str) -> str:
        if not RUNTIME_ID_RE.fullmatch(v):
            raise ValueError("runtime id must be 64 lower-case hex characters")
        return v

    def idle_seconds(self, now: datetime | None = None) -> int:
        since = self.last_used_at or self.created_at
        return max(0, int(((now or utcnow()) - since).total_seconds()))

    def to_out(self, now: datetime | None = None, *, async_: bool | None = None) -> ContainerOut:
        return ContainerOut(
            id=self.id,
            db_id=self.db_id,
            user_id=self.user_id,
            name=self.name,
            image=self.image,
            role=self.role,
            status=self.status,
            created_at=self.created_at,
            last_used_at=self.last_used_at,
            idle_seconds=self.idle_seconds(now),
            ip_address=self.ip_address,
            expires_at=self.expires_at,
            resources=self.resources,
            # Why it is not running: the failure, or the cause of the last exit (an
            # OOM kill, a signal, the session's end, a daemon restart).
            error_message=self.error_message if self.status != "running" else None,
            async_=async_,
        )
