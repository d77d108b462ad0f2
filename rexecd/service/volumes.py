"""Kept /home/user volumes: the owner's list and removal, the tier's cap, expiry by age.

A container's volume is keyed by (user, container name) and outlives the container:
a delete keeps it for the next container of that name. A volume no container has is
*kept*, and kept volumes are bounded three ways: the owner removes them, the tier caps
how many a user keeps and their total ``disk_mb`` (applied when a delete keeps one, and
by the housekeeping pass after a tier change: the least recently used go first, the
one just kept last), and ``retention.kept_volume_days`` expires those unused that long.

A removal is claim (the record says ``removing``, so no container can take the name
meanwhile), destroy, forget; one a crash interrupted is finished at start-up.
Synchronous: the manager calls it in worker threads.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from rexecd.config import Config
from rexecd.errors import Conflict, NotFound, RexecError
from rexecd.models import VolumeList, VolumeOut, utcnow
from rexecd.service import quotas
from rexecd.service.homes import Homes
from rexecd.service.store import Store, VolumeRecord

log = logging.getLogger(__name__)


class KeptVolumes:
    """The volumes part of the manager, over the store and where volumes live
    (``homes``: quota'd volumes, or plain directories under ``STATE/volumes``)."""

    def __init__(self, cfg: Config, store: Store, homes: Homes) -> None:
        self.cfg = cfg
        self.store = store
        self.homes = homes

    # -- the owner's view ---------------------------------------------------------------

    def listing(self, user_id: str, tier: str) -> VolumeList:
        limits = quotas.tier_limits(self.cfg, tier)
        vols = [v for v in self.store.list_volumes(user_id) if not v.removing]
        kept = [v for v in vols if v.container_id is None]
        return VolumeList(
            volumes=[self._out(v) for v in vols],
            count=len(vols),
            kept=len(kept),
            kept_limit=limits.kept_volumes,
            kept_mb=sum(v.size_mb for v in kept),
            kept_mb_limit=limits.kept_volumes_mb,
        )

    def remove(self, user_id: str, name: str) -> None:
        """Delete one of the user's kept volumes with its data. NotFound for a name the
        user has no volume of; Conflict while a container of that name exists."""
        self._finish_removal(self.store.claim_volume(user_id, name), "removed by its owner")

    def _out(self, v: VolumeRecord) -> VolumeOut:
        days = self.cfg.retention.kept_volume_days
        kept = v.container_id is None
        return VolumeOut(
            name=v.name,
            disk_mb=v.size_mb,
            used_bytes=self.homes.used_bytes(v.user_id, v.name),
            created_at=v.created_at,
            last_used_at=v.last_used,
            in_use=not kept,
            container_id=v.container_id,
            expires_at=v.last_used + timedelta(days=days) if kept and days else None,
        )

    # -- bounds ---------------------------------------------------------------------------

    def keep(self, user_id: str, tier: str, name: str, size_mb: int) -> list[str]:
        """The container of ``name`` is gone and its volume stays: mark it used now, then
        hold the user to the tier's cap. Returns the names removed for it (the kept one
        too, when it alone is past the cap)."""
        self.store.touch_volume(user_id, name, utcnow(), size_mb)
        return self.enforce_cap(user_id, tier)

    def enforce_cap(self, user_id: str, tier: str) -> list[str]:
        """Remove the user's least recently used kept volumes until the rest are within
        the tier's ``kept_volumes`` and ``kept_volumes_mb``; the names removed."""
        limits = quotas.tier_limits(self.cfg, tier)
        kept = self.store.kept_volumes(user_id)
        count, total = len(kept), sum(v.size_mb for v in kept)
        removed: list[str] = []
        for v in kept:
            if count <= limits.kept_volumes and total <= limits.kept_volumes_mb:
                break
            if self._remove_quietly(v, "over the tier's kept-volume cap"):
                removed.append(v.name)
            count -= 1
            total -= v.size_mb
        return removed

    def expire(self, now: datetime) -> list[str]:
        """Remove kept volumes unused for ``retention.kept_volume_days``; ``user/name`` of
        each removed."""
        days = self.cfg.retention.kept_volume_days
        if days is None:
            return []
        removed = []
        for v in self.store.kept_volumes(unused_since=now - timedelta(days=days)):
            if self._remove_quietly(v, f"unused for {days} days"):
                removed.append(f"{v.user_id}/{v.name}")
        return removed

    def enforce_caps(self) -> list[str]:
        """``enforce_cap`` for every user who keeps volumes (a tier may have shrunk)."""
        removed = []
        for user_id in sorted({v.user_id for v in self.store.kept_volumes()}):
            user = self.store.get_user(user_id)
            if user is None:
                continue
            removed += [f"{user_id}/{n}" for n in self.enforce_cap(user_id, user.tier)]
        return removed

    def _remove_quietly(self, v: VolumeRecord, why: str) -> bool:
        """Remove a kept volume for a rule, never failing the caller (a delete, the
        housekeeping pass); False if it was not removed."""
        try:
            rec = self.store.claim_volume(v.user_id, v.name)
        except (Conflict, NotFound):
            return False  # taken by a new container, or gone, since it was listed
        try:
            self._finish_removal(rec, why)
        except RexecError as exc:
            log.warning("removing kept volume %s/%s: %s", v.user_id, v.name, exc.message)
            return False
        return True

    # -- the data -------------------------------------------------------------------------

    def destroy(self, user_id: str, name: str) -> None:
        """Delete the data of the volume of (user, name), whatever holds it; idempotent."""
        self.homes.destroy(user_id, name)

    def _finish_removal(self, rec: VolumeRecord, why: str) -> None:
        # A failed destroy leaves the claim in place: start-up tries again, and no
        # container can meanwhile mount what is half deleted.
        log.info("removing volume %s/%s: %s", rec.user_id, rec.name, why)
        self.destroy(rec.user_id, rec.name)
        self.store.delete_volume(rec.user_id, rec.name)
        self.store.append_event(
            "volume_removed",
            {"name": rec.name, "reason": why},
            user_id=rec.user_id,
            keep=self.cfg.retention.events_max_rows,
        )

    def recover(self) -> list[str]:
        """At start-up: finish removals a crash interrupted, and record volumes on disk
        that the store does not know (a crash between making one and recording it), so
        the cap and the expiry see them. ``user/name`` of each volume touched."""
        touched = []
        for rec in self.store.volumes_being_removed():
            try:
                self._finish_removal(rec, "removal interrupted by a restart")
            except RexecError as exc:
                log.warning("removing volume %s/%s: %s", rec.user_id, rec.name, exc.message)
                continue
            touched.append(f"{rec.user_id}/{rec.name}")
        known = {(v.user_id, v.name) for v in self.store.list_volumes()}
        for user_id, name in self.homes.stored():
            if (user_id, name) in known or self.store.get_user(user_id) is None:
                continue
            try:
                where, size_mb = self.homes.describe(user_id, name)
            except RexecError as exc:
                log.warning("volume %s/%s: %s", user_id, name, exc.message)
                continue
            self.store.upsert_volume(user_id, name, str(where), size_mb)
            touched.append(f"{user_id}/{name}")
        return touched
