"""``LoopStorage``: per-container disk quota as a sparse ext4 image on an auto-clearing loop device.

Mounts live in the daemon's mount namespace under ``RUN/volumes``. Needs root
(CAP_SYS_ADMIN; CAP_SYS_RESOURCE to grow a volume in use), loop and ext4 in the kernel
(>= 5.8), e2fsprogs, and sysfs at /sys.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import ExitStack
from pathlib import Path

from rexecd import _native as n
from rexecd.errors import Conflict, InvalidRequest, NotFound, RexecError, RuntimeFailure
from rexecd.runtime.durable import fsync_dir
from rexecd.runtime.storage import ext4, loopdev, mountinfo
from rexecd.runtime.storage.volume import (
    IMAGE_SUFFIX,
    Layout,
    MiB,
    Storage,
    Volume,
    check_component,
    check_size,
    make_dirs,
    rmdir_quiet,
    wipe_dirs,
)

log = logging.getLogger(__name__)

UMOUNT_NOFOLLOW = 8
_MOUNT_FLAGS = n.MS_NODEV | n.MS_NOSUID
# A damaged volume stops taking writes rather than spreading the damage; the default
# ("continue") would keep writing through it.
_MOUNT_DATA = "errors=remount-ro"
# How long ensure() waits for a released volume's loop device to be let go of (by udev,
# or by a dead container's mount namespace) before it calls the image busy.
DETACH_WAIT = 3.0
# More than one mount stacked on a volume's mount point is a bug elsewhere; release
# peels off this many before it gives up.
_MAX_STACKED = 8


def _is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def _mkdir_private(path: Path) -> None:
    # 0700 at every level we own: images and mounts of one user are nobody else's.
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass


class LoopStorage(Storage):
    """Volumes as ``STATE/volumes/<user>/<name>.img`` mounted at ``RUN/volumes/<user>/<name>``.

    The image is sparse: the host pays only for blocks written, never more than the
    image size. ext4 in it enforces the quota (ENOSPC in the container), and its
    journal plus ``e2fsck -p`` before every mount keep it usable after a crash.
    """

    def __init__(self, state_dir: Path, run_dir: Path) -> None:
        # Resolved once: mountinfo and sysfs report canonical paths, compared as text.
        self.layout = Layout(state_dir.resolve(), run_dir.resolve())
        super().__init__()

    # -- the Storage contract -----------------------------------------------------

    def ensure(
        self, user_id: str, name: str, size_mb: int, owner: tuple[int, int] = (0, 0)
    ) -> Volume:
        want = check_size(size_mb) * MiB
        vol = self.layout.volume(user_id, name, size_mb)
        with self._lock(vol), ExitStack() as undo:
            if not _is_mount(vol.mountpoint):
                self._activate(vol, want, undo)
            else:
                dev = self._device(vol)
                if self._image_size(vol) < want:
                    self._grow_mounted(vol, dev, want)
            make_dirs(vol, owner)
            undo.pop_all()
            return self._sized(vol)

    def volume(self, user_id: str, name: str) -> Volume:
        return self.layout.volume(user_id, name, 0)

    def rename(self, user_id: str, old: str, new: str) -> None:
        src, dst = self.layout.volume(user_id, old, 0), self.layout.volume(user_id, new, 0)
        with self._lock_pair(src, dst):
            if _is_mount(src.mountpoint) or _is_mount(dst.mountpoint):
                raise Conflict(f"volume {user_id}/{old} or {user_id}/{new} is in use")
            if not src.image.exists():
                return
            if dst.image.exists():
                raise Conflict(f"a volume named {new} already exists", name=new)
            try:
                os.rename(src.image, dst.image)
            except OSError as exc:
                raise RuntimeFailure.from_oserror("rename volume image", exc) from exc

    def release(self, vol: Volume) -> None:
        vol = self._own(vol)
        with self._lock(vol):
            self._release(vol)

    def wipe_root(self, vol: Volume) -> None:
        vol = self._own(vol)
        with self._lock(vol), ExitStack() as stack:
            if not _is_mount(vol.mountpoint):
                # Delete of a container whose volume is not mounted (it never started
                # after a daemon restart): mount just for the wipe.
                if not vol.image.exists():
                    raise NotFound(f"no volume {vol.user_id}/{vol.name}")
                stack.callback(self._release, vol)
                self._activate(vol, 0, stack)
            wipe_dirs(vol)
            try:
                ext4.trim(vol.mountpoint)
            except RuntimeFailure as exc:
                # Space not handed back to the host is no reason to fail a delete.
                log.warning("could not trim %s: %s", vol.image, exc.message)

    def destroy(self, user_id: str, name: str) -> None:
        vol = self.layout.volume(user_id, name, 0)
        with self._lock(vol):
            self._release(vol)
            for path in (vol.image, self.layout.partial(user_id, name)):
                try:
                    # A lazily detached, still-busy volume keeps the inode (and loop
                    # device) alive until its last user goes; the name goes now.
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise RuntimeFailure.from_oserror("remove volume image", exc) from exc

    def resize(self, vol: Volume, size_mb: int) -> Volume:
        want = check_size(size_mb) * MiB
        vol = self._own(vol)
        with self._lock(vol):
            have = self._image_size(vol)
            if want < have:
                raise InvalidRequest(
                    f"cannot shrink volume {vol.user_id}/{vol.name} from {have // MiB} MB to "
                    f"{size_mb} MB: a volume only grows (ext4 cannot shrink while mounted, and "
                    "an offline shrink has to move the user's data and may not fit it)",
                    size_mb=have // MiB,
                )
            if want > have:
                if not _is_mount(vol.mountpoint):
                    # The file system catches up when ensure() next mounts it.
                    self._truncate(vol, want)
                else:
                    self._grow_mounted(vol, self._device(vol), want)
            return self._sized(vol)

    def usage(self, vol: Volume) -> tuple[int, int]:
        vol = self._own(vol)
        if not _is_mount(vol.mountpoint):
            raise Conflict(f"volume {vol.user_id}/{vol.name} is not mounted")
        try:
            st = os.statvfs(vol.mountpoint)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("volume usage", exc) from exc
        # f_blocks already leaves out the journal and inode tables: what df shows inside.
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize

    def space(self, vol: Volume) -> tuple[int, int]:
        vol = self._own(vol)
        try:
            st = vol.image.stat()
        except FileNotFoundError:
            return 0, 0
        if _is_mount(vol.mountpoint):
            return self.usage(vol)[0], st.st_size
        # Not mounted (stopped): what the sparse image holds is close enough.
        return st.st_blocks * 512, st.st_size

    def mounted(self) -> list[Volume]:
        try:
            mounts = mountinfo.read()
        except OSError as exc:
            raise RuntimeFailure.from_oserror("read mountinfo", exc) from exc
        keys = {k for m in mounts if (k := self.layout.key_of(m.mountpoint)) is not None}
        vols = []
        for user_id, name in sorted(keys):
            vol = self.layout.volume(user_id, name, 0)
            try:
                vols.append(self._sized(vol))
            except RexecError:
                # Mounted but its image is gone (destroyed while busy): still ours.
                vols.append(vol)
        return vols

    def stored(self) -> list[tuple[str, str]]:
        found = []
        root = self.layout.images
        for user_dir in root.iterdir() if root.is_dir() else []:
            if not user_dir.is_dir() or user_dir.is_symlink():
                continue
            for image in user_dir.iterdir():
                name = image.name.removesuffix(IMAGE_SUFFIX)
                if name == image.name or not image.is_file() or image.is_symlink():
                    continue  # a partial image (.img.part) or not ours
                try:
                    key = (check_component("user id", user_dir.name), check_component("name", name))
                except InvalidRequest:
                    continue
                found.append(key)
        return sorted(found)

    def reconcile(self, keep: set[tuple[str, str]]) -> list[str]:
        released = super().reconcile(keep)
        # Mount points left empty by a daemon killed between mkdir and mount.
        root = self.layout.mounts
        if root.is_dir():
            for user_dir in root.iterdir():
                if not user_dir.is_dir() or user_dir.is_symlink():
                    continue
                for mp in user_dir.iterdir():
                    key = self.layout.key_of(mp)
                    if key is None or key in keep:
                        continue
                    with self._lock(self.layout.volume(*key, 0)):
                        if mp.is_dir() and not mp.is_symlink() and not _is_mount(mp):
                            rmdir_quiet(mp)
        return released

    # -- steps ----------------------------------------------------------------------

    def _activate(self, vol: Volume, want: int, undo: ExitStack) -> None:
        """Create or check the image, then attach and mount it. Every step done is
        registered on ``undo``; only a new image is deleted on failure, never data."""
        try:
            _mkdir_private(vol.image.parent)
            _mkdir_private(vol.mountpoint.parent)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("create volume dirs", exc) from exc
        if vol.image.exists():
            busy = loopdev.wait_detached(vol.image, DETACH_WAIT)
            if busy:
                # Mounting one ext4 through two devices corrupts it: wait for the
                # old user (a lazily detached mount, a container's overlay) to go.
                raise RuntimeFailure(
                    "attach volume",
                    f"{vol.image} is still in use by {', '.join(busy)}",
                    errno.EBUSY,
                )
            ext4.fsck(vol.image)
            fs_size = ext4.fs_bytes(vol.image)
            if self._image_size(vol) < want:
                self._truncate(vol, want)
            if fs_size < self._image_size(vol) and not ext4.can_grow_online():
                # A grow that had only reached the file (resize while unmounted, a
                # crash between truncate and resize, or a bigger size_mb now).
                ext4.grow_offline(vol.image)
                fs_size = self._image_size(vol)
        else:
            undo.callback(vol.image.unlink, missing_ok=True)
            self._create(vol, want)
            fs_size = want
        if not vol.mountpoint.is_dir():
            try:
                vol.mountpoint.mkdir(mode=0o700)
            except OSError as exc:
                raise RuntimeFailure.from_oserror("create mount point", exc) from exc
            undo.callback(rmdir_quiet, vol.mountpoint)
        try:
            fd, dev = loopdev.attach(vol.image)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("attach loop device", exc) from exc
        try:
            n.mount(dev, str(vol.mountpoint), "ext4", _MOUNT_FLAGS, _MOUNT_DATA)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("mount volume", exc) from exc
        finally:
            # Last close before a mount frees the device (AUTOCLEAR); after the
            # mount, the mount holds it until unmounted.
            os.close(fd)
        undo.callback(self._unmount, vol.mountpoint)
        size = self._image_size(vol)
        if fs_size < size:
            # Online growth is cheap (no full fsck), so it waits until mounted.
            ext4.grow(vol.mountpoint, size)

    def _create(self, vol: Volume, size: int) -> None:
        part = self.layout.partial(vol.user_id, vol.name)
        try:
            part.unlink(missing_ok=True)
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("create volume image", exc) from exc
        try:
            try:
                os.ftruncate(fd, size)
                ext4.mkfs(part)
                os.fsync(fd)
                os.rename(part, vol.image)
                fsync_dir(vol.image.parent)
            finally:
                os.close(fd)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise RuntimeFailure.from_oserror("create volume image", exc) from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def _grow_mounted(self, vol: Volume, dev: str, size: int) -> None:
        if not ext4.can_grow_online():
            self._grow_remount(vol, dev, size)
            return
        self._truncate(vol, size)
        try:
            loopdev.set_capacity(dev)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("grow loop device", exc) from exc
        ext4.grow(vol.mountpoint, size)

    def _grow_remount(self, vol: Volume, dev: str, size: int) -> None:
        """Grow a mounted volume offline: unmount, grow, mount again. Only possible
        while nothing uses it; otherwise it stays as it was and ``Conflict`` says why."""
        busy = Conflict(
            f"volume {vol.user_id}/{vol.name} is in use: growing it while in use needs "
            "CAP_SYS_RESOURCE, which the daemon lacks; stop the container and retry",
        )
        try:
            n.umount2(str(vol.mountpoint), UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise busy from exc
            raise RuntimeFailure.from_oserror("unmount volume", exc) from exc
        if loopdev.wait_detached(vol.image, DETACH_WAIT):
            # Still alive in another mount namespace (a container's overlay holds its
            # own reference): put it back where it was, through the same device.
            try:
                n.mount(dev, str(vol.mountpoint), "ext4", _MOUNT_FLAGS, _MOUNT_DATA)
            except OSError as exc:
                raise RuntimeFailure.from_oserror("mount volume", exc) from exc
            raise busy
        self._truncate(vol, size)
        with ExitStack() as undo:
            self._activate(vol, size, undo)
            undo.pop_all()

    def _truncate(self, vol: Volume, size: int) -> None:
        try:
            os.truncate(vol.image, size)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("grow volume image", exc) from exc

    def _release(self, vol: Volume) -> None:
        for _ in range(_MAX_STACKED):
            if not _is_mount(vol.mountpoint):
                break
            self._unmount(vol.mountpoint)
        else:
            raise RuntimeFailure("unmount volume", f"{vol.mountpoint} stays mounted", errno.EBUSY)
        rmdir_quiet(vol.mountpoint)

    def _unmount(self, mountpoint: Path) -> None:
        try:
            n.umount2(str(mountpoint), UMOUNT_NOFOLLOW)
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return  # not (or no longer) a mount point
            if exc.errno != errno.EBUSY:
                raise RuntimeFailure.from_oserror("unmount volume", exc) from exc
        # Something on the host still has a file open in it. Detach it from the tree
        # now; the kernel keeps the file system, and AUTOCLEAR the loop device, until
        # that user goes, and ensure() refuses to mount the image again until then.
        log.warning("%s is busy; detaching it lazily", mountpoint)
        try:
            n.umount2(str(mountpoint), n.MNT_DETACH | UMOUNT_NOFOLLOW)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("unmount volume", exc) from exc

    # -- helpers ----------------------------------------------------------------------

    def _device(self, vol: Volume) -> str:
        """The loop device mounted at ``vol.mountpoint``, checked to be backed by its image."""
        try:
            dev, backing = loopdev.device_of(os.stat(vol.mountpoint).st_dev)
        except OSError as exc:
            raise RuntimeFailure.from_oserror("find volume device", exc) from exc
        if backing != str(vol.image):
            raise RuntimeFailure(
                "find volume device",
                f"{vol.mountpoint} is mounted from {backing or dev}, not {vol.image}",
                errno.EXDEV,
            )
        return dev

    def _image_size(self, vol: Volume) -> int:
        try:
            return os.stat(vol.image).st_size
        except FileNotFoundError as exc:
            raise NotFound(f"no volume {vol.user_id}/{vol.name}") from exc
        except OSError as exc:
            raise RuntimeFailure.from_oserror("stat volume image", exc) from exc

    def _sized(self, vol: Volume) -> Volume:
        return vol.model_copy(update={"size_mb": self._image_size(vol) // MiB})

    def _own(self, vol: Volume) -> Volume:
        # Paths always come from our layout, never from a Volume handed back to us.
        return self.layout.volume(
            check_component("user id", vol.user_id), check_component("name", vol.name), 0
        )
