"""The cgroup contract: limit and stat models, Cgroup/CgroupDriver, the layout probe."""

from __future__ import annotations

import abc
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rexecd.errors import InvalidRequest, RexecError, RuntimeUnavailable

DEFAULT_ROOT = Path("/sys/fs/cgroup")

# A name becomes a directory beside the kernel's interface files: no dots, so it can
# never collide with "memory.max" or "cgroup.procs", and no path separators.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio", "freezer", "devices")


class IoLimit(BaseModel):
    """Throttle on one block device (whole disk, not a partition); None means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    major: int = Field(ge=0)
    minor: int = Field(ge=0)
    rbps: int | None = Field(default=None, ge=1)
    wbps: int | None = Field(default=None, ge=1)
    riops: int | None = Field(default=None, ge=1)
    wiops: int | None = Field(default=None, ge=1)


class CgroupLimits(BaseModel):
    """The complete resource policy of one container; ``None`` means "no limit".

    ``Cgroup.apply`` is declarative: it makes the cgroup match this object exactly, so a
    live update passes the whole desired policy, and a field set to ``None`` lifts the
    limit it stands for.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The kernel refuses a CFS quota under 1 ms per 100 ms period: 10 millicores.
    cpu_millicores: int | None = Field(default=None, ge=10)
    cpu_weight: int | None = Field(default=None, ge=1, le=10000)
    memory_bytes: int | None = Field(default=None, ge=4096)
    pids_max: int | None = Field(default=512, ge=1)
    io: list[IoLimit] = Field(default_factory=list)
    io_weight: int | None = Field(default=None, ge=1, le=10000)


class CgroupStats(BaseModel):
    """Counters of one cgroup, including its descendants; 0 where a controller is absent."""

    cpu_usage_usec: int
    memory: int
    memory_limit: int | None
    pids: int
    io_read_bytes: int
    io_write_bytes: int
    oom_kills: int


class Cgroup(abc.ABC):
    """One container's cgroup (in every hierarchy it uses, on v1)."""

    name: str

    @abc.abstractmethod
    def join_paths(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes "0" (itself) into to join every
        controller. Precomputed: a freshly forked child calls this before it unshares
        its cgroup namespace, so it must not touch the file system."""

    @abc.abstractmethod
    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (its whole thread group) into this cgroup."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Every process in this cgroup and its descendants, sorted."""

    @abc.abstractmethod
    def apply(self, limits: CgroupLimits) -> None:
        """Make the limits match ``limits``; safe on a running container (live update)."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """Current usage counters."""

    @abc.abstractmethod
    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process, including ones that double-fork to escape, and wait
        until the cgroup is empty. Raises ``RuntimeFailure`` past ``timeout`` seconds."""

    @abc.abstractmethod
    def destroy(self, timeout: float = 10.0) -> None:
        """Kill, then remove the cgroup (and anything nested in it) everywhere. Idempotent."""

    @abc.abstractmethod
    def oom_fd(self) -> int | None:
        """A new non-blocking fd that becomes readable when the kernel OOM-kills in here.

        The caller owns it (close it when done). Readable means "look now", not a
        count: drain it with ``os.read(fd, 4096)`` and compare ``stats().oom_kills`` with
        the value seen before; the count can lag the wake-up by a moment (v1 signals as
        the OOM starts), so re-check shortly after, or when the container exits.
        On v2 it is an inotify watch on ``memory.events``, which also fires on other
        memory events (memory.high); on v1 an eventfd registered on
        ``memory.oom_control``, which also fires once when the cgroup is removed.
        ``None`` when the memory controller is unavailable.
        """

    @abc.abstractmethod
    def is_populated(self) -> bool:
        """Whether any process lives in this cgroup or below it."""


class CgroupDriver(abc.ABC):
    """Creates and finds the containers' cgroups under the daemon's own parent cgroup.

    Two drivers implement it: ``v2.V2Driver`` (unified hierarchy, pure-v2 hosts and
    systemd ``Delegate=yes`` units) and ``v1.V1Driver`` (one hierarchy per controller,
    hybrid hosts); ``open_driver`` picks one by probing. Every kernel error leaves a
    driver as a ``RuntimeFailure`` naming the step ("cgroup write memory.max") and path.

    ``parent`` is absolute ("/rexecd") from the hierarchy root, or relative
    ("containers") to the daemon's own cgroup as read from ``/proc/self/cgroup``
    (``proc_cgroup`` gives that file's text instead, for tests).
    """

    version: int

    @abc.abstractmethod
    def __init__(
        self, parent: str = "rexecd", root: Path | None = None, *, proc_cgroup: str | None = None
    ) -> None: ...

    @abc.abstractmethod
    def prepare(self) -> None:
        """Create the parent and make controllers available below it; idempotent.
        ``create`` calls it; the daemon may call it at start-up to fail early."""

    @abc.abstractmethod
    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        """A new cgroup ``name`` under the parent with ``limits`` applied.
        Raises ``Conflict`` if it exists; on failure nothing is left behind."""

    @abc.abstractmethod
    def open(self, name: str) -> Cgroup:
        """An existing cgroup (re-adoption after a daemon restart); ``NotFound`` if absent."""

    @abc.abstractmethod
    def list(self) -> list[str]:
        """Names of the cgroups under the parent, sorted (to reconcile orphans)."""

    @abc.abstractmethod
    def available(self) -> dict[str, bool]:
        """Which controllers and features this host lets us use, by name."""

    @abc.abstractmethod
    def remove_parent(self) -> None:
        """Remove the (empty) parent cgroup; idempotent. For tear-down and uninstall."""


def check_name(name: str) -> str:
    """``name`` if it is usable as a cgroup directory name, else ``InvalidRequest``."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid cgroup name {name!r}: use [A-Za-z0-9_-], at most 128")
    return name


def _unescape_mount_field(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def probe(root: Path = DEFAULT_ROOT, *, mounts: Path = Path("/proc/self/mounts")) -> int:
    """2 if ``root`` is a cgroup2 mount, 1 if v1 controller hierarchies are mounted below it.

    The mount table decides for real mounts (the last mount on a point is the visible
    one); for a directory that is no mount point (a test's fake tree) the files decide.
    Raises ``RuntimeUnavailable`` when neither layout is found.
    """
    root_s = str(root).rstrip("/") or "/"
    at_root: list[str] = []
    v1_below = False
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape_mount_field(fields[1]), fields[2]
        if point == root_s:
            at_root.append(fstype)
        elif fstype == "cgroup" and point.startswith(root_s.rstrip("/") + "/"):
            v1_below = True
    if at_root and at_root[-1] == "cgroup2":
        return 2
    if v1_below:
        return 1
    if (root / "cgroup.controllers").exists():
        return 2
    if any((root / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return 1
    raise RuntimeUnavailable(f"no cgroup v1 or v2 hierarchy found at {root}")


def open_driver(
    parent: str, root: Path | None = None, *, proc_cgroup: str | None = None
) -> CgroupDriver:
    """The driver for whichever cgroup layout ``probe`` finds at ``root``."""
    version = probe(root or DEFAULT_ROOT)
    # Imported here: the drivers import this module for the interface they implement.
    if version == 2:
        from rexecd.runtime.cgroups.v2 import V2Driver

        return V2Driver(parent, root, proc_cgroup=proc_cgroup)
    from rexecd.runtime.cgroups.v1 import V1Driver

    return V1Driver(parent, root, proc_cgroup=proc_cgroup)


@dataclass(frozen=True)
class DriverChoice:
    """What probing found: the driver, or None and why no hierarchy is usable."""

    driver: CgroupDriver | None
    reason: str = ""


def choose_driver(parent: str, root: Path | None = None) -> DriverChoice:
    """The driver for ``parent`` under ``root``, or why there is none. Whether
    containers may then run without limits is the caller's policy: the daemon refuses
    them unless its config allows it."""
    try:
        return DriverChoice(open_driver(parent, root))
    except RexecError as exc:
        return DriverChoice(None, exc.message)


def open_driver_or_none(parent: str) -> CgroupDriver | None:
    """The host's driver, or None (logged) where no hierarchy is usable: ``rexecd run``
    then runs its container without a cgroup rather than not at all."""
    choice = choose_driver(parent)
    if choice.driver is None:
        logging.getLogger(__name__).warning(
            "cgroups unavailable, containers run without limits: %s", choice.reason
        )
    return choice.driver


__all__ = [
    "DEFAULT_ROOT",
    "Cgroup",
    "CgroupDriver",
    "CgroupLimits",
    "CgroupStats",
    "DriverChoice",
    "IoLimit",
    "check_name",
    "choose_driver",
    "open_driver",
    "open_driver_or_none",
    "probe",
]
