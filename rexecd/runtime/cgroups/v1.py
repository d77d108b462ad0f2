"""The cgroup v1 driver: one directory per controller hierarchy, freezer kill, eventfd OOM."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

from rexecd.errors import Conflict, NotFound, RexecError, RuntimeFailure
from rexecd.runtime.cgroups import (
    DEFAULT_ROOT,
    V1_CONTROLLERS,
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
    read_int,
    read_optional,
    subtree_pids,
    write,
)
from rexecd.runtime.cgroups._reaper import kill_all, rmdir_retry, rmdir_tree, wait_for
from rexecd.runtime.cgroups.placement import (
    own_cgroups,
    read_proc_cgroup,
    resolve_parent,
    under,
)

CPU_PERIOD_US = 100_000
# Limits at or above this read back from memory.limit_in_bytes mean "unlimited"
# (the kernel reports PAGE_COUNTER_MAX pages, 9223372036854771712 on 64-bit).
_UNLIMITED = 1 << 62

# What a container may open and mknod: the devices of a minimal /dev, the
# controlling terminal and /dev/ptmx with its devpts slaves (major 136).
DEVICE_ALLOW = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts/*
)

# blkio.throttle file per IoLimit field; one "MAJ:MIN value" rule per write, 0 removes.
_THROTTLE = (
    ("rbps", "blkio.throttle.read_bps_device"),
    ("wbps", "blkio.throttle.write_bps_device"),
    ("riops", "blkio.throttle.read_iops_device"),
    ("wiops", "blkio.throttle.write_iops_device"),
)


def cpu_shares(weight: int | None) -> int:
    """cpu.shares for a v2 cpu.weight: proportional, so the defaults (100, 1024) match."""
    if weight is None:
        return 1024
    return max(2, min(262144, weight * 1024 // 100))


class V1Cgroup(Cgroup):
    """A container's cgroup: one directory in each controller hierarchy we use."""

    def __init__(self, name: str, dirs: dict[str, Path], hierarchies: dict[str, Path]) -> None:
        self.name = name
        self.dirs = dirs
        # Co-mounted controllers (cpu,cpuacct) share one directory: act on it once.
        self._unique = sorted(set(dirs.values()))
        self._rel = frozenset("/" + str(d.relative_to(hierarchies[c])) for c, d in dirs.items())
        self._join = [str(d / "cgroup.procs") for d in self._unique]

    def __repr__(self) -> str:
        return f"V1Cgroup({self.name}, {self._unique})"

    def join_paths(self) -> list[str]:
        return list(self._join)

    def add_pid(self, pid: int) -> None:
        for d in self._unique:
            write(d / "cgroup.procs", str(pid), "cgroup add pid")

    def pids(self) -> list[int]:
        return subtree_pids(self._unique)

    def _path(self, controller: str, fname: str) -> Path | None:
        d = self.dirs.get(controller)
        return None if d is None else d / fname

    def _set(self, controller: str, fname: str, value: str, required: bool) -> None:
        # A limit that was asked for must be enforced; resetting a knob this host does
        # not have is a no-op.
        path = self._path(controller, fname)
        if path is not None and (required or path.exists()):
            write(path, value)
        elif required:
            raise RuntimeFailure(
                f"cgroup write {fname}", f"controller {controller} is not mounted", errno.ENOENT
            )

    def setup_devices(self) -> None:
        """Deny every device, then allow only those of a minimal /dev (DEVICE_ALLOW)."""
        if "devices" not in self.dirs:
            return
        self._set("devices", "devices.deny", "a", True)
        for rule in DEVICE_ALLOW:
            self._set("devices", "devices.allow", rule, True)

    def apply(self, limits: CgroupLimits) -> None:
        self._apply(limits, fresh=False)

    def _apply(self, limits: CgroupLimits, fresh: bool) -> None:
        """``fresh``: the cgroup was just made, so every knob holds the kernel's default
        (a v1 cgroup never inherits its parent's limits): what ``limits`` leaves at the
        default is not written, and there are no throttle rules or memsw limit to read
        first. That is 40 system calls of a container start."""
        millis = limits.cpu_millicores
        quota = -1 if millis is None else millis * CPU_PERIOD_US // 1000
        if not (fresh and millis is None):
            self._set("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US), millis is not None)
            self._set("cpu", "cpu.cfs_quota_us", str(quota), millis is not None)
        if not (fresh and limits.cpu_weight is None):
            self._set("cpu", "cpu.shares", str(cpu_shares(limits.cpu_weight)), False)
        if not (fresh and limits.memory_bytes is None):
            self._apply_memory(limits.memory_bytes, fresh)
        pids = limits.pids_max
        if not (fresh and pids is None):
            self._set("pids", "pids.max", "max" if pids is None else str(pids), pids is not None)
        self._apply_io(limits.io, fresh)
        if not (fresh and limits.io_weight is None):
            self._apply_io_weight(limits.io_weight)

    def _apply_memory(self, mem: int | None, fresh: bool = False) -> None:
        value = "-1" if mem is None else str(mem)
        memsw = self._path("memory", "memory.memsw.limit_in_bytes")
        if memsw is None or not memsw.exists():
            # No swap accounting (swapaccount=0 or no swap support): memory alone.
            self._set("memory", "memory.limit_in_bytes", value, mem is not None)
            return
        # The kernel keeps memsw >= memory at every step, so the order depends on the
        # direction: raise memsw before memory, lower memory before memsw.
        current = -1 if fresh else read_int(memsw, -1)
        current_cap = 1 << 63 if current < 0 or current >= _UNLIMITED else current
        if (1 << 63 if mem is None else mem) > current_cap:
            self._set("memory", memsw.name, value, True)
            self._set("memory", "memory.limit_in_bytes", value, True)
        else:
            self._set("memory", "memory.limit_in_bytes", value, True)
            self._set("memory", memsw.name, value, True)

    def _apply_io(self, limits: list[IoLimit], fresh: bool = False) -> None:
        if not limits and ("blkio" not in self.dirs or fresh):
            return
        for field, fname in _THROTTLE:
            path = self._path("blkio", fname)
            wanted: dict[str, int] = {}
            for lim in limits:
                value = getattr(lim, field)
                if value is not None:
                    wanted[f"{lim.major}:{lim.minor}"] = value
            if path is None or not path.exists():
                if wanted:
                    self._set("blkio", fname, "", True)  # raises: not available
                continue
            # Declarative: rules for devices no longer listed are removed (value 0).
            for line in ("" if fresh else read_optional(path) or "").splitlines():
                dev = line.split(" ", 1)[0]
                if dev and dev not in wanted:
                    write(path, f"{dev} 0")
            for dev, value in wanted.items():
                write(path, f"{dev} {value}")

    def _apply_io_weight(self, weight: int | None) -> None:
        # blkio.weight (CFQ era, default 500) or BFQ's blkio.bfq.weight (default 100):
        # scale so the v2 default 100 maps to each file's own default.
        for fname, default, low in (("blkio.weight", 500, 10), ("blkio.bfq.weight", 100, 1)):
            path = self._path("blkio", fname)
            if path is not None and path.exists():
                value = default if weight is None else weight * default // 100
                write(path, str(max(low, min(1000, value))))
                return

    def stats(self) -> CgroupStats:
        limit = -1
        mem_limit = self._path("memory", "memory.limit_in_bytes")
        if mem_limit is not None:
            limit = read_int(mem_limit, -1)
        oom = flat_keyed(self._read("memory", "memory.oom_control"))
        # oom_kill in memory.oom_control exists since 4.13; before that the closest
        # count is failcnt (times the limit was hit).
        oom_kills = oom.get("oom_kill")
        if oom_kills is None:
            oom_kills = self._int("memory", "memory.failcnt")
        rbytes = wbytes = 0
        service = self._read("blkio", "blkio.throttle.io_service_bytes_recursive")
        if service is None:
            service = self._read("blkio", "blkio.throttle.io_service_bytes")
        for line in (service or "").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "Read":
                rbytes += int(parts[2])
            elif len(parts) == 3 and parts[1] == "Write":
                wbytes += int(parts[2])
        return CgroupStats(
            cpu_usage_usec=self._int("cpuacct", "cpuacct.usage") // 1000,
            memory=self._int("memory", "memory.usage_in_bytes"),
            memory_limit=None if limit < 0 or limit >= _UNLIMITED else limit,
            pids=self._int("pids", "pids.current"),
            io_read_bytes=rbytes,
            io_write_bytes=wbytes,
            oom_kills=oom_kills,
        )

    def _read(self, controller: str, fname: str) -> str | None:
        path = self._path(controller, fname)
        return None if path is None else read_optional(path)

    def _int(self, controller: str, fname: str) -> int:
        path = self._path(controller, fname)
        return 0 if path is None else read_int(path)

    def is_populated(self) -> bool:
        return bool(self.pids())

    def _freeze(self, timeout: float) -> None:
        path = self._path("freezer", "freezer.state")
        if path is None or not path.exists():
            return
        write(path, "FROZEN", "cgroup freeze")
        # FREEZING lasts while a task sleeps uninterruptibly; kill_all proceeds anyway.
        wait_for(lambda: (read_optional(path) or "").strip() == "FROZEN", timeout)

    def _thaw(self) -> None:
        path = self._path("freezer", "freezer.state")
        if path is not None and path.exists():
            with contextlib.suppress(RuntimeFailure):
                write(path, "THAWED", "cgroup thaw")

    def kill(self, timeout: float = 10.0) -> None:
        kill_all(self.pids, self._rel, self._freeze, self._thaw, timeout)

    def destroy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.kill(timeout)
        for d in self._unique:
            rmdir_tree(d, max(deadline - time.monotonic(), 0.5))

    def oom_fd(self) -> int | None:
        control = self._path("memory", "memory.oom_control")
        if control is None or not control.exists():
            return None
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            try:
                cfd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise failure("cgroup register oom eventfd", exc, control) from exc
            try:
                # The kernel keeps its own reference to oom_control; the registration
                # lasts until the eventfd is closed or the cgroup removed.
                write(
                    control.parent / "cgroup.event_control",
                    f"{efd} {cfd}",
                    "cgroup register oom eventfd",
                )
            finally:
                os.close(cfd)
        except BaseException:
            os.close(efd)
            raise
        return efd


class V1Driver(CgroupDriver):
    """Containers' cgroups under one parent in every v1 controller hierarchy we use."""

    version = 1

    def __init__(
        self, parent: str = "rexecd", root: Path | None = None, *, proc_cgroup: str | None = None
    ) -> None:
        self.root = root or DEFAULT_ROOT
        own = own_cgroups(read_proc_cgroup(proc_cgroup))
        # controller -> the directory its hierarchy is mounted on; cpu and cpuacct are
        # often co-mounted ("cpu,cpuacct" with symlinks), hence the realpath.
        self.hierarchies: dict[str, Path] = {}
        for c in V1_CONTROLLERS:
            d = self.root / c
            if (d / "cgroup.procs").exists():
                self.hierarchies[c] = Path(os.path.realpath(d))
        if not self.hierarchies:
            raise RuntimeFailure("cgroup probe", f"no v1 controller mounted under {self.root}")
        # A relative parent follows our own cgroup, which may differ per hierarchy.
        self.parent_dirs = {
            c: under(h, resolve_parent(parent, own.get(c, "/")))
            for c, h in self.hierarchies.items()
        }

    def _dirs(self, name: str) -> dict[str, Path]:
        return {c: d / name for c, d in self.parent_dirs.items()}

    def prepare(self) -> None:
        for d in sorted(set(self.parent_dirs.values())):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise failure("cgroup create parent", exc, d) from exc

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        check_name(name)
        dirs = self._dirs(name)
        created: list[Path] = []
        try:
            for d in sorted(set(dirs.values())):
                try:
                    try:
                        d.mkdir()
                    except FileNotFoundError:
                        # The parent is made on first use (or again, if removed): not on
                        # every create, where its seven exist_ok mkdirs cost more than
                        # the cgroup itself.
                        self.prepare()
                        d.mkdir()
                except FileExistsError as exc:
                    raise Conflict(f"cgroup {name} already exists", path=str(d)) from exc
                except OSError as exc:
                    raise failure("cgroup create", exc, d) from exc
                created.append(d)
            cg = V1Cgroup(name, dirs, self.hierarchies)
            cg.setup_devices()
            cg._apply(limits, fresh=True)
        except BaseException:
            # Only what this call made: an existing cgroup of that name is not ours to undo.
            for d in created:
                with contextlib.suppress(RexecError):
                    rmdir_tree(d, 2.0)
            raise
        return cg

    def open(self, name: str) -> Cgroup:
        check_name(name)
        dirs = self._dirs(name)
        if not any(d.is_dir() for d in dirs.values()):
            raise NotFound(f"cgroup {name} not found", path=str(next(iter(dirs.values()))))
        return V1Cgroup(name, dirs, self.hierarchies)

    def list(self) -> list[str]:
        names: set[str] = set()
        for d in set(self.parent_dirs.values()):
            try:
                names.update(e.name for e in os.scandir(d) if e.is_dir())
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise failure("cgroup list", exc, d) from exc
        return sorted(names)

    def available(self) -> dict[str, bool]:
        out = {c: c in self.hierarchies for c in V1_CONTROLLERS}
        out["io"] = out["blkio"]
        memory = self.hierarchies.get("memory")
        out["memsw"] = memory is not None and (memory / "memory.memsw.limit_in_bytes").exists()
        out["kill"] = False
        return out

    def remove_parent(self) -> None:
        deadline = time.monotonic() + 2.0
        for d in sorted(set(self.parent_dirs.values())):
            rmdir_retry(d, deadline)
