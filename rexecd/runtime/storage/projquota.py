"""``ProjectQuotaStorage``: per-container disk quota as a project on the state dir's file system.

A volume is the directory ``STATE/volumes/<user>/<name>`` holding upper, work and home.
Its inode carries a project id and PROJINHERIT, so everything made below it is charged
to that project, and the project's hard block limit is the volume's size. The kernel
keeps both (the id in the inode, the limit in the file system's quota file, journaled),
so there is no record of ours that could disagree with them, and a directory rename
keeps the id. Nothing is mounted: ``mountpoint`` is the directory itself.

Requires root (CAP_SYS_ADMIN to set limits), Linux >= 5.14 (quotactl_fd), and the state
dir on ext4 made with ``-O quota,project`` and mounted with ``prjquota`` (a kernel with
CONFIG_QFMT_V2), or on xfs mounted with ``pquota`` (CONFIG_XFS_QUOTA). ``probe`` says
whether a directory qualifies, and why not.

Limits: the kernel lets the owner of a file in the initial user namespace change its
project id or clear PROJINHERIT on its directories (FS_IOC_FSSETXATTR), which moves the
file out of the quota. The quota holds against a container only while the container
cannot make that ioctl (a seccomp filter, or a user namespace). Writers with
CAP_SYS_RESOURCE ignore quota limits (overlayfs drops it for its own writes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from rexecd import _native as n
from rexecd.errors import Conflict, InvalidRequest, NotFound, RexecError, RuntimeFailure
from rexecd.runtime.durable import fsync_dir
from rexecd.runtime.storage import mountinfo
from rexecd.runtime.storage.volume import (
    Storage,
    Volume,
    check_component,
    check_size,
    make_dirs,
    wipe_dirs,
)

log = logging.getLogger(__name__)

# linux/fs.h: _IOR/_IOW('X', 31/32, struct fsxattr).
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x00000200
# struct fsxattr: xflags, extsize, nextents, projid, cowextsize (u32); pad[8].
_FSXATTR = struct.Struct("=5I8s")

# linux/quota.h and linux/dqblk_xfs.h.
PRJQUOTA = 2
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
Q_XGETQSTATV = 0x5808
QIF_BLIMITS = 1
QIF_ILIMITS = 4
QIF_DQBLKSIZE = 1024  # the unit of dqb_bhardlimit (dqb_curspace is in bytes)
FS_QUOTA_PDQ_ACCT = 1 << 4
FS_QUOTA_PDQ_ENFD = 1 << 5
FS_QSTATV_VERSION1 = 1
# struct if_dqblk: bhardlimit, bsoftlimit, curspace, ihardlimit, isoftlimit, curinodes,
# btime, itime (u64); valid (u32). 72 bytes with the tail padding of 64-bit ABIs; the
# same offsets and 4 bytes more than i386's 68, so one buffer size suits every ABI.
_IF_DQBLK = struct.Struct("=8QI4x")
# struct fs_quota_statv is 160 bytes; only version (s8) and flags (u16 at 2) are read.
_STATV_SIZE = 160
_STATV_HEAD = struct.Struct("=bBH")

# Ids are drawn from here: above the small numbers operators give their own projects
# in /etc/projid, and below 2**31 so that no tool prints one as negative.
PROJID_MIN = 1 << 24
PROJID_MAX = (1 << 31) - 1
_ALLOC_TRIES = 32
# How long destroy() waits for the space of a deleted volume to be handed back before
# it leaves the project's limit in place (xfs reclaims deleted inodes in the background).
RECLAIM_WAIT = 2.0

# Volume names never contain a dot, so these can never be taken for a volume.
_PART_SUFFIX = ".part"  # being made: removed by the next ensure() or reconcile()
_GONE_INFIX = ".gone-"  # being deleted: the same

_ENFORCING_OPTIONS = frozenset({"prjquota", "pquota"})
_SUPPORTED_FS = ("ext4", "xfs")


def qcmd(cmd: int, qtype: int) -> int:
    """``QCMD(cmd, type)`` of linux/quota.h: the first argument of quotactl."""
    return (cmd << 8) | (qtype & 0xFF)


# -- kernel formats --------------------------------------------------------------------


@dataclass(frozen=True)
class FsXattr:
    """``struct fsxattr`` of FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR."""

    xflags: int = 0
    extsize: int = 0
    nextents: int = 0
    projid: int = 0
    cowextsize: int = 0

    def pack(self) -> bytes:
        return _FSXATTR.pack(
            self.xflags, self.extsize, self.nextents, self.projid, self.cowextsize, b""
        )

    @classmethod
    def unpack(cls, raw: bytes | bytearray) -> FsXattr:
        xflags, extsize, nextents, projid, cowextsize, _ = _FSXATTR.unpack_from(raw)
        return cls(xflags, extsize, nextents, projid, cowextsize)


@dataclass(frozen=True)
class DqBlk:
    """``struct if_dqblk`` of Q_GETQUOTA / Q_SETQUOTA: block limits in 1 KiB units,
    space in bytes; ``valid`` says which fields a set applies."""

    bhardlimit: int = 0
    bsoftlimit: int = 0
    curspace: int = 0
    ihardlimit: int = 0
    isoftlimit: int = 0
    curinodes: int = 0
    btime: int = 0
    itime: int = 0
    valid: int = 0

    def pack(self) -> bytes:
        return _IF_DQBLK.pack(
            self.bhardlimit,
            self.bsoftlimit,
            self.curspace,
            self.ihardlimit,
            self.isoftlimit,
            self.curinodes,
            self.btime,
            self.itime,
            self.valid,
        )

    @classmethod
    def unpack(cls, raw: bytes | bytearray) -> DqBlk:
        return cls(*_IF_DQBLK.unpack_from(raw))

    @property
    def unused(self) -> bool:
        """Nothing charged and no limit: the id belongs to no one."""
        return (
            not any(
                (self.bhardlimit, self.bsoftlimit, self.curspace, self.ihardlimit, self.isoftlimit)
            )
            and not self.curinodes
        )


def statv_request() -> bytearray:
    """A ``struct fs_quota_statv`` buffer asking for version 1 (the kernel checks it)."""
    buf = bytearray(_STATV_SIZE)
    _STATV_HEAD.pack_into(buf, 0, FS_QSTATV_VERSION1, 0, 0)
    return buf


def statv_flags(raw: bytes | bytearray) -> int:
    """``qs_flags`` (FS_QUOTA_*) of a filled ``struct fs_quota_statv``."""
    return int(_STATV_HEAD.unpack_from(raw)[2])


# -- does a file system qualify ------------------------------------------------------


@dataclass(frozen=True)
class Support:
    """Whether project quota can be enforced where a path lives; ``reason`` says what
    was found (and why not, when ``ok`` is false)."""

    ok: bool
    reason: str


def mount_of(
    mounts: Sequence[mountinfo.Mount], path: Path, dev: tuple[int, int]
) -> mountinfo.Mount | None:
    """The mount that holds the resolved ``path``: the deepest mount point at or above it,
    the last mounted where several share it. Mounts of device ``dev`` (the path's
    ``st_dev``) win, so a bind mount of another file system above it is not taken;
    without any (btrfs reports other numbers), the deepest of all."""
    above = [m for m in mounts if path == m.mountpoint or path.is_relative_to(m.mountpoint)]
    same = [m for m in above if (m.major, m.minor) == dev] or above
    best: mountinfo.Mount | None = None
    for m in same:  # in mount order: a later mount on the same point hides an earlier one
        if best is None or len(m.mountpoint.parts) >= len(best.mountpoint.parts):
            best = m
    return best


def judge(mount: mountinfo.Mount | None, path: Path) -> Support:
    """What mountinfo alone says about project quota for ``path`` on ``mount``."""
    if mount is None:
        return Support(False, f"no mount in /proc/self/mountinfo holds {path}")
    where = f"{path} is on {mount.fstype} ({mount.source} at {mount.mountpoint})"
    if mount.fstype not in _SUPPORTED_FS:
        return Support(False, f"{where}: project quota needs ext4 or xfs")
    if not _ENFORCING_OPTIONS & set(mount.super_options.split(",")):
        how = (
            "mkfs.ext4 or tune2fs -O quota,project, then mount -o prjquota"
            if mount.fstype == "ext4"
            else "mount -o pquota"
        )
        return Support(False, f"{where}, mounted without project quota enforcement ({how})")
    return Support(True, f"{where} with project quota enforced")


def probe(path: Path) -> Support:
    """Whether ``path`` (or its nearest existing parent) is on a file system that
    enforces project quota: mountinfo first, then the kernel's own answer (quotactl)."""
    here = path.resolve()
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        st = os.stat(here)
        mount = mount_of(mountinfo.read(), here, (os.major(st.st_dev), os.minor(st.st_dev)))
    except OSError as exc:
        return Support(False, f"cannot inspect {here}: {exc}")
    found = judge(mount, path)
    if not found.ok:
        return found
    try:
        flags = _quota_state(here)
        _get_xattr(here)
    except OSError as exc:
        hint = " (quotactl_fd needs Linux >= 5.14)" if exc.errno == errno.ENOSYS else ""
        return Support(False, f"{found.reason}, but the kernel refuses: {exc}{hint}")
    if not flags & FS_QUOTA_PDQ_ENFD:
        return Support(False, f"{found.reason}, but the kernel reports it not enforced")
    return found


# -- kernel calls (raise OSError) --------------------------------------------------------


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _get_xattr(path: Path) -> FsXattr:
    fd = _open_dir(path)
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    except OSError as exc:
        raise OSError(exc.errno, f"FS_IOC_FSGETXATTR: {exc.strerror}", str(path)) from exc
    finally:
        os.close(fd)
    return FsXattr.unpack(raw)


def _set_project(path: Path, projid: int, inherit: bool) -> None:
    """Give the directory ``path`` project ``projid``, with or without PROJINHERIT; the
    other attributes stay as they are."""
    fd = _open_dir(path)
    try:
        old = FsXattr.unpack(fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size)))
        flags = old.xflags | FS_XFLAG_PROJINHERIT if inherit else old.xflags & ~FS_XFLAG_PROJINHERIT
        new = FsXattr(flags, old.extsize, old.nextents, projid, old.cowextsize)
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, new.pack())
    except OSError as exc:
        raise OSError(exc.errno, f"FS_IOC_FSSETXATTR: {exc.strerror}", str(path)) from exc
    finally:
        os.close(fd)


def _quotactl(path: Path, cmd: int, qid: int, buf: bytearray) -> None:
    fd = _open_dir(path)
    try:
        n.quotactl_fd(fd, qcmd(cmd, PRJQUOTA), qid, buf, str(path))
    finally:
        os.close(fd)


def _quota_state(path: Path) -> int:
    buf = statv_request()
    _quotactl(path, Q_XGETQSTATV, 0, buf)
    return statv_flags(buf)


def _get_quota(path: Path, projid: int) -> DqBlk:
    buf = bytearray(_IF_DQBLK.size)
    try:
        _quotactl(path, Q_GETQUOTA, projid, buf)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # xfs: no dquot for an id nothing ever used
            return DqBlk()
        raise
    return DqBlk.unpack(buf)


def _set_quota(path: Path, projid: int, dq: DqBlk) -> None:
    _quotactl(path, Q_SETQUOTA, projid, bytearray(dq.pack()))


# -- the Storage ------------------------------------------------------------------------


class ProjectQuotaStorage(Storage):
    """Volumes as project-quota directories ``STATE/volumes/<user>/<name>``.

    Limits are set with the generic Q_SETQUOTA on ext4 and xfs alike (the VFS converts
    for xfs, which is what Q_XSETQLIM would reach too), so one code path serves both.
    A full volume fails writes with EDQUOT on ext4 and ENOSPC on xfs.
    """

    def __init__(self, state_dir: Path) -> None:
        # Refuse up front: on a file system without enforcement every call would
        # succeed and no quota would hold.
        self.root = state_dir.resolve() / "volumes"
        support = probe(self.root)
        if not support.ok:
            raise RuntimeFailure("project quota", support.reason, errno.EOPNOTSUPP)
        try:
            self.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _plain_dir(self.root)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("create volume dirs", exc) from exc
        self._guard = threading.Lock()
        self._alloc = threading.Lock()
        super().__init__()
        # Ensured and not released since, by this process: what rename refuses to move.
        self._active: set[tuple[str, str]] = set()

    # -- the Storage contract -----------------------------------------------------

    def ensure(
        self, user_id: str, name: str, size_mb: int, owner: tuple[int, int] = (0, 0)
    ) -> Volume:
        want = check_size(size_mb) * QIF_DQBLKSIZE
        vol = self._volume(user_id, name)
        with self._lock(vol), ExitStack() as undo:
            if not _is_dir(vol.mountpoint):
                self._create(vol, want)
                undo.callback(self._discard_quietly, vol.mountpoint)
            projid = self._projid(vol)
            if self._get(projid).bhardlimit < want:
                self._set(projid, _limit(want))
            make_dirs(vol, owner)
            undo.pop_all()
            with self._guard:
                self._active.add((user_id, name))
            return self._sized(vol)

    def volume(self, user_id: str, name: str) -> Volume:
        return self._volume(user_id, name)

    def rename(self, user_id: str, old: str, new: str) -> None:
        src, dst = self._volume(user_id, old), self._volume(user_id, new)
        with self._lock_pair(src, dst):
            with self._guard:
                busy = {(user_id, old), (user_id, new)} & self._active
            if busy:
                raise Conflict(f"volume {user_id}/{old} or {user_id}/{new} is in use")
            if not _is_dir(src.mountpoint):
                return
            if dst.mountpoint.exists():
                raise Conflict(f"a volume named {new} already exists", name=new)
            try:
                # The project id lives in the directory's inode: it moves with it.
                os.rename(src.mountpoint, dst.mountpoint)
                fsync_dir(dst.mountpoint.parent)
            except OSError as exc:
                raise RuntimeFailure.from_oserror("rename volume", exc) from exc

    def release(self, vol: Volume) -> None:
        vol = self._own(vol)
        with self._lock(vol), self._guard:
            self._active.discard((vol.user_id, vol.name))

    def wipe_root(self, vol: Volume) -> None:
        vol = self._own(vol)
        with self._lock(vol):
            if not _is_dir(vol.mountpoint):
                raise NotFound(f"no volume {vol.user_id}/{vol.name}")
            wipe_dirs(vol)

    def destroy(self, user_id: str, name: str) -> None:
        vol = self._volume(user_id, name)
        with self._lock(vol):
            with self._guard:
                self._active.discard((user_id, name))
            part = _sibling(vol, _PART_SUFFIX)
            if part.exists():
                self._discard(part)
            if not _is_dir(vol.mountpoint):
                return
            # Out of the way first, so a crash during the slow delete leaves no
            # half-deleted volume under the name, only rubbish reconcile() sweeps.
            gone = _sibling(vol, f"{_GONE_INFIX}{uuid.uuid4().hex[:12]}")
            try:
                os.rename(vol.mountpoint, gone)
                fsync_dir(gone.parent)
            except OSError as exc:
                raise RuntimeFailure.from_oserror("remove volume", exc) from exc
            self._discard(gone)

    def resize(self, vol: Volume, size_mb: int) -> Volume:
        want = check_size(size_mb) * QIF_DQBLKSIZE
        vol = self._own(vol)
        with self._lock(vol):
            projid = self._projid(vol)
            have = self._get(projid).bhardlimit
            if want < have:
                raise InvalidRequest(
                    f"cannot shrink volume {vol.user_id}/{vol.name} from "
                    f"{have // QIF_DQBLKSIZE} MB to {size_mb} MB: a volume only grows "
                    "(a lower limit than the data it holds would leave it unwritable)",
                    size_mb=have // QIF_DQBLKSIZE,
                )
            if want > have:
                # Online and instant: the new limit applies to the next allocation.
                self._set(projid, _limit(want))
            return self._sized(vol)

    def usage(self, vol: Volume) -> tuple[int, int]:
        vol = self._own(vol)
        dq = self._get(self._projid(vol))
        # The quota, not statfs: statfs shows the whole file system's usage whenever
        # the limit is above the file system's size.
        return dq.curspace, dq.bhardlimit * QIF_DQBLKSIZE

    def space(self, vol: Volume) -> tuple[int, int]:
        # The quota counts whether or not anything runs: no mount to look at.
        return self.usage(vol)

    def stored(self) -> list[tuple[str, str]]:
        return self._existing()

    def mounted(self) -> list[Volume]:
        vols = []
        for user_id, name in self._existing():
            vol = self._volume(user_id, name)
            try:
                vols.append(self._sized(vol))
            except RexecError:
                vols.append(vol)  # no project id or quota: still a volume of ours
        return vols

    def reconcile(self, keep: set[tuple[str, str]]) -> list[str]:
        # Nothing is mounted: releasing only forgets what this process marked in use.
        with self._guard:
            released = sorted(self._active - keep)
            self._active &= keep
        for user_dir in self._user_dirs():
            for entry in sorted(user_dir.iterdir()):
                if _PART_SUFFIX not in entry.name and _GONE_INFIX not in entry.name:
                    continue
                try:
                    owner = self._volume(user_dir.name, entry.name.split(".")[0])
                except InvalidRequest:
                    continue  # not a name we would have made
                # Under the volume's lock: an ensure() of that name may be making it.
                with self._lock(owner):
                    if entry.exists():
                        log.info("removing %s left by an interrupted create or delete", entry)
                        self._discard_quietly(entry)
        return [f"{u}/{nm}" for u, nm in released]

    # -- steps ----------------------------------------------------------------------

    def _create(self, vol: Volume, want: int) -> None:
        """Make the volume directory in project of its own with limit ``want`` (KiB):
        built under a temporary name and renamed, so the name only ever shows a
        complete volume."""
        part = _sibling(vol, _PART_SUFFIX)
        try:
            _plain_dir(vol.mountpoint.parent)
            if part.exists():
                self._discard(part)
            part.mkdir(mode=0o755)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("create volume", exc) from exc
        try:
            with self._alloc:
                # Under the lock until the directory is charged to the id, which is what
                # makes the id look taken to the next allocation.
                projid = self._free_projid()
                try:
                    _set_project(part, projid, inherit=True)
                except OSError as exc:
                    raise RuntimeFailure.from_oserror("set volume project", exc) from exc
            self._set(projid, _limit(want))
            try:
                os.rename(part, vol.mountpoint)
                fsync_dir(vol.mountpoint.parent)
            except OSError as exc:
                raise RuntimeFailure.from_oserror("create volume", exc) from exc
        except BaseException:
            self._discard_quietly(part)
            raise

    def _free_projid(self) -> int:
        for _ in range(_ALLOC_TRIES):
            candidate = PROJID_MIN + secrets.randbelow(PROJID_MAX - PROJID_MIN + 1)
            # The kernel's own accounting is the collision check: an id in use by any
            # directory (ours or an operator's) has at least that inode charged to it,
            # and one with a limit set is someone's even while empty.
            if self._get(candidate).unused:
                return candidate
        raise RuntimeFailure(
            "allocate project id", f"no free project id in {_ALLOC_TRIES} tries", errno.EAGAIN
        )

    def _discard(self, path: Path) -> None:
        """Delete ``path`` (a volume dir moved aside) and drop its project's limit once
        nothing is charged to it any more."""
        try:
            projid = _get_xattr(path).projid
        except OSError:
            projid = 0
        try:
            # rmtree works on fds and never follows a symlink out of the volume.
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RuntimeFailure.from_oserror("remove volume", exc) from exc
        if not projid:
            return
        left = self._get(projid)
        deadline = time.monotonic() + RECLAIM_WAIT
        while (left.curinodes or left.curspace) and time.monotonic() < deadline:
            # xfs frees deleted inodes from a background worker; statfs prods it.
            os.statvfs(self.root)
            time.sleep(0.01)
            left = self._get(projid)
        if left.curinodes or left.curspace:
            # A process still holds a deleted file open: the limit keeps bounding it,
            # and the id stays taken until that file goes.
            log.info(
                "project %d of %s still holds %d bytes: limit kept", projid, path, left.curspace
            )
            return
        self._set(projid, DqBlk(valid=QIF_BLIMITS | QIF_ILIMITS))

    def _discard_quietly(self, path: Path) -> None:
        try:
            self._discard(path)
        except RexecError as exc:
            log.warning("could not remove %s: %s", path, exc.message)

    # -- helpers ----------------------------------------------------------------------

    def _get(self, projid: int) -> DqBlk:
        try:
            return _get_quota(self.root, projid)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("read volume quota", exc) from exc

    def _set(self, projid: int, dq: DqBlk) -> None:
        try:
            _set_quota(self.root, projid, dq)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("set volume quota", exc) from exc

    def _projid(self, vol: Volume) -> int:
        """The project id of an existing volume, checked to be one of ours."""
        try:
            attr = _get_xattr(vol.mountpoint)
        except FileNotFoundError as exc:
            raise NotFound(f"no volume {vol.user_id}/{vol.name}") from exc
        except OSError as exc:
            raise RuntimeFailure.from_oserror("read volume project", exc) from exc
        if not attr.projid or not attr.xflags & FS_XFLAG_PROJINHERIT:
            raise RuntimeFailure(
                "read volume project",
                f"{vol.mountpoint} is not a project-quota volume (project {attr.projid}, "
                f"PROJINHERIT {'on' if attr.xflags & FS_XFLAG_PROJINHERIT else 'off'})",
                errno.EUCLEAN,
            )
        return attr.projid

    def _sized(self, vol: Volume) -> Volume:
        dq = self._get(self._projid(vol))
        return vol.model_copy(update={"size_mb": dq.bhardlimit // QIF_DQBLKSIZE})

    def _volume(self, user_id: str, name: str) -> Volume:
        path = self.root / check_component("user id", user_id) / check_component("name", name)
        return Volume(user_id=user_id, name=name, image=path, mountpoint=path, size_mb=0)

    def _own(self, vol: Volume) -> Volume:
        # Paths always come from our layout, never from a Volume handed back to us.
        return self._volume(vol.user_id, vol.name)

    def _user_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(d for d in self.root.iterdir() if _is_dir(d))

    def _existing(self) -> list[tuple[str, str]]:
        found = []
        for user_dir in self._user_dirs():
            for d in user_dir.iterdir():
                try:
                    key = (
                        check_component("user id", user_dir.name),
                        check_component("name", d.name),
                    )
                except InvalidRequest:
                    continue  # leftovers of interrupted work, or not ours
                if _is_dir(d):
                    found.append(key)
        return sorted(found)



def _limit(kib: int) -> DqBlk:
    # Hard limit only: a soft limit would let writes through past it for a grace time.
    return DqBlk(bhardlimit=kib, valid=QIF_BLIMITS)


def _sibling(vol: Volume, suffix: str) -> Path:
    return vol.mountpoint.with_name(vol.name + suffix)


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _plain_dir(path: Path) -> None:
    """Create ``path`` (0700) outside any project: inside a PROJINHERIT parent of another
    project (an operator's on the state dir) the kernel would refuse to rename volume
    dirs into it (EXDEV)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    if _get_xattr(path).xflags & FS_XFLAG_PROJINHERIT:
        _set_project(path, 0, False)
