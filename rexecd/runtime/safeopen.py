"""Opening files on paths a container controls, from the host: regular files only, never
one on a kernel file system, and nothing that can block.

The daemon reaches a container's files as host root through ``/proc/PID/root``. Two
things follow that the container itself never faces:

- Opening is not harmless. A FIFO blocks ``open`` until a writer comes, which a
  tenant decides; opening a device node runs its driver's ``open`` with host
  privileges and outside the container's devices cgroup (a tape rewinds, a watchdog
  starts counting). So a path is first opened ``O_PATH`` (no driver is involved),
  checked with ``fstat``, and only a regular file is then opened for reading,
  through that very ``O_PATH`` fd so no rename in between can swap it.
- Kernel file systems answer by the reader's credentials: through the container's
  /proc a host root reads real addresses from /proc/kallsyms, /proc/iomem and other
  tasks' kernel stacks, which the container sees zeroed or denied. Every fd is
  checked with ``fstatfs``, so however the path got there (a symlink, ``..``, a
  mount point) nothing on proc, sysfs, cgroupfs and their kin is served.
"""

from __future__ import annotations

import os
import stat

from rexecd import _native as n
from rexecd.errors import InvalidRequest

# linux/magic.h: the file systems that expose the kernel itself rather than files.
KERNEL_FS: dict[int, str] = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0x6E736673: "nsfs",
}


def refuse_kernel_fs(fd: int, path: str) -> None:
    """Raise InvalidRequest if the open file ``fd`` lives on a kernel file system."""
    kind = KERNEL_FS.get(n.fstatfs_type(fd, path))
    if kind is not None:
        raise InvalidRequest(
            f"{path} is on a kernel file system ({kind}), which the files API does not serve",
            path=path,
        )


def reopen_regular(path_fd: int, path: str) -> int:
    """A blocking ``O_RDONLY`` fd for the file behind the ``O_PATH`` fd ``path_fd``, if it
    is a regular file on an ordinary file system; InvalidRequest otherwise. Never opens
    anything else, so it cannot block on a FIFO nor wake a device driver."""
    refuse_kernel_fs(path_fd, path)
    st = os.fstat(path_fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequest(f"not a regular file: {path} ({_kind(st.st_mode)})", path=path)
    # The magic link names the inode path_fd holds, not a path that could be swapped.
    fd = os.open(
        f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    )
    # Non-blocking is meaningless for a regular file; cleared so readers see plain I/O.
    os.set_blocking(fd, True)
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a file"
