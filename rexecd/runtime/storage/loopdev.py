"""Loop block devices: attach an image with AUTOCLEAR, find the device behind an image, grow it.

Uses LOOP_CTL_GET_FREE + LOOP_CONFIGURE and LOOP_SET_CAPACITY. Needs Linux >= 5.8
(LOOP_CONFIGURE), /dev/loop-control, a /dev that shows new loop nodes (devtmpfs), sysfs at
/sys, and CAP_SYS_ADMIN. Raises ``OSError``; callers translate it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path

# linux/loop.h
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64

LOOP_MAJOR = 7
LOOP_CONTROL = "/dev/loop-control"
SYS_BLOCK = Path("/sys/block")
SYS_DEV_BLOCK = Path("/sys/dev/block")

# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64); number,
# encrypt_type, encrypt_key_size, flags (u32); file_name, crypt_name (64 bytes each);
# encrypt_key (32); init[2] (u64).
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
# struct loop_config: fd, block_size (u32); loop_info64; __reserved[8] (u64).
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s8Q")

# Another process (losetup, another daemon) can take the number GET_FREE gave us
# before we configure it; the kernel then says EBUSY and we ask again.
_ATTACH_TRIES = 32


def loop_config(backing_fd: int, file_name: str, flags: int = LO_FLAGS_AUTOCLEAR) -> bytes:
    """The ``struct loop_config`` LOOP_CONFIGURE reads (304 bytes on every ABI)."""
    # lo_file_name is informational (LOOP_GET_STATUS); the kernel keeps the real
    # path in sysfs. NUL-terminated, so at most 63 bytes.
    name = os.fsencode(file_name)[: LO_NAME_SIZE - 1]
    info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0)
    return _LOOP_CONFIG.pack(backing_fd, 0, info, *([0] * 8))


def attach(image: Path) -> tuple[int, str]:
    """Bind ``image`` to a free loop device with AUTOCLEAR; ``(open fd, "/dev/loopN")``.

    The caller keeps the fd open until the device is mounted, then closes it: AUTOCLEAR
    frees the device at its last close, so if the mount fails, closing the fd is the
    whole clean-up, and once mounted the device goes away with the unmount.
    """
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        config = loop_config(backing, str(image))
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTACH_TRIES):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno == errno.EBUSY:
                        continue
                    raise OSError(exc.errno, f"LOOP_CONFIGURE: {exc.strerror}", dev) from exc
                return fd, dev
        finally:
            os.close(ctl)
    finally:
        # The loop device holds its own reference to the file.
        os.close(backing)
    raise OSError(errno.EBUSY, "no free loop device after retries", str(image))


def set_capacity(dev: str) -> None:
    """LOOP_SET_CAPACITY: make ``dev`` re-read the size of its (grown) backing file."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
    finally:
        os.close(fd)


def _backing_file(sysdir: Path) -> str | None:
    try:
        text = (sysdir / "loop" / "backing_file").read_text(errors="surrogateescape")
    except OSError as exc:
        # Only a bound device has the loop/ attributes; one being cleared still has
        # them for a moment but answers ENODEV.
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ENXIO):
            return None
        raise
    return text.rstrip("\n")


def devices_backing(image: Path, sys_block: Path = SYS_BLOCK) -> list[str]:
    """Names ("loop3") of the loop devices whose backing file is ``image``."""
    target = str(image)
    found = []
    for sysdir in sys_block.glob("loop*"):
        if _backing_file(sysdir) == target:
            found.append(sysdir.name)
    return sorted(found)


def wait_detached(image: Path, timeout: float, sys_block: Path = SYS_BLOCK) -> list[str]:
    """Wait up to ``timeout`` seconds for every loop device backed by ``image`` to go;
    the ones still there (empty if none).

    AUTOCLEAR acts at the device's last close, which is often not the unmount: udev
    opens a device to probe it when a writer closes it, and a dead container's mount
    namespace lets go of its mounts from a workqueue. Both take milliseconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        busy = devices_backing(image, sys_block)
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.005)


def device_of(st_dev: int, sys_dev_block: Path = SYS_DEV_BLOCK) -> tuple[str, str | None]:
    """``("/dev/loopN", backing file or None)`` for the block device number ``st_dev``
    (a mounted file system's ``st_dev``). ``OSError`` ENODEV if it is no loop device."""
    major, minor = os.major(st_dev), os.minor(st_dev)
    sysdir = sys_dev_block / f"{major}:{minor}"
    if major != LOOP_MAJOR:
        raise OSError(errno.ENODEV, "not a loop device", str(sysdir))
    name = None
    for line in (sysdir / "uevent").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME":
            name = value
    if not name:
        raise OSError(errno.ENODEV, "no DEVNAME in uevent", str(sysdir))
    return f"/dev/{name}", _backing_file(sysdir)
