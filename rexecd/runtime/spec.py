"""What the runtime is asked to run: container, process and exec specs passed to the spawner.

These are internal IPC messages between the runtime and its spawner, not API or
state models: plain frozen dataclasses, so that the spawner (whose size is paid
on every fork) never imports pydantic. The API layer validates user input before
anything here is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


def _plain(obj: Any) -> Any:
    """``obj`` with dataclasses as dicts of their fields, all the way down. Lists are
    new; their strings and numbers are shared, not deep-copied as ``dataclasses.asdict``
    does (a tenth of its cost, on every start and exec)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: type[Any], data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class ProcessSpec:
    """The program to exec and the identity and environment it runs with.

    A container whose ``args`` are empty runs rexec-init alone (idle): it is an
    environment entered through exec and terminals, stopped by SIGTERM.
    """

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    # Capability names as python-prctl spells them ("chown", "net_bind_service", ...).
    capabilities: list[str] = field(default_factory=list)
    no_new_privs: bool = True
    tty: bool = False
    # Seccomp BPF programs (base64), installed in order as the last step before execve.
    # [] runs unconfined; None means nobody chose, and the child refuses to exec it.
    seccomp: list[str] | None = None

    def __post_init__(self) -> None:
        if self.seccomp and not self.no_new_privs:
            # Without CAP_SYS_ADMIN (dropped by then) the kernel wants no_new_privs.
            raise ValueError("a seccomp filter needs no_new_privs")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessSpec:
        spec: ProcessSpec = _build(cls, data)
        return spec


@dataclass(frozen=True)
class BindMount:
    """A host directory bind-mounted at ``target`` (resolved inside the container root)."""

    source: str
    target: str
    readonly: bool = False


@dataclass(frozen=True)
class RootfsSpec:
    """An overlay root: read-only image layers (lowest first) under a private upper dir."""

    lowerdirs: list[str]
    upperdir: str
    workdir: str
    target: str


@dataclass(frozen=True)
class UsernsSpec:
    """The host ids a container's user namespace maps 0..size-1 to: base..base+size-1."""

    base: int
    size: int

    def __post_init__(self) -> None:
        if self.base <= 0 or self.size <= 0 or self.base + self.size > 1 << 32:
            raise ValueError(f"bad id range {self.base}+{self.size}")


DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DEFAULT_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    # Every loop device's backing_file (other tenants' volume images, by user id and
    # container name) is under devices/virtual/block; the other three only list the
    # host's block devices, which a container has none of.
    "/sys/devices/virtual/block",
    "/sys/block",
    "/sys/class/block",
    "/sys/dev/block",
)


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the spawner's child needs to build and enter a new container."""

    id: str
    hostname: str
    rootfs: RootfsSpec
    process: ProcessSpec
    mounts: list[BindMount] = field(default_factory=list)
    # cgroup.procs files the child writes its own pid to before it unshares the
    # cgroup namespace, so the container sees its cgroup as "/".
    cgroup_procs: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=lambda: list(DEFAULT_READONLY_PATHS))
    masked_paths: list[str] = field(default_factory=lambda: list(DEFAULT_MASKED_PATHS))
    # Wait for the caller's Go before exec (network set-up happens in between).
    wait_for_go: bool = True
    # A user namespace of its own mapping root to these host ids; None: the host's.
    userns: UsernsSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _plain(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContainerSpec:
        d = dict(data)
        d["rootfs"] = _build(RootfsSpec, d["rootfs"])
        d["process"] = ProcessSpec.from_dict(d["process"])
        d["mounts"] = [_build(BindMount, m) for m in d.get("mounts", [])]
        if d.get("userns") is not None:
            d["userns"] = _build(UsernsSpec, d["userns"])
        spec: ContainerSpec = _build(cls, d)
        return spec


@dataclass(frozen=True)
class ExecSpec:
    """A process to start inside an existing container (exec and terminals)."""

    container_pid: int
    process: ProcessSpec
    cgroup_procs: list[str] = field(default_factory=list)
    # The container has a user namespace of its own: join it last (see child.enter).
    join_userns: bool = False

    def __post_init__(self) -> None:
        if not self.process.args:
            raise ValueError("an exec needs a command")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _plain(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecSpec:
        d = dict(data)
        d["process"] = ProcessSpec.from_dict(d["process"])
        spec: ExecSpec = _build(cls, d)
        return spec
