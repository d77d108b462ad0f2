"""The host side of one run of a container: what is made on disk before its init is
spawned, and what goes again once the init is gone (a failed start undoes its own
steps: ``rollback``). The release is safe to repeat and leaves the container's data
(volume, /home/user) alone."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rexecd.config import Config
from rexecd.errors import RexecError
from rexecd.models import ContainerRecord
from rexecd.runtime import lxcfs, userns
from rexecd.runtime.container import ContainerDirs, ImageView, Runtime
from rexecd.runtime.spec import BindMount, UsernsSpec
from rexecd.runtime.users import resolve_user
from rexecd.service.homes import Homes
from rexecd.service.optional import ContainerNetwork
from rexecd.service.portforwards import PortForwards
from rexecd.service.store import Store

log = logging.getLogger(__name__)
HOME = "/home/user"


class HostSide:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        runtime: Runtime,
        network: ContainerNetwork,
        homes: Homes,
        port_forwards: PortForwards,
    ) -> None:
        self.cfg, self.store, self.runtime = cfg, store, runtime
        self.network, self.homes, self.port_forwards = network, homes, port_forwards
        # Whether lxcfs was found at the last start (None: not looked yet); logged on change.
        self._lxcfs_seen: bool | None = None

    def prepare(
        self, rec: ContainerRecord, view: ImageView, rng: UsernsSpec | None
    ) -> tuple[ContainerDirs, list[BindMount]]:
        """Storage, dirs and /home/user: everything on disk before the spawn (blocking).

        With a user namespace (``rng``) the writable layer and /home/user belong to
        the container's id range: a tree last written in another range (or without
        one) is moved into it once, here."""
        ident = resolve_user(view.user, view.layers)
        owner = (userns.host_id(rng, ident.uid), userns.host_id(rng, ident.gid))
        dirs, home, marker = self.homes.prepare(rec, owner)
        if rng is not None:
            self._into_range(rng, marker, dirs.upper, home)
        self.runtime.create_dirs(dirs, rng)
        return dirs, [BindMount(source=str(home), target=HOME), *self._lxcfs_binds()]

    def _lxcfs_binds(self) -> list[BindMount]:
        """lxcfs's /proc files for a starting container, when lxcfs runs (looked up at
        each start: it may be started or stopped while the daemon runs)."""
        if self.cfg.lxcfs.mode == "off":
            return []
        binds = lxcfs.proc_binds(self.cfg.lxcfs.dir)
        found = bool(binds)
        if found != self._lxcfs_seen:
            self._lxcfs_seen = found
            if found:
                log.info(
                    "lxcfs at %s: containers see their own limits in /proc", self.cfg.lxcfs.dir
                )
            else:
                log.warning(
                    "lxcfs is not mounted at %s: containers see the host's memory and cpus "
                    "in free and top (install and start the lxcfs package, or set lxcfs.mode: off)",
                    self.cfg.lxcfs.dir,
                )
        return binds

    def _into_range(self, rng: UsernsSpec, marker: Path, *trees: Path) -> None:
        """Shift ``trees`` into ``rng`` unless ``marker``'s owner is in it already."""
        try:
            if rng.base <= os.lstat(marker).st_uid < rng.base + rng.size:
                return
        except FileNotFoundError:
            pass
        for tree in trees:
            if os.path.lexists(tree):
                moved = userns.shift_tree(tree, rng, self.cfg.userns.base)
                log.info("moved %d files of %s into ids %d+%d", moved, tree, rng.base, rng.size)

    def release(self, rec: ContainerRecord) -> None:
        """After init is gone: cgroup, mount point and host network side go; data stays."""
        self.port_forwards.release(rec)
        try:
            self.network.detach(rec.id)
        except RexecError as exc:
            log.warning("network detach of %s: %s", rec.id, exc)
        self.runtime.release(rec.id)
        self.homes.release(rec)
