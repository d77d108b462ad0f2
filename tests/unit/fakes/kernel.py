"""A recording fake of ``rexecd.runtime.kernel.Kernel``: a small in-memory file tree
and descriptor table, and the list of calls made, with every ``/proc/self/fd/N`` in
a mount's arguments rendered as the path descriptor N was opened at.

It models just enough of the kernel for the mount sequence to run: ``openat2``
resolves paths against its tree (RESOLVE_NO_SYMLINKS refuses a symlink on the way,
RESOLVE_IN_ROOT keeps absolute symlinks inside the starting directory); mounting
``proc`` or ``sysfs`` fills the target with the entries the kernel would show
(``PROC``/``SYS``); closing an unknown descriptor fails, so double closes show up.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from rexecd import _native as n
from rexecd.runtime.kernel import FileKind

AT_FDCWD = -100

# What the fake's proc and sysfs hold once mounted: path -> "dir" | "file". Some of
# the default masked paths are missing on purpose (a kernel without them).
PROC = {
    "acpi": "dir",
    "bus": "dir",
    "fs": "dir",
    "irq": "dir",
    "scsi": "dir",
    "sys": "dir",
    "kcore": "file",
    "keys": "file",
    "sched_debug": "file",
    "timer_list": "file",
    "sysrq-trigger": "file",
    "meminfo": "file",
    "cpuinfo": "file",
    "uptime": "file",
}
SYS = {
    "firmware": "dir",
    "block": "dir",
    "class": "dir",
    "class/block": "dir",
    "dev": "dir",
    "dev/block": "dir",
    "devices": "dir",
    "devices/virtual": "dir",
    "devices/virtual/block": "dir",
}


@dataclass(frozen=True)
class Mount:
    source: str | None
    target: str
    fstype: str | None
    flags: int
    data: str | None = None


@dataclass(frozen=True)
class Call:
    """Any call but a mount: its name and arguments as recorded."""

    name: str
    args: tuple[object, ...]


@dataclass(frozen=True)
class Open:
    path: str
    flags: int
    resolve: int


@dataclass
class _Node:
    kind: str  # "dir", "file", "chr", "link"
    rdev: int = 0
    target: str = ""


@dataclass
class FakeKernel:
    """Records every call; ``tree`` is a set of absolute directory paths to start with."""

    tree: list[str] = field(default_factory=list)
    calls: list[Mount | Call] = field(default_factory=list)
    opens: list[Open] = field(default_factory=list)
    failures: list[tuple[Callable[[Mount | Call], bool], OSError]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes: dict[str, _Node] = {"/": _Node("dir")}
        for path in self.tree:
            self.add(path, "dir")
        self.fds: dict[int, str] = {}
        self._next_fd = 100
        self.cwd = "/"

    # -- set-up and inspection -----------------------------------------------------

    def add(self, path: str, kind: str = "dir", *, rdev: int = 0, target: str = "") -> None:
        """Create ``path`` (and missing parent directories) in the tree."""
        parent = posixpath.dirname(path)
        if parent != path and parent not in self.nodes:
            self.add(parent, "dir")
        self.nodes[path] = _Node(kind, rdev, target)

    def fail(self, when: Callable[[Mount | Call], bool], exc: OSError) -> None:
        """Raise ``exc`` (instead of recording) at the first call ``when`` accepts."""
        self.failures.append((when, exc))

    def mounts(self) -> list[Mount]:
        return [c for c in self.calls if isinstance(c, Mount)]

    def named(self, name: str) -> list[tuple[object, ...]]:
        return [c.args for c in self.calls if isinstance(c, Call) and c.name == name]

    def open_fds(self) -> dict[int, str]:
        return dict(self.fds)

    # -- internals -----------------------------------------------------------------

    def _record(self, call: Mount | Call) -> None:
        for when, exc in self.failures:
            if when(call):
                self.failures.remove((when, exc))
                raise exc
        self.calls.append(call)

    def _render(self, s: str | None) -> str | None:
        if s is None:
            return None
        return re.sub(
            r"/proc/self/fd/(\d+)", lambda m: self.fds.get(int(m.group(1)), m.group(0)), s
        )

    def _new_fd(self, path: str) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self.fds[fd] = path
        return fd

    def _base(self, dirfd: int) -> str:
        if dirfd == AT_FDCWD:
            return self.cwd
        if dirfd not in self.fds:
            raise OSError(errno.EBADF, "bad dirfd")
        return self.fds[dirfd]

    def _resolve(self, base: str, path: str, *, resolve: int, follow_last: bool) -> str:
        root = base if resolve & n.RESOLVE_IN_ROOT else "/"
        todo = [p for p in path.split("/") if p]
        cur = root if path.startswith("/") else base
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == "..":
                cur = posixpath.dirname(cur) if cur != root else cur
                continue
            if part == ".":
                continue
            nxt = posixpath.join(cur, part)
            node = self.nodes.get(nxt)
            if node is None:
                raise FileNotFoundError(errno.ENOENT, "no such file", nxt)
            if node.kind == "link" and (todo or follow_last):
                if resolve & n.RESOLVE_NO_SYMLINKS:
                    raise OSError(errno.ELOOP, "symlink refused", nxt)
                hops += 1
                if hops > 40:
                    raise OSError(errno.ELOOP, "too many links", nxt)
                todo = [p for p in node.target.split("/") if p] + todo
                cur = root if node.target.startswith("/") else cur
                continue
            if todo and node.kind != "dir":
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", nxt)
            cur = nxt
        return cur

    def _child(self, dirfd: int, name: str) -> str:
        path = posixpath.join(self._base(dirfd), name)
        if posixpath.dirname(path) not in self.nodes:
            raise FileNotFoundError(errno.ENOENT, "no parent", path)
        return path

    # -- the Kernel protocol -------------------------------------------------------

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: int = 0,
        data: str | None = None,
    ) -> None:
        call = Mount(
            self._render(source), self._render(target) or "", fstype, flags, self._render(data)
        )
        self._record(call)
        contents = {"proc": PROC, "sysfs": SYS}.get(fstype or "", {})
        for rel, kind in contents.items():
            self.add(posixpath.join(call.target, rel), kind)

    def umount2(self, target: str, flags: int = 0) -> None:
        self._record(Call("umount2", (target, flags)))

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self._record(Call("pivot_root", (new_root, put_old)))

    def chdir(self, path: str) -> None:
        self._record(Call("chdir", (path,)))
        self.cwd = posixpath.join(self.cwd, path)

    def open(self, path: str, flags: int) -> int:
        self.opens.append(Open(path, flags, 0))
        target = self._resolve("/", path, resolve=0, follow_last=not flags & os.O_NOFOLLOW)
        if flags & os.O_DIRECTORY and self.nodes[target].kind != "dir":
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        return self._new_fd(target)

    def openat2(self, dirfd: int, path: str, flags: int, resolve: int = 0) -> int:
        base = self._base(dirfd)
        self.opens.append(Open(posixpath.join(base, path), flags, resolve))
        target = self._resolve(base, path, resolve=resolve, follow_last=not flags & os.O_NOFOLLOW)
        if flags & os.O_DIRECTORY and self.nodes[target].kind != "dir":
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        return self._new_fd(target)

    def close(self, fd: int) -> None:
        if self.fds.pop(fd, None) is None:
            raise OSError(errno.EBADF, f"close of fd {fd} not open")

    def fstat(self, fd: int) -> FileKind:
        node = self.nodes[self.fds[fd]]
        mode = {
            "dir": stat.S_IFDIR | 0o755,
            "file": stat.S_IFREG | 0o644,
            "chr": stat.S_IFCHR | 0o666,
            "link": stat.S_IFLNK | 0o777,
        }[node.kind]
        return FileKind(mode, node.rdev)

    def mkdirat(self, dirfd: int, name: str, mode: int) -> None:
        path = self._child(dirfd, name)
        if path in self.nodes:
            raise FileExistsError(errno.EEXIST, "exists", path)
        self._record(Call("mkdir", (path, mode)))
        self.add(path, "dir")

    def mknodat(self, dirfd: int, name: str, mode: int, major: int, minor: int) -> None:
        path = self._child(dirfd, name)
        self._record(Call("mknod", (path, mode, major, minor)))
        self.add(path, "chr", rdev=os.makedev(major, minor))

    def fchmodat(self, dirfd: int, name: str, mode: int) -> None:
        self._record(Call("chmod", (self._child(dirfd, name), mode)))

    def fchownat(self, dirfd: int, name: str, uid: int, gid: int, *, follow: bool) -> None:
        self._record(Call("chown", (self._child(dirfd, name), uid, gid, follow)))

    def symlinkat(self, target: str, dirfd: int, name: str) -> None:
        path = self._child(dirfd, name)
        self._record(Call("symlink", (target, path)))
        self.add(path, "link", target=target)

    def idmap_layers(self, paths: list[str], userns_fd: int) -> dict[str, int]:
        self._record(Call("idmap_layers", (tuple(paths), userns_fd)))
        return {p: self._new_fd(f"idmapped:{p}") for p in dict.fromkeys(paths)}

    def unshare(self, flags: int) -> None:
        self._record(Call("unshare", (flags,)))

    def setns(self, fd: int, nstype: int) -> None:
        self._record(Call("setns", (fd, nstype)))

    def sethostname(self, name: str) -> None:
        self._record(Call("sethostname", (name,)))
