"""The kernel calls a container's set-up makes, as one small typed seam.

``rootfs`` and the namespace steps of ``child`` call the kernel only through a
``Kernel``: ``HOST`` is the real one (``rexecd._native`` and ``os``), and unit tests
hand in a recording fake (tests/unit/fakes/kernel.py) to check the exact mount
sequence, flags and options without root. Every method has the semantics and errors
(``OSError`` with errno) of the system call it is named after; ``dirfd`` arguments are
descriptors, never paths, so each path is resolved where the caller chose.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Protocol

from rexecd import _native as n
from rexecd.runtime import userns


class FileKind(NamedTuple):
    """What ``fstat`` tells the set-up steps: the file type bits and the device number."""

    mode: int
    rdev: int


class Kernel(Protocol):
    """The system calls of root file system and namespace set-up."""

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: int = 0,
        data: str | None = None,
    ) -> None: ...

    def umount2(self, target: str, flags: int = 0) -> None: ...

    def pivot_root(self, new_root: str, put_old: str) -> None: ...

    def chdir(self, path: str) -> None: ...

    def open(self, path: str, flags: int) -> int: ...

    def openat2(self, dirfd: int, path: str, flags: int, resolve: int = 0) -> int: ...

    def close(self, fd: int) -> None: ...

    def fstat(self, fd: int) -> FileKind: ...

    def mkdirat(self, dirfd: int, name: str, mode: int) -> None: ...

    def mknodat(self, dirfd: int, name: str, mode: int, major: int, minor: int) -> None: ...

    def fchmodat(self, dirfd: int, name: str, mode: int) -> None: ...

    def fchownat(self, dirfd: int, name: str, uid: int, gid: int, *, follow: bool) -> None: ...

    def symlinkat(self, target: str, dirfd: int, name: str) -> None: ...

    def idmap_layers(self, paths: list[str], userns_fd: int) -> dict[str, int]:
        """Detached read-only idmapped copies of ``paths`` (open_tree + mount_setattr)."""
        ...

    def unshare(self, flags: int) -> None: ...

    def setns(self, fd: int, nstype: int) -> None: ...

    def sethostname(self, name: str) -> None: ...


class HostKernel:
    """The real kernel: each method is the one ``_native`` or ``os`` call it names."""

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: int = 0,
        data: str | None = None,
    ) -> None:
        n.mount(source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int = 0) -> None:
        n.umount2(target, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        n.pivot_root(new_root, put_old)

    def chdir(self, path: str) -> None:
        os.chdir(path)

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags)

    def openat2(self, dirfd: int, path: str, flags: int, resolve: int = 0) -> int:
        return n.openat2(dirfd, path, flags, resolve=resolve)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fstat(self, fd: int) -> FileKind:
        st = os.fstat(fd)
        return FileKind(st.st_mode, st.st_rdev)

    def mkdirat(self, dirfd: int, name: str, mode: int) -> None:
        os.mkdir(name, mode, dir_fd=dirfd)

    def mknodat(self, dirfd: int, name: str, mode: int, major: int, minor: int) -> None:
        n.mknodat(dirfd, name, mode, major, minor)

    def fchmodat(self, dirfd: int, name: str, mode: int) -> None:
        os.chmod(name, mode, dir_fd=dirfd)

    def fchownat(self, dirfd: int, name: str, uid: int, gid: int, *, follow: bool) -> None:
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=follow)

    def symlinkat(self, target: str, dirfd: int, name: str) -> None:
        os.symlink(target, name, dir_fd=dirfd)

    def idmap_layers(self, paths: list[str], userns_fd: int) -> dict[str, int]:
        return userns.idmap_layers(paths, userns_fd)

    def unshare(self, flags: int) -> None:
        n.unshare(flags)

    def setns(self, fd: int, nstype: int) -> None:
        n.setns(fd, nstype)

    def sethostname(self, name: str) -> None:
        n.sethostname(name)


HOST: Kernel = HostKernel()
