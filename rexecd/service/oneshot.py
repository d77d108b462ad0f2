"""``rexecd run``: one container in the foreground, like ``crun run``, for debugging and
benchmarks. Stdio passes straight through; the exit status is the command's."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from rexecd.runtime.cgroups import CgroupLimits, open_driver_or_none
from rexecd.runtime.container import ImageView, Runtime, spawner_running
from rexecd.runtime.images import ImageRecord, ImageStore

log = logging.getLogger(__name__)

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH)


def image_view(store: ImageStore, rec: ImageRecord) -> ImageView:
    cfg = rec.config
    return ImageView(
        layers=store.layer_paths(rec),
        env=list(cfg.env),
        entrypoint=cfg.entrypoint,
        cmd=cfg.cmd,
        working_dir=cfg.working_dir,
        user=cfg.user,
    )


def run_foreground(
    state_dir: Path,
    run_dir: Path,
    image_ref: str,
    args: list[str],
    *,
    remove: bool = False,
    hostname: str | None = None,
    env: list[str] | None = None,
    user: str | None = None,
    workdir: str | None = None,
    cgroup_parent: str = "rexecd",
    seccomp: str = "default",
) -> int:
    """Run one container with this process's stdio and return its exit status."""
    store = ImageStore(state_dir / "images")
    view = image_view(store, store.get(image_ref))
    cid = secrets.token_hex(32)
    with spawner_running() as spawner:
        rt = Runtime(state_dir, run_dir, open_driver_or_none(cgroup_parent), spawner)
        dirs = rt.dirs(cid, ephemeral=remove)
        rt.create_dirs(dirs)
        try:
            spec = rt.build_spec(
                cid,
                hostname or cid[:12],
                view,
                dirs,
                args=args,
                env=env,
                user=user,
                workdir=workdir,
                seccomp=seccomp,
            )
            pid = rt.start(spec, CgroupLimits(), stdio=[0, 1, 2])
            for sig in _FORWARDED:
                signal.signal(sig, lambda s, _f: _forward(pid, s))
            status: int | None = None
            while status is None:
                status = spawner.wait(pid, timeout=0.5)
            return status
        finally:
            for sig in _FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            if remove:
                rt.remove(cid, ephemeral=True)
            else:
                rt.release(cid)
                print(f"rexecd: container data kept in {dirs.base}", file=sys.stderr)


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
