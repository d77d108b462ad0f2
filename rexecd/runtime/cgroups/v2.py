"""The cgroup v2 driver: one unified hierarchy, controller delegation, cgroup.kill, inotify OOM."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path

from rexecd import _native as n
from rexecd.errors import Conflict, NotFound, RexecError, RuntimeFailure
from rexecd.runtime.cgroups import (
    DEFAULT_ROOT,
    Cgroup,
    CgroupDriver,
    CgroupLimits,
    CgroupStats,
    IoLimit,
    check_name,
)
from rexecd.runtime.cgroups._files import (
    failure,
    flat_keyed,
    procs,
    read,
    read_int,
    read_optional,
    subtree_pids,
    write,
)
from rexecd.runtime.cgroups._reaper import kill_all, rmdir_retry, rmdir_tree, wait_for
from rexecd.runtime.cgroups.placement import (
    DAEMON_LEAF,
    own_cgroups,
    read_proc_cgroup,
    resolve_parent,
    strip_daemon_leaf,
    under,
)

CONTROLLERS = ("cpu", "memory", "io", "pids")
CPU_PERIOD_US = 100_000
# memory.high below memory.max makes the kernel throttle and reclaim before it has to
# OOM-kill at memory.max.
MEMORY_HIGH_PERCENT = 95
_PAGE = 4096


def _io_max_line(lim: IoLimit) -> str:
    def v(x: int | None) -> str:
        return "max" if x is None else str(x)

    return (
        f"{lim.major}:{lim.minor} rbps={v(lim.rbps)} wbps={v(lim.wbps)}"
        f" riops={v(lim.riops)} wiops={v(lim.wiops)}"
    )


class V2Cgroup(Cgroup):
    """A container's cgroup in the unified hierarchy."""

    def __init__(self, name: str, path: Path, root: Path) -> None:
        self.name = name
        self.path = path
        self._rel = frozenset({"/" + str(path.relative_to(root))})
        self._join = [str(path / "cgroup.procs")]

    def __repr__(self) -> str:
        return f"V2Cgroup({self.path})"

    def join_paths(self) -> list[str]:
        return list(self._join)

    def add_pid(self, pid: int) -> None:
        write(self.path / "cgroup.procs", str(pid), "cgroup add pid")

    def pids(self) -> list[int]:
        return subtree_pids([self.path])

    def _set(self, fname: str, value: str, required: bool) -> None:
        # A limit that was asked for must be enforced (a missing file is an error); a
        # knob being reset to "unlimited" on a controller we do not have is a no-op.
        path = self.path / fname
        if required or path.exists():
            write(path, value)

    def apply(self, limits: CgroupLimits) -> None:
        millis = limits.cpu_millicores
        quota = "max" if millis is None else str(millis * CPU_PERIOD_US // 1000)
        self._set("cpu.max", f"{quota} {CPU_PERIOD_US}", millis is not None)
        self._set("cpu.weight", str(limits.cpu_weight or 100), limits.cpu_weight is not None)
        self._apply_memory(limits.memory_bytes)
        pids = limits.pids_max
        self._set("pids.max", "max" if pids is None else str(pids), pids is not None)
        self._apply_io(limits.io)
        self._apply_io_weight(limits.io_weight)

    def _apply_memory(self, mem: int | None) -> None:
        if mem is None:
            for fname in ("memory.max", "memory.high", "memory.swap.max"):
                self._set(fname, "max", False)
            return
        high = max(mem * MEMORY_HIGH_PERCENT // 100 // _PAGE * _PAGE, _PAGE)
        self._set("memory.max", str(mem), True)
        self._set("memory.high", str(high), True)
        # memory.swap.max is absent when the kernel does no swap accounting: then the
        # container cannot be given swap of its own either.
        self._set("memory.swap.max", "0", False)

    def _apply_io(self, limits: list[IoLimit]) -> None:
        path = self.path / "io.max"
        if not limits and not path.exists():
            return
        wanted = {f"{lim.major}:{lim.minor}" for lim in limits}
        # Declarative: devices limited before but not now get their limits lifted.
        for line in (read_optional(path) or "").splitlines():
            dev = line.split(" ", 1)[0]
            if dev and dev not in wanted:
                write(path, f"{dev} rbps=max wbps=max riops=max wiops=max")
        for lim in limits:
            write(path, _io_max_line(lim))

    def _apply_io_weight(self, weight: int | None) -> None:
        # io.weight needs the io.cost controller; BFQ offers io.bfq.weight (1..1000)
        # instead. Neither present: the scheduler has no proportional control to set.
        for fname, top in (("io.weight", 10000), ("io.bfq.weight", 1000)):
            path = self.path / fname
            if path.exists():
                write(path, f"default {min(weight or 100, top)}")
                return

    def stats(self) -> CgroupStats:
        p = self.path
        limit = (read_optional(p / "memory.max") or "max").strip()
        rbytes = wbytes = 0
        for line in (read_optional(p / "io.stat") or "").splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            rbytes += int(fields.get("rbytes", 0))
            wbytes += int(fields.get("wbytes", 0))
        return CgroupStats(
            cpu_usage_usec=flat_keyed(read_optional(p / "cpu.stat")).get("usage_usec", 0),
            memory=read_int(p / "memory.current"),
            memory_limit=None if limit == "max" else int(limit),
            pids=read_int(p / "pids.current"),
            io_read_bytes=rbytes,
            io_write_bytes=wbytes,
            oom_kills=flat_keyed(read_optional(p / "memory.events")).get("oom_kill", 0),
        )

    def is_populated(self) -> bool:
        events = read_optional(self.path / "cgroup.events")
        if events is None:
            return bool(self.pids())
        return flat_keyed(events).get("populated", 0) == 1

    def _freeze(self, timeout: float) -> None:
        path = self.path / "cgroup.freeze"
        if not path.exists():
            return
        write(path, "1", "cgroup freeze")
        # A task in uninterruptible sleep delays freezing; kill_all proceeds anyway.
        wait_for(
            lambda: flat_keyed(read_optional(self.path / "cgroup.events")).get("frozen") == 1,
            timeout,
        )

    def _thaw(self) -> None:
        path = self.path / "cgroup.freeze"
        if path.exists():
            with contextlib.suppress(RuntimeFailure):
                write(path, "0", "cgroup thaw")

    def kill(self, timeout: float = 10.0) -> None:
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists() and self.is_populated():
            # cgroup.kill (5.14+) kills the subtree atomically, forks in flight included.
            write(kill_file, "1", "cgroup kill")
            if wait_for(lambda: not self.is_populated(), timeout):
                return
            raise RuntimeFailure(
                "cgroup kill", f"{self.path} still populated after {timeout}s", errno.EBUSY
            )
        kill_all(self.pids, self._rel, self._freeze, self._thaw, timeout)

    def destroy(self, timeout: float = 10.0) -> None:
        self.kill(timeout)
        rmdir_tree(self.path, timeout)

    def oom_fd(self) -> int | None:
        path = self.path / "memory.events"
        if not path.exists():
            return None
        try:
            return n.inotify_watch(str(path), n.IN_MODIFY)
        except OSError as exc:
            raise failure("cgroup watch memory.events", exc, path) from exc


class V2Driver(CgroupDriver):
    """Containers' cgroups under one parent in the unified hierarchy."""

    version = 2

    def __init__(
        self, parent: str = "rexecd", root: Path | None = None, *, proc_cgroup: str | None = None
    ) -> None:
        self.root = root or DEFAULT_ROOT
        own = own_cgroups(read_proc_cgroup(proc_cgroup)).get("", "/")
        self.own = strip_daemon_leaf(own)
        self.parent = resolve_parent(parent, self.own)
        self.parent_dir = under(self.root, self.parent)
        self._lock = threading.Lock()
        self._prepared = False

    def _chain(self) -> list[str]:
        """The cgroup paths from the root down to the parent, both included."""
        parts = self.parent.strip("/").split("/")
        return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]

    def prepare(self) -> None:
        with self._lock:
            if self._prepared:
                return
            for cg in self._chain():
                directory = under(self.root, cg)
                if cg != "/":
                    try:
                        directory.mkdir(exist_ok=True)
                    except OSError as exc:
                        raise failure("cgroup create parent", exc, directory) from exc
                self._enable_controllers(cg, directory)
            self._prepared = True

    def _enable_controllers(self, cg: str, directory: Path) -> None:
        offered = read(directory / "cgroup.controllers").split()
        enabled = read(directory / "cgroup.subtree_control").split()
        missing = [c for c in CONTROLLERS if c in offered and c not in enabled]
        if not missing:
            return
        if cg != "/" and procs(directory):
            if cg != self.own:
                raise RuntimeFailure(
                    "cgroup enable controllers",
                    f"{directory} holds processes, and cgroup v2 lets no cgroup with"
                    " processes enable controllers for its children",
                    errno.EBUSY,
                )
            self._move_into_leaf(directory)
        write(
            directory / "cgroup.subtree_control",
            " ".join("+" + c for c in missing),
            "cgroup enable controllers",
        )

    def _move_into_leaf(self, own_dir: Path) -> None:
        """Move every process of our own (delegated) cgroup into ``<own>/daemon``."""
        leaf = own_dir / DAEMON_LEAF
        try:
            leaf.mkdir(exist_ok=True)
        except OSError as exc:
            raise failure("cgroup create daemon leaf", exc, leaf) from exc
        # Bounded: processes may fork while we move them; a real cgroup empties within
        # a round or two, and writing subtree_control reports EBUSY if it did not.
        for _ in range(10):
            pids = procs(own_dir)
            if not pids:
                return
            for pid in pids:
                try:
                    write(leaf / "cgroup.procs", str(pid), "cgroup move daemon into leaf")
                except RuntimeFailure as exc:
                    if exc.errno != errno.ESRCH:
                        raise

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        check_name(name)
        self.prepare()  # once per driver: it remembers
        path = self.parent_dir / name
        try:
            try:
                path.mkdir()
            except FileNotFoundError:
                # The parent was removed since: make it (and its controllers) again.
                self._prepared = False
                self.prepare()
                path.mkdir()
        except FileExistsError as exc:
            raise Conflict(f"cgroup {name} already exists", path=str(path)) from exc
        except OSError as exc:
            raise failure("cgroup create", exc, path) from exc
        cg = V2Cgroup(name, path, self.root)
        try:
            cg.apply(limits)
        except BaseException:
            with contextlib.suppress(RexecError):
                cg.destroy(timeout=2.0)
            raise
        return cg

    def open(self, name: str) -> Cgroup:
        check_name(name)
        path = self.parent_dir / name
        if not path.is_dir():
            raise NotFound(f"cgroup {name} not found", path=str(path))
        return V2Cgroup(name, path, self.root)

    def list(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.parent_dir) if e.is_dir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise failure("cgroup list", exc, self.parent_dir) from exc

    def available(self) -> dict[str, bool]:
        chain = [under(self.root, cg) for cg in reversed(self._chain())]
        nearest = next((d for d in chain if (d / "cgroup.controllers").exists()), None)
        offered = set(read(nearest / "cgroup.controllers").split()) if nearest else set()
        # The root has no cgroup.freeze/cgroup.kill: look in a non-root cgroup we know
        # (before prepare() on a daemon in the root cgroup there may be none yet).
        probes = [d for d in [*chain[:-1], under(self.root, self.own)] if d != self.root]
        features = next((d for d in probes if (d / "cgroup.procs").exists()), None)
        out = {c: c in offered for c in CONTROLLERS}
        out["freezer"] = features is not None and (features / "cgroup.freeze").exists()
        out["kill"] = features is not None and (features / "cgroup.kill").exists()
        # Device access control on v2 is a BPF program, which this driver does not load.
        out["devices"] = False
        return out

    def remove_parent(self) -> None:
        with self._lock:
            rmdir_retry(self.parent_dir, time.monotonic() + 2.0)
            self._prepared = False
