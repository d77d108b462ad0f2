"""Layer unpacking, the image security boundary: one layer tar into a directory, safely.

Every entry is created relative to a directory fd of the layer root, so that no member
name, link target or earlier symlink can reach outside it; whiteouts become overlayfs
whiteouts.

Rules, beyond "nothing is created, changed or linked outside the layer":

* Names lose leading ``/`` and ``./`` (docker's behaviour: absolute names land inside
  the layer). Any ``..`` component is refused, even one that would stay inside.
* Parent directories are opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS): writing beneath a symlink, even one pointing inside the
  layer, is refused. The last component is always created with a call that does not
  follow symlinks (O_EXCL, mkdirat, symlinkat, linkat without AT_SYMLINK_FOLLOW).
* Symlink targets are stored verbatim: they are only ever resolved inside a container.
* Hard links must name an entry already unpacked in this layer, through real
  directories; hard links to directories are refused by the kernel.
* Sparse members are refused: their map may claim any size from a few bytes.
* The ``images.unpack`` limits hold while the tar streams (see limits.py): every member
  and every parent directory it implies is charged to the import's ``Budget``; names
  and hardlink targets longer or deeper than allowed, and PAX or GNU long-name headers
  past ``MAX_HEADER``, are refused before anything is made of them.
* Character and block devices are skipped (with one warning per layer): the container
  /dev is a tmpfs with a fixed set of nodes, and a device node in an image must never
  become a way into a host device. A 0/0 character device is created only for
  whiteouts, where overlayfs gives it its meaning.
* Only ``user.*`` xattrs and ``security.capability`` are kept from ``SCHILY.xattr.*``
  PAX records: ``trusted.overlay.*`` would let an image steer overlayfs itself
  (redirects, metacopy), and other namespaces are host policy.
* A later member replaces an earlier entry of the same name (a directory over a
  directory merges). Directory modes and mtimes are applied once the layer is complete,
  so that creating children neither fails on read-only directories nor moves mtimes.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from rexecd import _native as n
from rexecd.config import UnpackLimits
from rexecd.errors import ImageError

from .blobs import CHUNK, Reader
from .limits import BoundedTarInfo, Budget, HeaderTooLarge, refuse_header

log = logging.getLogger(__name__)

_RESOLVE = n.RESOLVE_BENEATH | n.RESOLVE_NO_SYMLINKS | n.RESOLVE_NO_MAGICLINKS
_DIR = os.O_RDONLY | os.O_DIRECTORY
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WHITEOUT = ".wh."
_META = ".wh..wh."
_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_PATH_MAX = 4095
# Enough parent fds for the directory locality of real layers, far below RLIMIT_NOFILE.
_FD_CACHE = 128
_XATTR_PREFIX = "SCHILY.xattr."
# tarfile's stream mode re-slices its whole buffer on every read (each header, each
# file): larger than this and copying costs more than the calls it saves.
_TAR_BUFSIZE = 64 * 1024
_ID_MAX = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown: never a real owner
# What tarfile raises, besides TarError, for malformed numbers in a header it reads.
TAR_HEADER_ERRORS = (ValueError, OverflowError)

_REASONS = {
    errno.ELOOP: "path goes through a symlink",
    errno.EXDEV: "path escapes the layer",
    errno.ENOTDIR: "a parent is not a directory",
    errno.ENAMETOOLONG: "name too long",
}


@dataclass
class UnpackStats:
    entries: int = 0
    file_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # device nodes, unknown member types


class _Refused(Exception):
    """A member broke a rule; turned into an ImageError naming it."""


def unpack_layer(
    stream: Reader, dest: Path, label: str, budget: Budget | None = None
) -> UnpackStats:
    """Unpack the uncompressed layer tar ``stream`` into the empty directory ``dest``,
    charging what it creates to ``budget`` (default: a new one of the default limits).

    Raises ImageError (ImageTooLarge past a limit) naming ``label`` and the offending
    member. On error ``dest`` holds a partial tree that the caller must discard.
    """
    u = _Unpacker(dest, label, budget if budget is not None else Budget(UnpackLimits()))
    try:
        return u.run(stream)
    finally:
        u.close()


class _Unpacker:
    def __init__(self, dest: Path, label: str, budget: Budget) -> None:
        self.label = label
        self.budget = budget
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        # Parent directory fds by layer-relative path; LRU. Evicted or invalidated fds
        # are closed only after the current member, as callers may still hold them.
        self.cache: OrderedDict[str, int] = OrderedDict()
        self.retired: list[int] = []
        self.dir_meta: dict[str, tarfile.TarInfo] = {}
        self.skipped: set[str] = set()
        self.chown = os.geteuid() == 0
        self.stats = UnpackStats()

    def close(self) -> None:
        for fd in [*self.cache.values(), *self.retired, self.root]:
            os.close(fd)
        self.cache.clear()
        self.retired.clear()

    def run(self, stream: Reader) -> UnpackStats:
        os.fchmod(self.root, 0o755)  # unless the layer has a "./" entry saying otherwise
        current = "(start of layer)"
        try:
            with tarfile.open(
                fileobj=cast(IO[bytes], stream),
                mode="r|",
                bufsize=_TAR_BUFSIZE,
                encoding="utf-8",
                errors="surrogateescape",
                tarinfo=BoundedTarInfo,
            ) as tar:
                while (m := tar.next()) is not None:
                    # TarFile keeps every member it has read in .members (not in the
                    # stubs); nothing here looks back, so keep memory flat.
                    cast(Any, tar).members.clear()
                    current = m.name
                    self._member(tar, m)
                    self.stats.entries += 1
                    self._release()
            current = "(end of layer)"
            self._finish_dirs()
        except (tarfile.TarError, *TAR_HEADER_ERRORS) as e:
            # tarfile parses PAX numbers with int()/float() unguarded: a header saying
            # GNU.sparse.size=v is a ValueError, not a TarError (found by fuzzing).
            raise ImageError(f"{self.label}: corrupt tar at member {current!r}: {e}") from None
        except HeaderTooLarge as e:
            raise refuse_header(self.label, current, e) from None
        if self.stats.skipped:
            shown = ", ".join(repr(s) for s in self.stats.skipped[:5])
            log.warning(
                "%s: skipped %d device node(s) or unsupported member(s): %s%s",
                self.label,
                len(self.stats.skipped),
                shown,
                ", ..." if len(self.stats.skipped) > 5 else "",
            )
        return self.stats

    def _fail(self, m: tarfile.TarInfo, reason: str) -> ImageError:
        return ImageError(f"{self.label}: member {m.name!r}: {reason}", member=m.name)

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        try:
            self._dispatch(tar, m)
        except _Refused as e:
            raise self._fail(m, str(e)) from None
        except OSError as e:
            reason = _REASONS.get(e.errno or 0, e.strerror or str(e))
            raise self._fail(m, reason) from None
        except (OverflowError, ValueError) as e:
            raise self._fail(m, str(e)) from None

    def _dispatch(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        if m.issparse():
            # The sparse map is the archive's word: a few bytes may claim a file of
            # any size, and the holes would be written out as zeros. No image needs it.
            raise _Refused("sparse files are not supported")
        parts = _components(m.name)
        self.budget.check_name(m.name, len(parts), self.label)
        self.budget.charge_entries(1, self.label)
        if not parts:
            if not m.isdir():
                raise _Refused("only a directory may stand for the layer root")
            self._own_dir(self.root, m)
            self.dir_meta[""] = m
            return
        rel = "/".join(parts)
        parent, base = rel.rpartition("/")[0], parts[-1]
        self.skipped.discard(rel)  # whatever this member is, it is the latest of its name
        if base.startswith(_WHITEOUT):
            self._whiteout(parent, base)
        elif m.ischr() or m.isblk():
            self._skip(self._dir(parent), rel, base, m)
        elif m.isreg():
            self._file(tar, m, self._dir(parent), rel, base)
        elif m.isdir():
            self._mkdir(m, self._dir(parent), rel, base)
        elif m.issym():
            self._symlink(m, self._dir(parent), rel, base)
        elif m.islnk():
            self._hardlink(m, rel, base)
        elif m.isfifo():
            self._fifo(m, self._dir(parent), rel, base)
        else:
            self._skip(self._dir(parent), rel, base, m)

    # --- directory fds --------------------------------------------------------------

    def _dir(self, rel: str, create: bool = True) -> int:
        """An fd of the directory at ``rel``, creating missing ones (mode 0755)."""
        if not rel:
            return self.root
        fd = self.cache.get(rel)
        if fd is not None:
            self.cache.move_to_end(rel)
            return fd
        parts = rel.split("/")
        base, done = self.root, 0
        for i in range(len(parts) - 1, 0, -1):
            anc = self.cache.get("/".join(parts[:i]))
            if anc is not None:
                base, done = anc, i
                break
        try:
            fd = n.openat2(base, "/".join(parts[done:]), _DIR, resolve=_RESOLVE)
        except FileNotFoundError:
            if not create:
                raise
            fd = self._make_dirs(base, parts, done)
        self._remember(rel, fd)
        return fd

    def _make_dirs(self, base: int, parts: list[str], done: int) -> int:
        fd = base
        for i in range(done, len(parts)):
            try:
                fd = n.openat2(fd, parts[i], _DIR, resolve=_RESOLVE)
            except FileNotFoundError:
                self.budget.charge_entries(1, self.label)
                os.mkdir(parts[i], 0o700, dir_fd=fd)
                fd = n.openat2(fd, parts[i], _DIR, resolve=_RESOLVE)
                # Explicit: the daemon's umask must not decide what the image sees.
                os.fchmod(fd, 0o755)
            if i < len(parts) - 1:
                self._remember("/".join(parts[: i + 1]), fd)
        return fd

    def _remember(self, rel: str, fd: int) -> None:
        old = self.cache.pop(rel, None)
        if old is not None and old != fd:
            self.retired.append(old)
        self.cache[rel] = fd
        while len(self.cache) > _FD_CACHE:
            self.retired.append(self.cache.popitem(last=False)[1])

    def _forget(self, rel: str) -> None:
        prefix = rel + "/"
        for k in [k for k in self.cache if k == rel or k.startswith(prefix)]:
            self.retired.append(self.cache.pop(k))
        for k in [k for k in self.dir_meta if k == rel or k.startswith(prefix)]:
            del self.dir_meta[k]

    def _release(self) -> None:
        for fd in self.retired:
            os.close(fd)
        self.retired.clear()

    def _remove(self, pfd: int, rel: str, base: str) -> None:
        """Remove the entry a later member replaces (never following a symlink)."""
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        self._forget(rel)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)

    # --- entry kinds ----------------------------------------------------------------

    def _file(
        self, tar: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, rel: str, base: str
    ) -> None:
        try:
            fd = os.open(base, _CREATE, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, rel, base)
            fd = os.open(base, _CREATE, 0o600, dir_fd=pfd)
        try:
            if m.size:
                src = tar.extractfile(m)
                assert src is not None
                while data := src.read(CHUNK):
                    _write_all(fd, data)
                self.stats.file_bytes += m.size
            # Order matters: writing drops security.capability, chown drops set[ug]id
            # and security.capability; so data, owner, mode, then xattrs.
            if self.chown:
                os.fchown(fd, *_ids(m))
            os.fchmod(fd, m.mode & 0o7777)
            self._xattrs(m, fd)
            os.utime(fd, ns=_times(m))
        finally:
            os.close(fd)

    def _mkdir(self, m: tarfile.TarInfo, pfd: int, rel: str, base: str) -> None:
        opaque = False
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                # Over this layer's own whiteout the directory must still hide the
                # lower one: overlayfs needs it opaque for that.
                opaque = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                self._remove(pfd, rel, base)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = n.openat2(pfd, base, _DIR, resolve=_RESOLVE)
        self._remember(rel, fd)
        self._own_dir(fd, m)
        if opaque:
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        self.dir_meta[rel] = m

    def _own_dir(self, fd: int, m: tarfile.TarInfo) -> None:
        if self.chown:
            os.fchown(fd, *_ids(m))
        self._xattrs(m, fd)

    def _symlink(self, m: tarfile.TarInfo, pfd: int, rel: str, base: str) -> None:
        if not m.linkname:
            raise _Refused("symlink with an empty target")
        try:
            os.symlink(m.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, rel, base)
            os.symlink(m.linkname, base, dir_fd=pfd)
        self._own_by_name(m, pfd, base)

    def _fifo(self, m: tarfile.TarInfo, pfd: int, rel: str, base: str) -> None:
        try:
            os.mkfifo(base, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, rel, base)
            os.mkfifo(base, 0o600, dir_fd=pfd)
        if self.chown:
            os.chown(base, *_ids(m), dir_fd=pfd, follow_symlinks=False)
        # There is no chmod that refuses symlinks by name on this kernel ABI; going
        # through an O_PATH fd of what was just created is the same check.
        fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise _Refused("FIFO was replaced while unpacking")
            os.chmod(f"/proc/self/fd/{fd}", m.mode & 0o7777)
        finally:
            os.close(fd)
        self._own_by_name(m, pfd, base, chown=False)

    def _own_by_name(self, m: tarfile.TarInfo, pfd: int, base: str, chown: bool = True) -> None:
        if chown and self.chown:
            os.chown(base, *_ids(m), dir_fd=pfd, follow_symlinks=False)
        self._xattrs(m, f"/proc/self/fd/{pfd}/{base}")
        os.utime(base, ns=_times(m), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, m: tarfile.TarInfo, rel: str, base: str) -> None:
        try:
            tparts = _components(m.linkname)
        except _Refused as e:
            raise _Refused(f"hardlink target {m.linkname!r}: {e}") from None
        self.budget.check_name(m.linkname, len(tparts), self.label)
        trel = "/".join(tparts)
        if not tparts:
            raise _Refused("hardlink to the layer root")
        if trel in self.skipped:
            self._skip(self._dir(rel.rpartition("/")[0]), rel, base, m)
            return
        try:
            tpfd = self._dir(trel.rpartition("/")[0], create=False)
        except FileNotFoundError:
            raise _Refused(f"hardlink target {m.linkname!r} is not in this layer") from None
        except OSError as e:
            reason = _REASONS.get(e.errno or 0, e.strerror)
            raise _Refused(f"hardlink target {m.linkname!r}: {reason}") from None
        pfd = self._dir(rel.rpartition("/")[0])
        tbase = tparts[-1]
        if trel == rel:
            os.stat(base, dir_fd=pfd, follow_symlinks=False)  # must exist already
            return
        for attempt in (0, 1):
            try:
                os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
                return
            except FileExistsError:
                if attempt:
                    raise
                self._remove(pfd, rel, base)
            except FileNotFoundError:
                raise _Refused(f"hardlink target {m.linkname!r} is not in this layer") from None
            except PermissionError as e:
                if e.errno != errno.EPERM:
                    raise
                raise _Refused(f"hardlink target {m.linkname!r} is a directory") from None

    def _whiteout(self, parent: str, base: str) -> None:
        pfd = self._dir(parent)
        if base == _OPAQUE:
            os.setxattr(pfd, OPAQUE_XATTR, b"y")
            return
        if base.startswith(_META):
            return  # other aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): no meaning here
        name = base[len(_WHITEOUT) :]
        if name in ("", ".", ".."):
            raise _Refused("whiteout of nothing")
        try:
            n.mknodat(pfd, name, stat.S_IFCHR, 0, 0)
        except FileExistsError:
            # A whiteout hides only lower layers. An entry of this layer with the same
            # name stays; if it is a directory, it must hide the lower one: opaque.
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.setxattr(self._dir(f"{parent}/{name}" if parent else name), OPAQUE_XATTR, b"y")

    def _skip(self, pfd: int, rel: str, base: str, m: tarfile.TarInfo) -> None:
        # Not created, yet still the latest member of that name: what it replaces goes.
        try:
            self._remove(pfd, rel, base)
        except FileNotFoundError:
            pass
        self.skipped.add(rel)
        self.stats.skipped.append(m.name)

    def _xattrs(self, m: tarfile.TarInfo, target: int | str) -> None:
        for key, value in m.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            name = key[len(_XATTR_PREFIX) :]
            if not (name.startswith("user.") or name == "security.capability"):
                log.debug("%s: %r: dropping xattr %s", self.label, m.name, name)
                continue
            raw = value.encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, raw)
                else:
                    os.setxattr(target, name, raw, follow_symlinks=False)
            except OSError as e:
                # Filesystems without user xattrs, or xattrs a symlink cannot carry:
                # the file itself is still right.
                log.warning("%s: %r: cannot set xattr %s: %s", self.label, m.name, name, e)

    def _finish_dirs(self) -> None:
        # Deepest first, so that a parent made read-only never blocks a child.
        for rel in sorted(self.dir_meta, key=lambda r: r.count("/") if r else -1, reverse=True):
            m = self.dir_meta[rel]
            try:
                fd = n.openat2(self.root, rel, _DIR, resolve=_RESOLVE) if rel else self.root
            except OSError as e:
                raise self._fail(m, _REASONS.get(e.errno or 0, e.strerror or str(e))) from None
            try:
                os.fchmod(fd, m.mode & 0o7777)
                os.utime(fd, ns=_times(m))
            finally:
                if fd != self.root:
                    os.close(fd)


def _components(name: str) -> list[str]:
    """Split a member name into components, refusing any that could leave the layer."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused("'..' in name")
    if "\0" in name:
        raise _Refused("NUL in name")
    if len(name.encode("utf-8", "surrogateescape")) > _PATH_MAX:
        raise _Refused("name too long")
    return parts


def _ids(m: tarfile.TarInfo) -> tuple[int, int]:
    if not (0 <= m.uid <= _ID_MAX and 0 <= m.gid <= _ID_MAX):
        raise _Refused(f"owner {m.uid}:{m.gid} out of range")
    return m.uid, m.gid


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    # PAX mtimes are fractional; tar headers give whole seconds.
    ns = int(m.mtime * 1_000_000_000) if isinstance(m.mtime, float) else m.mtime * 1_000_000_000
    return ns, ns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
