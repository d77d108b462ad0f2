"""Where a container's writable layer and /home/user live: the ``Homes`` contract and
its two implementations, so the manager's parts never ask whether a storage method
is configured.

``QuotaHomes``: both on the container's own quota'd volume (``runtime.storage``),
mounted while it runs, found by (user, container name). ``PlainHomes``: the upper and
work dirs in the runtime's state dir and /home/user a plain directory, without a
size limit (no storage method: unit tests, ``rexecd run``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from rexecd.config import Config
from rexecd.errors import Conflict, RexecError
from rexecd.models import ContainerRecord
from rexecd.runtime.container import ContainerDirs, Runtime
from rexecd.runtime.containerroot import disk_usage
from rexecd.runtime.images.files import rmtree
from rexecd.runtime.storage import Storage, Volume
from rexecd.service.store import Store

log = logging.getLogger(__name__)
MiB = 1024 * 1024


class Homes(Protocol):
    # A running container's volume is mounted under its name: a rename restarts it.
    renames_restart: bool
    # A volume cannot shrink without moving the user's data.
    can_shrink: bool

    def prepare(
        self, rec: ContainerRecord, owner: tuple[int, int]
    ) -> tuple[ContainerDirs, Path, Path]:
        """Dirs, /home/user, and the path whose owner tells the volume's id range."""
        ...

    def release(self, rec: ContainerRecord) -> None: ...

    def wipe_root(self, rec: ContainerRecord) -> None:
        """Empty the writable layer (upper and work dirs); /home/user stays."""
        ...

    def drop_root(self, rec: ContainerRecord) -> None:
        """On delete with the volume kept: the root goes, /home/user stays."""
        ...

    def grow(self, rec: ContainerRecord, disk_mb: int) -> None: ...

    def exists(self, user_id: str, name: str) -> bool: ...

    def move(self, old: ContainerRecord, new: ContainerRecord) -> Path | None:
        """Rename the volume with its container; where it is now (None: nothing moved)."""
        ...

    def device(self, rec: ContainerRecord) -> tuple[int, int] | None:
        """(major, minor) of the block device to throttle, if the volume has one."""
        ...

    def space(self, rec: ContainerRecord) -> tuple[int, int]:
        """``(used, limit)`` bytes. Walks a tenant's tree: on the tenant's thread."""
        ...

    def reconcile(self, keep: set[tuple[str, str]]) -> list[str]: ...

    def used_bytes(self, user_id: str, name: str) -> int | None:
        """What the volume of (user, name) holds, where its storage can tell."""
        ...

    def destroy(self, user_id: str, name: str) -> None:
        """Delete the data of the volume of (user, name); idempotent."""
        ...

    def stored(self) -> list[tuple[str, str]]:
        """(user, name) of every volume on disk, recorded or not."""
        ...

    def describe(self, user_id: str, name: str) -> tuple[Path, int]:
        """Where a stored volume is and its size limit in MB (RexecError if unreadable)."""
        ...


def homes_for(cfg: Config, store: Store, runtime: Runtime, storage: Storage | None) -> Homes:
    """Quota'd volumes with a storage method, plain directories without one."""
    if storage is not None:
        return QuotaHomes(storage, store, runtime)
    return PlainHomes(cfg, store, runtime)


class QuotaHomes:
    renames_restart = True
    can_shrink = False

    def __init__(self, storage: Storage, store: Store, runtime: Runtime) -> None:
        self.storage, self.store, self.runtime = storage, store, runtime

    def _vol(self, rec: ContainerRecord) -> Volume:
        return self.storage.volume(rec.user_id, rec.name)

    def prepare(
        self, rec: ContainerRecord, owner: tuple[int, int]
    ) -> tuple[ContainerDirs, Path, Path]:
        vol = self.storage.ensure(rec.user_id, rec.name, rec.resources.disk_mb, owner)
        self.store.upsert_volume(rec.user_id, rec.name, str(vol.image), vol.size_mb)
        dirs = replace(self.runtime.dirs(rec.id), upper=vol.upper, work=vol.work)
        # The upper dir (fresh and host root's after a wipe, the range's after a run)
        # tells whose the volume is; ensure() gave home's top its owner already.
        return dirs, vol.home, dirs.upper

    def release(self, rec: ContainerRecord) -> None:
        try:
            self.storage.release(self._vol(rec))
        except RexecError as exc:
            log.warning("releasing the volume of %s: %s", rec.name, exc)

    def wipe_root(self, rec: ContainerRecord) -> None:
        vol = self._vol(rec)
        if vol.image.exists():
            self.storage.wipe_root(vol)
            self.storage.release(vol)

    drop_root = wipe_root

    def grow(self, rec: ContainerRecord, disk_mb: int) -> None:
        try:
            self.storage.resize(self._vol(rec), disk_mb)
        except Conflict as exc:
            # No online grow here (e.g. no CAP_SYS_RESOURCE): ensure() grows it offline
            # at the next start, from the size now recorded.
            log.info("disk of %s grows at its next start: %s", rec.name, exc.message)

    def exists(self, user_id: str, name: str) -> bool:
        return self.storage.volume(user_id, name).image.exists()

    def move(self, old: ContainerRecord, new: ContainerRecord) -> Path | None:
        self.storage.rename(old.user_id, old.name, new.name)
        dst = self.storage.volume(new.user_id, new.name).image
        return dst if dst.exists() else None

    def device(self, rec: ContainerRecord) -> tuple[int, int] | None:
        # Only a volume of its own gives a container a device to throttle: without one
        # its files share the host's file system, often on a partition, which io.max
        # refuses, and a throttle there would slow the host's own writes too.
        vol = self._vol(rec)
        try:
            if not os.path.ismount(vol.mountpoint):
                log.warning("volume of %s is not mounted: no disk throttle", rec.name)
                return None
            dev = os.stat(vol.mountpoint).st_dev
        except OSError as exc:
            log.warning("volume of %s: %s: no disk throttle", rec.name, exc)
            return None
        # Major 0 is an anonymous device (tmpfs, overlay): no block queue to throttle.
        return (os.major(dev), os.minor(dev)) if os.major(dev) != 0 else None

    def space(self, rec: ContainerRecord) -> tuple[int, int]:
        try:
            used, limit = self.storage.space(self._vol(rec))
        except RexecError as exc:
            log.warning("disk space of %s: %s", rec.name, exc.message)
            return 0, rec.resources.disk_mb * MiB
        return used, limit or rec.resources.disk_mb * MiB

    def reconcile(self, keep: set[tuple[str, str]]) -> list[str]:
        return self.storage.reconcile(keep)

    def used_bytes(self, user_id: str, name: str) -> int | None:
        try:
            return self.storage.space(self.storage.volume(user_id, name))[0]
        except RexecError as exc:
            log.warning("usage of volume %s/%s: %s", user_id, name, exc.message)
            return None

    def destroy(self, user_id: str, name: str) -> None:
        self.storage.destroy(user_id, name)

    def stored(self) -> list[tuple[str, str]]:
        return self.storage.stored()

    def describe(self, user_id: str, name: str) -> tuple[Path, int]:
        vol = self.storage.volume(user_id, name)
        return vol.image, self.storage.space(vol)[1] // MiB


class PlainHomes:
    renames_restart = False
    can_shrink = True

    def __init__(self, cfg: Config, store: Store, runtime: Runtime) -> None:
        self.cfg, self.store, self.runtime = cfg, store, runtime

    def plain_dir(self, user_id: str, name: str) -> Path:
        """Where /home/user lives without a storage method."""
        return self.cfg.state_dir / "volumes" / user_id / name

    _home = plain_dir

    def prepare(
        self, rec: ContainerRecord, owner: tuple[int, int]
    ) -> tuple[ContainerDirs, Path, Path]:
        home = self._home(rec.user_id, rec.name)
        if not home.exists():
            home.mkdir(parents=True, mode=0o755)
            os.chown(home, *owner)
        self.store.upsert_volume(rec.user_id, rec.name, str(home), rec.resources.disk_mb)
        return self.runtime.dirs(rec.id), home, home

    def release(self, rec: ContainerRecord) -> None:
        pass

    def wipe_root(self, rec: ContainerRecord) -> None:
        dirs = self.runtime.dirs(rec.id)
        for d in (dirs.upper, dirs.work):
            if d.exists():
                rmtree(d)

    def drop_root(self, rec: ContainerRecord) -> None:
        pass  # the runtime's remove takes the upper and work dirs

    def grow(self, rec: ContainerRecord, disk_mb: int) -> None:
        pass  # no size limit to grow

    def exists(self, user_id: str, name: str) -> bool:
        return self._home(user_id, name).exists()

    def move(self, old: ContainerRecord, new: ContainerRecord) -> Path | None:
        src, dst = self._home(old.user_id, old.name), self._home(new.user_id, new.name)
        if not src.exists():
            return None
        # A running container's bind mount follows the directory it was made from.
        os.rename(src, dst)
        return dst

    def device(self, rec: ContainerRecord) -> tuple[int, int] | None:
        return None

    def space(self, rec: ContainerRecord) -> tuple[int, int]:
        upper = self.runtime.dirs(rec.id).upper
        used = disk_usage(upper) + disk_usage(self._home(rec.user_id, rec.name))
        return used, rec.resources.disk_mb * MiB

    def reconcile(self, keep: set[tuple[str, str]]) -> list[str]:
        return []

    def used_bytes(self, user_id: str, name: str) -> int | None:
        return None  # no limit, so none is reported against

    def destroy(self, user_id: str, name: str) -> None:
        shutil.rmtree(self.plain_dir(user_id, name), ignore_errors=True)

    def stored(self) -> list[tuple[str, str]]:
        return []  # every plain directory is recorded when it is made

    def describe(self, user_id: str, name: str) -> tuple[Path, int]:
        return self.plain_dir(user_id, name), 0
