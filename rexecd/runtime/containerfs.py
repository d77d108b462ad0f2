"""Files inside a running container, reached from the host through /proc/PID/root.

Every path is resolved with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) against
the container's root, so ``..``, absolute symlinks and /proc magic links inside the
container can never lead to a host file. Every directory it opens, and every file it
reads, is refused if it lies on a kernel file system (the container's /proc and /sys
would answer host root with more than they tell the container), and only regular
files are ever opened for reading (see ``safeopen``). Needs the daemon's privileges
(root) and a live container init ``pid``. Errors are
``InvalidRequest``/``NotFound``/``Conflict``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from rexecd import _native as n
from rexecd.errors import Conflict, InvalidRequest, NotFound, RexecError
from rexecd.runtime.safeopen import refuse_kernel_fs, reopen_regular

_RESOLVE = n.RESOLVE_IN_ROOT | n.RESOLVE_NO_MAGICLINKS


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    size: int
    mode: int
    mtime: datetime
    is_dir: bool


def _clean(path: str) -> str:
    if not path or "\0" in path:
        raise InvalidRequest("a path is required")
    return "/" + "/".join(p for p in path.split("/") if p and p != ".")


def _translate(exc: OSError, path: str) -> RexecError:
    if exc.errno == errno.ENOENT:
        return NotFound(f"no such file or directory: {path}", path=path)
    if exc.errno == errno.EEXIST:
        return Conflict(f"already exists: {path}", path=path)
    if exc.errno == errno.ENOTDIR:
        return InvalidRequest(f"not a directory: {path}", path=path)
    if exc.errno == errno.EISDIR:
        return InvalidRequest(f"is a directory: {path}", path=path)
    if exc.errno == errno.ENOTEMPTY:
        return Conflict(f"directory not empty: {path}", path=path)
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return InvalidRequest(f"path leaves the container or loops: {path}", path=path)
    if exc.errno == errno.ENOSPC:
        return InvalidRequest(f"no space left in the container: {path}", path=path)
    return InvalidRequest(f"{os.strerror(exc.errno or 0)}: {path}", path=path)


def mode_string(mode: int) -> str:
    return stat.filemode(mode)


class ContainerFS:
    """File operations relative to the root of the container whose init is ``pid``."""

    def __init__(self, pid: int, uid: int = 0, gid: int = 0) -> None:
        try:
            self.root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Conflict("container is not running") from exc
        self.uid, self.gid = uid, gid

    def close(self) -> None:
        os.close(self.root)

    def __enter__(self) -> ContainerFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        rel = _clean(path).lstrip("/") or "."
        try:
            fd = n.openat2(self.root, rel, flags, mode, _RESOLVE)
        except OSError as exc:
            raise _translate(exc, path) from exc
        try:
            refuse_kernel_fs(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """The directory fd holding ``path`` and the last component's name."""
        clean = _clean(path)
        parent, _, name = clean.rpartition("/")
        if not name:
            raise InvalidRequest("the container's root cannot be changed", path=path)
        fd = self._open(parent or "/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _entry(self, dirfd: int, name: str, path: str) -> Entry:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return Entry(
            name=name,
            path=path,
            size=st.st_size,
            mode=st.st_mode,
            mtime=datetime.fromtimestamp(st.st_mtime, UTC),
            is_dir=stat.S_ISDIR(st.st_mode),
        )

    def stat(self, path: str) -> Entry:
        clean = _clean(path)
        if clean == "/":
            st = os.fstat(self.root)
            return Entry(
                "/", "/", st.st_size, st.st_mode, datetime.fromtimestamp(st.st_mtime, UTC), True
            )
        with self._parent(clean) as (pfd, name):
            try:
                return self._entry(pfd, name, clean)
            except OSError as exc:
                raise _translate(exc, path) from exc

    def list(self, path: str) -> list[Entry]:
        clean = _clean(path)
        fd = self._open(clean, os.O_RDONLY | os.O_DIRECTORY)
        try:
            out = []
            with os.scandir(fd) as it:
                for de in it:
                    child = f"{clean.rstrip('/')}/{de.name}"
                    try:
                        out.append(self._entry(fd, de.name, child))
                    except FileNotFoundError:
                        continue  # removed while listing
            return sorted(out, key=lambda e: (not e.is_dir, e.name))
        finally:
            os.close(fd)

    def open_read(self, path: str) -> tuple[Entry, BinaryIO]:
        """A regular file, open for reading; anything else is refused before it is
        opened (a FIFO would block, a device would wake its driver)."""
        pfd = self._open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            fd = reopen_regular(pfd, path)
        finally:
            os.close(pfd)
        st = os.fstat(fd)
        clean = _clean(path)
        entry = Entry(
            clean.rpartition("/")[2],
            clean,
            st.st_size,
            st.st_mode,
            datetime.fromtimestamp(st.st_mtime, UTC),
            False,
        )
        return entry, os.fdopen(fd, "rb")

    def begin_write(self, directory: str, filename: str) -> Upload:
        """Start writing ``filename`` into ``directory``: a temporary file that replaces
        the target atomically on ``commit``."""
        if not filename or "/" in filename or filename in (".", "..") or "\0" in filename:
            raise InvalidRequest(f"invalid file name {filename!r}")
        dirfd = self._open(directory, os.O_RDONLY | os.O_DIRECTORY)
        tmp = f".rexec-upload-{uuid.uuid4().hex}"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dirfd,
            )
        except OSError as exc:
            os.close(dirfd)
            raise _translate(exc, directory) from exc
        path = f"{_clean(directory).rstrip('/')}/{filename}"
        return Upload(self, dirfd, fd, tmp, filename, path)

    def delete(self, path: str) -> None:
        with self._parent(path) as (pfd, name):
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    # A mount point of /proc or /sys is a directory of the parent's file
                    # system by name only: what rmtree would walk is the kernel's.
                    dfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=pfd)
                    try:
                        refuse_kernel_fs(dfd, path)
                    finally:
                        os.close(dfd)
                    # fd-based and symlink-safe: never follows a link out of the tree.
                    shutil.rmtree(name, dir_fd=pfd)
                else:
                    os.unlink(name, dir_fd=pfd)
            except OSError as exc:
                raise _translate(exc, path) from exc

    def mkdir(self, path: str) -> Entry:
        """Create ``path`` and any missing parents (like ``mkdir -p``)."""
        clean = _clean(path)
        parts = [p for p in clean.split("/") if p]
        cur = "/"
        for part in parts:
            nxt = f"{cur.rstrip('/')}/{part}"
            with self._parent(nxt) as (pfd, name):
                try:
                    os.mkdir(name, 0o755, dir_fd=pfd)
                    os.chown(name, self.uid, self.gid, dir_fd=pfd, follow_symlinks=False)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _translate(exc, nxt) from exc
            cur = nxt
        entry = self.stat(clean)
        if not entry.is_dir:
            raise Conflict(f"exists and is not a directory: {clean}", path=clean)
        return entry


class Upload:
    """A file being written into a container; ``commit`` renames it into place."""

    def __init__(self, fs: ContainerFS, dirfd: int, fd: int, tmp: str, name: str, path: str):
        self.fs, self.dirfd, self.fd, self.tmp, self.name, self.path = (
            fs,
            dirfd,
            fd,
            tmp,
            name,
            path,
        )
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            raise _translate(exc, self.path) from exc

    def commit(self) -> Entry:
        try:
            os.fchown(self.fd, self.fs.uid, self.fs.gid)
            os.fsync(self.fd)
            os.rename(self.tmp, self.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
            return self.fs._entry(self.dirfd, self.name, self.path)
        except OSError as exc:
            raise _translate(exc, self.path) from exc
        finally:
            self._close()

    def abort(self) -> None:
        try:
            os.unlink(self.tmp, dir_fd=self.dirfd)
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1
