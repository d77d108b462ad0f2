"""ext4 in an image file: make, check and grow it (e2fsprogs), resize and trim it online (ioctls).

mkfs.ext4, e2fsck and resize2fs run with subprocess (fork+exec in C, safe in a threaded
daemon). EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE, FITRIM CAP_SYS_ADMIN, both a mounted
file system. Failures leave as ``RuntimeFailure`` naming the tool or ioctl.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import shutil
import struct
import subprocess
from pathlib import Path

from rexecd.errors import RuntimeFailure

log = logging.getLogger(__name__)

# _IOW('f', 16, __u64) and _IOWR('X', 121, struct fstrim_range) from linux/ext4.h, fs.h.
EXT4_IOC_RESIZE_FS = 0x40086610
FITRIM = 0xC0185879

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80

# A daemon started by an init system may have a PATH without the sbin dirs.
_TOOL_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"

# mkfs.ext4 flags, and why each differs from the defaults:
MKFS_ARGS = (
    "-q",
    "-F",  # the target is a regular file, not a block device
    # 4 KiB blocks and the "default" inode ratio whatever the size: mke2fs would pick
    # 1 KiB blocks and 4 KiB per inode for a small volume, which wastes a sixteenth of
    # the quota on inode tables and stays that way after the volume grows.
    "-b",
    "4096",
    "-i",
    "16384",
    # No root-reserved blocks: the quota is the user's, and root in the container
    # would be the only one to use them anyway.
    "-m",
    "0",
    # Nothing to zero in a fresh sparse file. The journal stays: it is what makes a
    # volume usable after the daemon or host dies mid-write.
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1",
)

CAP_SYS_RESOURCE = 24

# e2fsck exit status bits (e2fsck(8)).
_FSCK_CORRECTED = 1
_FSCK_REBOOT = 2


def _tool(name: str, step: str) -> str:
    path = shutil.which(name, path=_TOOL_PATH)
    if path is None:
        raise RuntimeFailure(step, f"{name} not found (install e2fsprogs)", errno.ENOENT)
    return path


def _run(step: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env={"PATH": _TOOL_PATH, "LC_ALL": "C"},
            check=False,
        )
    except OSError as exc:
        raise RuntimeFailure.from_oserror(step, exc) from exc


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return " / ".join(text[-3:]) or "no output"


def mkfs(image: Path) -> None:
    """Make an empty ext4 file system filling the (sized, sparse) file ``image``."""
    step = "mkfs.ext4"
    proc = _run(step, [_tool("mkfs.ext4", step), *MKFS_ARGS, str(image)])
    if proc.returncode != 0:
        raise RuntimeFailure(step, f"{image}: exit {proc.returncode}: {_tail(proc)}")


def fsck(image: Path) -> bool:
    """``e2fsck -p`` the unmounted ``image``: replay the journal after a crash and fix
    what is safe to fix unattended. True if something was repaired. Damage that needs
    a human (exit 4 and up) raises, and the image is left untouched for them."""
    step = "e2fsck"
    proc = _run(step, [_tool("e2fsck", step), "-p", str(image)])
    if proc.returncode & ~(_FSCK_CORRECTED | _FSCK_REBOOT):
        raise RuntimeFailure(
            step, f"{image} needs manual repair: exit {proc.returncode}: {_tail(proc)}"
        )
    if proc.returncode:
        log.warning("e2fsck repaired %s: %s", image, _tail(proc))
    return proc.returncode != 0


def grow_offline(image: Path) -> None:
    """Grow the file system in the unmounted ``image`` to fill the file: a full
    ``e2fsck -f`` (resize2fs refuses a file system not checked since its last mount),
    then ``resize2fs``. The slow path, for when the online ioctl is not allowed."""
    step = "e2fsck -f"
    proc = _run(step, [_tool("e2fsck", step), "-f", "-p", str(image)])
    if proc.returncode & ~(_FSCK_CORRECTED | _FSCK_REBOOT):
        raise RuntimeFailure(
            step, f"{image} needs manual repair: exit {proc.returncode}: {_tail(proc)}"
        )
    step = "resize2fs"
    proc = _run(step, [_tool("resize2fs", step), str(image)])
    if proc.returncode != 0:
        raise RuntimeFailure(step, f"{image}: exit {proc.returncode}: {_tail(proc)}")


def has_capability(status_text: str, cap: int) -> bool:
    """Whether the ``CapEff`` line of a /proc/PID/status text has bit ``cap`` set."""
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == "CapEff":
            return bool(int(value.strip(), 16) >> cap & 1)
    return False


@functools.cache
def can_grow_online() -> bool:
    """Whether this process may use EXT4_IOC_RESIZE_FS: root in a container often lacks
    CAP_SYS_RESOURCE, and then growth has to happen with the volume unmounted."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    return has_capability(status, CAP_SYS_RESOURCE)


def parse_superblock(raw: bytes) -> tuple[int, int]:
    """``(blocks, block size)`` from the 1024 bytes of an ext2/3/4 superblock."""
    if len(raw) < 1024:
        raise ValueError("short superblock")
    (magic,) = struct.unpack_from("<H", raw, 0x38)
    if magic != EXT4_MAGIC:
        raise ValueError(f"bad superblock magic {magic:#x}")
    (blocks,) = struct.unpack_from("<I", raw, 0x04)
    (log_size,) = struct.unpack_from("<I", raw, 0x18)
    (incompat,) = struct.unpack_from("<I", raw, 0x60)
    if incompat & _INCOMPAT_64BIT:
        (hi,) = struct.unpack_from("<I", raw, 0x150)
        blocks |= hi << 32
    return blocks, 1024 << log_size


def fs_bytes(image: Path) -> int:
    """The size of the file system in the unmounted ``image``, from its superblock."""
    try:
        with open(image, "rb") as f:
            f.seek(SUPERBLOCK_OFFSET)
            blocks, block_size = parse_superblock(f.read(1024))
    except OSError as exc:
        raise RuntimeFailure.from_oserror("read superblock", exc) from exc
    except ValueError as exc:
        raise RuntimeFailure("read superblock", f"{image}: {exc}", errno.EUCLEAN) from exc
    return blocks * block_size


def grow(mountpoint: Path, size_bytes: int) -> None:
    """Grow the ext4 mounted at ``mountpoint`` to fill ``size_bytes`` of its device,
    online; a no-op if it is that size already. The device must already be that big.
    Needs ``can_grow_online()``."""
    fd = _open_dir("resize ext4", mountpoint)
    try:
        block_size = os.fstatvfs(fd).f_bsize
        fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("=Q", size_bytes // block_size))
    except OSError as exc:
        raise RuntimeFailure.from_oserror(
            "resize ext4", OSError(exc.errno, exc.strerror, str(mountpoint))
        ) from exc
    finally:
        os.close(fd)


def trim(mountpoint: Path) -> int:
    """FITRIM the file system at ``mountpoint``: the loop device punches the free blocks
    out of the sparse image, giving the host its space back. Bytes trimmed."""
    fd = _open_dir("trim ext4", mountpoint)
    try:
        # Blocks freed in the running journal transaction are still busy for FITRIM;
        # fsync of the root dir (changed by the last delete) commits it.
        os.fsync(fd)
        # struct fstrim_range {start, len, minlen}; the kernel writes back len.
        buf = bytearray(struct.pack("=QQQ", 0, 2**64 - 1, 0))
        fcntl.ioctl(fd, FITRIM, buf)
        return int(struct.unpack_from("=Q", buf, 8)[0])
    except OSError as exc:
        raise RuntimeFailure.from_oserror(
            "trim ext4", OSError(exc.errno, exc.strerror, str(mountpoint))
        ) from exc
    finally:
        os.close(fd)


def _open_dir(step: str, path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeFailure.from_oserror(step, exc) from exc
