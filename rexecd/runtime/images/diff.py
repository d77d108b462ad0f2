"""An overlayfs upper directory written out as an OCI layer tar: what a role install
added to its base image, ready to go through the safe unpacker like any pulled layer.

The directory belongs to a build container that has stopped (its cgroup killed), so
nothing changes it while it is read; its content is still the container's, so it is
read as hostile: nothing is followed (symlinks are stored as links, the walk never
enters one), only regular files are opened (O_NOFOLLOW | O_NONBLOCK, then checked),
and device nodes other than whiteouts, sockets and unknown types are left out.

overlayfs's own markers become the OCI spellings the unpacker turns back into them:
a 0/0 character device is the whiteout ``.wh.NAME``, a directory with
``trusted.overlay.opaque`` gets a ``.wh..wh..opq`` member. Only ``user.*`` and
``security.capability`` xattrs are carried (the unpacker keeps no others).
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import SupportsRead

from rexecd.runtime.spec import UsernsSpec

from .unpack import OPAQUE_XATTR

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_OVERFLOW_ID = 65534  # the kernel's overflowuid: an id with no mapping
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class DiffStats:
    entries: int = 0
    file_bytes: int = 0
    skipped: int = 0  # devices, sockets: not part of a layer


def write_diff(
    upper: Path, out: IO[bytes], exclude: Collection[str] = (), ids: UsernsSpec | None = None
) -> DiffStats:
    """Write the tar of ``upper`` to ``out``; ``exclude`` names relative paths (``etc/hosts``)
    left out with whatever is under them. Directories come before what they hold; no
    recursion, so no nesting depth the container chose can break the walk. ``ids`` is
    the build container's user namespace: owners are written as the container saw them."""
    stats = DiffStats()
    links: dict[tuple[int, int], str] = {}
    skip = set(exclude)
    with _Tar.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        assert isinstance(tar, _Tar)
        tar.ids = ids
        todo = [""]
        while todo:
            rel = todo.pop()
            with os.scandir(upper / rel if rel else upper) as it:
                names = sorted(e.name for e in it)
            for name in names:
                path = f"{rel}/{name}" if rel else name
                if path not in skip and _entry(tar, upper, rel, name, links, stats):
                    todo.append(path)
    return stats


class _Tar(tarfile.TarFile):
    """A layer tar whose owners are written back from host ids to a user namespace's."""

    ids: UsernsSpec | None = None

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: SupportsRead[bytes] | None = None) -> None:
        if self.ids is not None:
            tarinfo.uid = _inner(self.ids, tarinfo.uid)
            tarinfo.gid = _inner(self.ids, tarinfo.gid)
        super().addfile(tarinfo, fileobj)


def _inner(ids: UsernsSpec, host: int) -> int:
    """The id inside ``ids`` of host id ``host``; one outside the range (a file the daemon
    made as host root) is nobody's there, as the kernel shows it, never root's."""
    return host - ids.base if ids.base <= host < ids.base + ids.size else _OVERFLOW_ID


def _entry(
    tar: tarfile.TarFile,
    root: Path,
    rel: str,
    name: str,
    links: dict[tuple[int, int], str],
    stats: DiffStats,
) -> bool:
    """Write one entry; True when it is a directory to walk into."""
    path = f"{rel}/{name}" if rel else name
    full = root / path
    st = os.lstat(full)
    mode = st.st_mode
    if stat.S_ISCHR(mode) and st.st_rdev == 0:
        # overlayfs's whiteout: the name is deleted from the layers below.
        _add(tar, _info(f"{rel}/{_WHITEOUT}{name}" if rel else _WHITEOUT + name, st), stats)
    elif stat.S_ISDIR(mode):
        info = _info(path, st, tarfile.DIRTYPE)
        _xattrs(info, full)
        _add(tar, info, stats)
        if _opaque(full):
            _add(tar, _info(f"{path}/{_OPAQUE}", st), stats)
        return True
    elif stat.S_ISLNK(mode):
        info = _info(path, st, tarfile.SYMTYPE)
        info.linkname = os.readlink(full)
        _add(tar, info, stats)
    elif stat.S_ISREG(mode):
        _file(tar, full, path, st, links, stats)
    elif stat.S_ISFIFO(mode):
        _add(tar, _info(path, st, tarfile.FIFOTYPE), stats)
    else:
        stats.skipped += 1
    return False


def _file(
    tar: tarfile.TarFile,
    full: Path,
    path: str,
    st: os.stat_result,
    links: dict[tuple[int, int], str],
    stats: DiffStats,
) -> None:
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        info = _info(path, st, tarfile.LNKTYPE)
        info.linkname = links[key]
        _add(tar, info, stats)
        return
    fd = os.open(full, _OPEN)
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != key:
            raise OSError(f"{path}: changed while the layer was written")
        info = _info(path, fst, tarfile.REGTYPE)
        info.size = fst.st_size
        _xattrs(info, full)
        tar.addfile(info, f)
    stats.entries += 1
    stats.file_bytes += info.size
    if st.st_nlink > 1:
        links[key] = path


def _info(name: str, st: os.stat_result, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    info.uname = info.gname = ""
    if kind != tarfile.REGTYPE or name.rpartition("/")[2].startswith(_WHITEOUT):
        info.size = 0
    return info


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, stats: DiffStats) -> None:
    tar.addfile(info)
    stats.entries += 1


def _xattrs(info: tarfile.TarInfo, full: Path) -> None:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if name.startswith("user.") or name == "security.capability":
            value = os.getxattr(full, name, follow_symlinks=False)
            pax = dict(info.pax_headers)
            pax[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
            info.pax_headers = pax


def _opaque(full: Path) -> bool:
    try:
        return os.getxattr(full, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False
