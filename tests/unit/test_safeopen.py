"""Opening container-controlled paths: regular files only, nothing on a kernel file
system, and never a blocking open. Against a tmp dir and the host's own /proc; no root,
no kernel side effects."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rexecd import _native as n
from rexecd.errors import InvalidRequest
from rexecd.runtime.safeopen import KERNEL_FS, refuse_kernel_fs, reopen_regular
from rexecd.runtime.users import resolve_user

RESOLVE = n.RESOLVE_IN_ROOT | n.RESOLVE_NO_MAGICLINKS


@contextmanager
def path_fd(root: Path, rel: str) -> Iterator[int]:
    dfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = n.openat2(dfd, rel, os.O_PATH | os.O_NOFOLLOW, 0, RESOLVE)
    finally:
        os.close(dfd)
    try:
        yield fd
    finally:
        os.close(fd)


def test_a_regular_file_is_reopened_for_reading(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    with path_fd(tmp_path, "f") as pfd:
        fd = reopen_regular(pfd, "/f")
    try:
        assert os.read(fd, 10) == b"data"
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["fifo", "dir", "symlink", "socket"])
def test_anything_else_is_refused_without_being_opened(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "x"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    elif kind == "symlink":
        (tmp_path / "real").write_text("r")
        target.symlink_to("real")
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()
    started = time.monotonic()
    with path_fd(tmp_path, "x") as pfd, pytest.raises(InvalidRequest, match="not a regular file"):
        reopen_regular(pfd, "/x")
    # A FIFO opened for reading would have blocked until a writer came: never.
    assert time.monotonic() - started < 5


def test_kernel_file_systems_are_refused() -> None:
    # The host's own /proc and /sys stand in for a container's.
    for rel, kind in (("proc/version", "proc"), ("proc/self/status", "proc"), ("sys", "sysfs")):
        with path_fd(Path("/"), rel) as pfd, pytest.raises(InvalidRequest, match=kind):
            reopen_regular(pfd, "/" + rel)
    assert {"proc", "sysfs", "cgroup2", "debugfs", "tracefs", "bpf"} <= set(KERNEL_FS.values())


def test_ordinary_file_systems_pass(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH | os.O_CLOEXEC)
    try:
        refuse_kernel_fs(fd, str(tmp_path))
    finally:
        os.close(fd)


def test_a_fifo_or_proc_link_for_etc_passwd_is_an_error_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    os.mkfifo(tmp_path / "etc" / "passwd")
    with pytest.raises(InvalidRequest, match=r"/etc/passwd .*a FIFO"):
        resolve_user("nobody", [tmp_path])
    # A link into a kernel file system is resolved inside the root: it is not found
    # there, and the host's /proc is never read.
    os.unlink(tmp_path / "etc" / "passwd")
    (tmp_path / "etc" / "passwd").symlink_to("/proc/self/status")
    with pytest.raises(InvalidRequest, match="not found"):
        resolve_user("nobody", [tmp_path])
