"""The storage vocabulary: ``Volume``, its layout and dirs, the ``Storage`` interface, validation.

Pure except the directory helpers, which need root only to ``chown`` another owner's home.
"""

from __future__ import annotations

import abc
import errno
import os
import re
import shutil
import threading
import uuid
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rexecd.errors import InvalidRequest, RuntimeFailure

MiB = 1024 * 1024
# Below this ext4's own journal and metadata would eat most of the quota.
MIN_SIZE_MB = 16
# 16 TiB: far beyond any tier, and within what a 4 KiB-block ext4 grows to online.
MAX_SIZE_MB = 16 * 1024 * 1024

# Both parts become path components and mount points: no dots (so never "." or "..",
# never an ".img" look-alike), no separators, nothing /proc/self/mountinfo escapes.
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")

IMAGE_SUFFIX = ".img"
# A new image is made under this suffix and renamed when complete, so a daemon killed
# during mkfs leaves a file ensure() discards, never a half-made image.
PARTIAL_SUFFIX = ".img.part"
# wipe_root renames upper/work to this prefix before deleting them, so a crash half way
# leaves a fresh root plus rubbish that the next ensure() sweeps.
_TRASH_PREFIX = ".wipe-"


class Volume(BaseModel):
    """One container's quota'd storage: the image file and where it is mounted."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    name: str
    image: Path
    mountpoint: Path
    size_mb: int = Field(ge=0)

    @property
    def upper(self) -> Path:
        """The container's overlay upper dir (its writable root)."""
        return self.mountpoint / "upper"

    @property
    def work(self) -> Path:
        """The overlay work dir; must live on the same file system as ``upper``."""
        return self.mountpoint / "work"

    @property
    def home(self) -> Path:
        """Bind-mounted at /home/user in the container; kept across delete."""
        return self.mountpoint / "home"


def check_component(kind: str, value: str) -> str:
    """``value`` if usable as a user id or volume name in paths, else ``InvalidRequest``."""
    if not isinstance(value, str) or not _COMPONENT_RE.fullmatch(value):
        raise InvalidRequest(f"invalid volume {kind} {value!r}: use [A-Za-z0-9_-], at most 128")
    return value


def check_size(size_mb: int) -> int:
    """``size_mb`` if it is a usable volume size, else ``InvalidRequest`` saying the range."""
    if isinstance(size_mb, bool) or not isinstance(size_mb, int):
        raise InvalidRequest(f"volume size must be a whole number of MB, not {size_mb!r}")
    if not MIN_SIZE_MB <= size_mb <= MAX_SIZE_MB:
        raise InvalidRequest(
            f"volume size {size_mb} MB is out of range: {MIN_SIZE_MB}..{MAX_SIZE_MB} MB",
            min_mb=MIN_SIZE_MB,
            max_mb=MAX_SIZE_MB,
        )
    return size_mb


@dataclass(frozen=True)
class Layout:
    """Where volumes live: images under ``STATE/volumes``, mounts under ``RUN/volumes``."""

    state_dir: Path
    run_dir: Path

    @property
    def images(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def mounts(self) -> Path:
        return self.run_dir / "volumes"

    def image(self, user_id: str, name: str) -> Path:
        return self.images / user_id / f"{name}{IMAGE_SUFFIX}"

    def partial(self, user_id: str, name: str) -> Path:
        return self.images / user_id / f"{name}{PARTIAL_SUFFIX}"

    def mountpoint(self, user_id: str, name: str) -> Path:
        return self.mounts / user_id / name

    def volume(self, user_id: str, name: str, size_mb: int) -> Volume:
        check_component("user id", user_id)
        check_component("name", name)
        return Volume(
            user_id=user_id,
            name=name,
            image=self.image(user_id, name),
            mountpoint=self.mountpoint(user_id, name),
            size_mb=size_mb,
        )

    def key_of(self, mountpoint: Path) -> tuple[str, str] | None:
        """``(user_id, name)`` if ``mountpoint`` is exactly a volume mount point of ours."""
        if mountpoint.parent.parent != self.mounts:
            return None
        user_id, name = mountpoint.parent.name, mountpoint.name
        if not (_COMPONENT_RE.fullmatch(user_id) and _COMPONENT_RE.fullmatch(name)):
            return None
        return user_id, name


class Storage(abc.ABC):
    """A per-container quota method. ``LoopStorage`` (an ext4 image on a loop device) is
    the one implementation; a project-quota method would implement the same contract.

    Every method is safe to call from several threads; calls for the same volume are
    serialised (``_lock``, ``_lock_pair``). Kernel failures leave as ``RuntimeFailure``
    naming the step.
    """

    def __init__(self) -> None:
        self._locks = KeyedLocks()

    def _lock(self, vol: Volume) -> AbstractContextManager[None]:
        """Hold the lock of ``vol``'s (user, name) while one call works on it."""
        return self._locks.hold((vol.user_id, vol.name))

    @contextmanager
    def _lock_pair(self, a: Volume, b: Volume) -> Iterator[None]:
        """Both volumes' locks, always taken in name order, so two renames in opposite
        directions cannot deadlock."""
        first, second = sorted((a, b), key=lambda v: v.name)
        with self._lock(first), self._lock(second):
            yield

    @abc.abstractmethod
    def ensure(
        self, user_id: str, name: str, size_mb: int, owner: tuple[int, int] = (0, 0)
    ) -> Volume:
        """Make the volume exist, be mounted and hold upper/work/home (``home`` owned by
        ``owner``), growing it to ``size_mb`` if it is smaller. Idempotent; on failure
        nothing it made is left. A volume already larger than ``size_mb`` keeps its size
        (the returned ``size_mb`` is the real one), since shrinking is impossible."""

    @abc.abstractmethod
    def volume(self, user_id: str, name: str) -> Volume:
        """The handle of the volume of (user, name), mounted or not (``size_mb`` 0)."""

    @abc.abstractmethod
    def rename(self, user_id: str, old: str, new: str) -> None:
        """Give an unmounted volume a new name (the container was renamed). ``Conflict``
        if it is mounted or the new name already has a volume; nothing to do if the old
        name has none."""

    @abc.abstractmethod
    def release(self, vol: Volume) -> None:
        """Unmount; idempotent. The data stays for the next ``ensure``."""

    @abc.abstractmethod
    def wipe_root(self, vol: Volume) -> None:
        """Empty ``upper`` and ``work`` (a fresh root), keeping ``home``. The container
        must not be running."""

    @abc.abstractmethod
    def destroy(self, user_id: str, name: str) -> None:
        """Release and delete the volume with its data; idempotent."""

    @abc.abstractmethod
    def resize(self, vol: Volume, size_mb: int) -> Volume:
        """Grow to ``size_mb`` (online if mounted); ``InvalidRequest`` for a shrink."""

    @abc.abstractmethod
    def usage(self, vol: Volume) -> tuple[int, int]:
        """``(used bytes, total bytes)`` as the container sees them."""

    @abc.abstractmethod
    def space(self, vol: Volume) -> tuple[int, int]:
        """``(used, limit)`` bytes whether or not the container runs; ``limit`` is the
        quota in force, which lags a grow that can only happen at the next start."""

    @abc.abstractmethod
    def mounted(self) -> list[Volume]:
        """The volumes this method currently has active, sorted by (user, name)."""

    @abc.abstractmethod
    def stored(self) -> list[tuple[str, str]]:
        """``(user_id, name)`` of every volume on disk, mounted or not, sorted."""

    def reconcile(self, keep: set[tuple[str, str]]) -> list[str]:
        """Release every active volume whose ``(user_id, name)`` is not in ``keep``; the
        released ones as ``"user_id/name"``. After a daemon restart the caller then
        ``ensure``s what its live containers need."""
        released: list[str] = []
        for vol in self.mounted():
            if (vol.user_id, vol.name) not in keep:
                self.release(vol)
                released.append(f"{vol.user_id}/{vol.name}")
        return released


@dataclass(eq=False)
class _Held:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class KeyedLocks:
    """One lock per key (a volume's ``(user_id, name)``), kept only while someone holds
    or waits for it: the map grows with the volumes in use, never with every name seen."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: dict[Hashable, _Held] = {}

    def __len__(self) -> int:
        with self._guard:
            return len(self._held)

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            held = self._held.get(key)
            if held is None:
                held = self._held[key] = _Held()
            held.users += 1
        try:
            with held.lock:
                yield
        finally:
            with self._guard:
                held.users -= 1
                if held.users == 0:
                    del self._held[key]


# --- the directories inside a mounted volume ---------------------------------------


def make_dirs(vol: Volume, owner: tuple[int, int]) -> None:
    """Create upper (0755: overlay shows it as the container's /), work (0700) and home
    (0755, owned by ``owner``); sweep what an interrupted wipe left. Idempotent."""
    try:
        sweep(vol)
        vol.upper.mkdir(mode=0o755, exist_ok=True)
        vol.work.mkdir(mode=0o700, exist_ok=True)
        vol.home.mkdir(mode=0o755, exist_ok=True)
        st = vol.home.stat()
        # Only the top: a recreated container may run as another uid, and its files
        # below are the user's to keep as they are.
        if (st.st_uid, st.st_gid) != owner:
            os.chown(vol.home, owner[0], owner[1])
    except OSError as exc:
        raise RuntimeFailure.from_oserror("prepare volume dirs", exc) from exc


def wipe_dirs(vol: Volume) -> None:
    """Replace upper and work by empty dirs, then delete the old contents."""
    try:
        for d, mode in ((vol.upper, 0o755), (vol.work, 0o700)):
            # Rename first: the fresh root exists the moment this returns per dir, and
            # a crash during the slow delete below cannot leave a half-emptied root.
            if d.exists():
                d.rename(vol.mountpoint / f"{_TRASH_PREFIX}{d.name}-{uuid.uuid4().hex[:12]}")
            d.mkdir(mode=mode)
        sweep(vol)
    except OSError as exc:
        raise RuntimeFailure.from_oserror("wipe volume root", exc) from exc


def sweep(vol: Volume) -> None:
    """Delete what interrupted wipes left in the volume."""
    with os.scandir(vol.mountpoint) as it:
        trash = [e.path for e in it if e.name.startswith(_TRASH_PREFIX)]
    for path in trash:
        # rmtree works on fds and never follows symlinks out of the volume.
        shutil.rmtree(path)


def rmdir_quiet(path: Path) -> None:
    """Remove an empty dir; a missing, busy or non-empty one is left as it is."""
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY, errno.EEXIST):
            raise
