"""Per-container quota'd storage: the ``Storage`` contract, its two methods, and the choice.

One volume per (user, container name) holds the container's overlay upper/work dirs and
its /home/user. ``ProjectQuotaStorage`` (a directory in a project of its own on the state
dir's file system) is used where that file system enforces project quota;
``LoopStorage`` (a sparse ext4 image on a loop device, which needs loop and ext4 in the
kernel (>= 5.8) and e2fsprogs) everywhere else. Both need root. Modules: ``volume``
(model, layout, validation), ``mountinfo`` (parsing), ``loopdev`` (loop ioctls), ``ext4``
(e2fsprogs and ext4 ioctls), ``loop`` (``LoopStorage``), ``projquota``
(``ProjectQuotaStorage`` and the probe).
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from rexecd.errors import InvalidRequest, RuntimeFailure
from rexecd.runtime.storage import projquota
from rexecd.runtime.storage.loop import LoopStorage
from rexecd.runtime.storage.projquota import ProjectQuotaStorage
from rexecd.runtime.storage.volume import (
    IMAGE_SUFFIX,
    MAX_SIZE_MB,
    MIN_SIZE_MB,
    Storage,
    Volume,
    check_component,
)

__all__ = [
    "MAX_SIZE_MB",
    "METHODS",
    "MIN_SIZE_MB",
    "LoopStorage",
    "ProjectQuotaStorage",
    "Storage",
    "Volume",
    "choose_storage",
]

log = logging.getLogger(__name__)

METHODS = ("auto", "loop", "project")


def choose_storage(
    state_dir: Path, run_dir: Path, method: str = "auto", *, project_safe: bool = True
) -> Storage:
    """The storage for a daemon with these dirs: ``"loop"`` or ``"project"`` as told, or
    with ``"auto"`` project quota where the state dir's file system enforces it and loop
    images elsewhere. ``RuntimeFailure`` naming why when the method cannot work here.

    ``project_safe`` says no container can change its files' project id (they run in
    user namespaces, or every tier's seccomp profile refuses FS_IOC_FSSETXATTR);
    without it ``auto`` never picks project quota.

    Volumes of one method are invisible to the other, so ``auto`` stays with the method
    whose volumes the state dir already holds rather than hide users' data.
    """
    if method not in METHODS:
        raise ValueError(f"unknown storage method {method!r}: use {', '.join(METHODS)}")
    in_use = kinds_in_use(state_dir / "volumes")
    if method == "loop":
        _warn_hidden("loop images", in_use - {"loop"})
        return LoopStorage(state_dir, run_dir)
    if method == "auto" and not project_safe and "project" not in in_use:
        log.info(
            "storage: loop images (project quota would not hold: containers run in "
            "the host's user namespace and a tier's seccomp profile allows "
            "FS_IOC_FSSETXATTR)"
        )
        return LoopStorage(state_dir, run_dir)
    support = projquota.probe(state_dir / "volumes")
    if method == "project":
        if not support.ok:
            raise RuntimeFailure(
                "choose storage",
                f"storage.method is project, but {support.reason}",
                errno.EOPNOTSUPP,
            )
        _warn_hidden("project quota", in_use - {"project"})
        return ProjectQuotaStorage(state_dir)
    if support.ok and "loop" not in in_use:
        log.info("storage: project quota (%s)", support.reason)
        return ProjectQuotaStorage(state_dir)
    if support.ok:
        log.warning(
            "storage: project quota is available (%s), but %s holds loop images: staying "
            "with loop images (storage.method: project switches, and hides them)",
            support.reason,
            state_dir / "volumes",
        )
    elif "project" in in_use:
        raise RuntimeFailure(
            "choose storage",
            f"{state_dir / 'volumes'} holds project-quota volumes, but {support.reason}; "
            "mount it with project quota again, or set storage.method: loop (those "
            "volumes are then not used)",
            errno.EOPNOTSUPP,
        )
    else:
        log.info("storage: loop images (no project quota: %s)", support.reason)
    return LoopStorage(state_dir, run_dir)


def kinds_in_use(root: Path) -> set[str]:
    """Which methods have volumes under ``root`` (``STATE/volumes``): ``"loop"`` for
    ``<user>/<name>.img`` files, ``"project"`` for ``<user>/<name>`` directories."""
    kinds: set[str] = set()
    if not root.is_dir():
        return kinds
    for user_dir in root.iterdir():
        if not user_dir.is_dir() or user_dir.is_symlink():
            continue
        for entry in user_dir.iterdir():
            if entry.name.endswith(IMAGE_SUFFIX) and entry.is_file():
                kinds.add("loop")
            elif entry.is_dir() and not entry.is_symlink() and _is_name(entry.name):
                kinds.add("project")
    return kinds


def _is_name(text: str) -> bool:
    try:
        check_component("name", text)
    except InvalidRequest:
        return False
    return True


def _warn_hidden(method: str, others: set[str]) -> None:
    if others:
        log.warning(
            "storage: %s as configured; the volumes of %s in the state dir are not used",
            method,
            " and ".join(sorted(others)),
        )
