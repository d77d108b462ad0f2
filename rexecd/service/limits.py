"""The cgroup policy of containers: what a container's resources and its owner's tier
mean as cgroup limits, and the fail-closed rule when the host has no cgroups."""

from __future__ import annotations

from rexecd.config import Config, TierLimits
from rexecd.errors import NotFound, RuntimeUnavailable
from rexecd.models import ContainerRecord, ContainerResources
from rexecd.runtime.cgroups import CgroupLimits, IoLimit
from rexecd.runtime.container import Runtime
from rexecd.service import quotas
from rexecd.service.homes import Homes
from rexecd.service.store import Store

MiB = 1024 * 1024


def limits_for(
    res: ContainerResources,
    pids_max: int = 512,
    *,
    disk: tuple[int, int] | None = None,
    disk_mbps: int | None = None,
    disk_iops: int | None = None,
) -> CgroupLimits:
    """The cgroup policy of a container's resources (cpu in millicores, memory in MB),
    with the tier's disk throttle on block device ``disk`` (major, minor), if any."""
    io: list[IoLimit] = []
    if disk is not None and (disk_mbps is not None or disk_iops is not None):
        bps = None if disk_mbps is None else disk_mbps * MiB
        io.append(
            IoLimit(
                major=disk[0], minor=disk[1], rbps=bps, wbps=bps, riops=disk_iops, wiops=disk_iops
            )
        )
    return CgroupLimits(
        cpu_millicores=res.cpu_shares,
        cpu_weight=max(1, min(10000, res.cpu_shares // 10)),
        memory_bytes=res.memory_mb * MiB,
        pids_max=pids_max,
        io=io,
    )


class CgroupPolicy:
    def __init__(
        self, cfg: Config, store: Store, runtime: Runtime, homes: Homes, no_cgroups_reason: str
    ) -> None:
        self.cfg, self.store, self.runtime, self.homes = cfg, store, runtime, homes
        # Why runtime.cgroups is None (what probing found), for the 503 and /health.
        self._no_cgroups_reason = no_cgroups_reason or "no cgroup driver"

    def missing(self) -> str | None:
        """What stops containers from having cgroup limits, or None when they have them."""
        if self.runtime.cgroups is not None:
            return None
        return f"cgroups unavailable: {self._no_cgroups_reason}"

    def degraded(self) -> str | None:
        """Why the daemon is not fully serving (``/health`` says "degraded"), or None."""
        missing = self.missing()
        if missing is None:
            return None
        if self.cfg.cgroup.allow_unlimited:
            return f"{missing}: containers run without limits (cgroup.allow_unlimited)"
        return f"{missing}: containers are not started"

    def require(self) -> None:
        """Refuse to start a container that would run without limits (fail closed),
        unless the config explicitly allows it (``cgroup.allow_unlimited``)."""
        missing = self.missing()
        if missing is not None and not self.cfg.cgroup.allow_unlimited:
            raise RuntimeUnavailable(
                f"containers cannot start: {missing}, so no cpu, memory or pids limit would hold",
                reason=missing,
            )

    def owner_tier(self, rec: ContainerRecord) -> TierLimits:
        """The current tier of ``rec``'s owner. Blocking (database): run it in a thread."""
        user = self.store.get_user(rec.user_id)
        if user is None:
            raise NotFound(f"the owner of container {rec.name} no longer exists")
        return quotas.tier_limits(self.cfg, user.tier)

    def limits(
        self, rec: ContainerRecord, res: ContainerResources, tier: TierLimits | None = None
    ) -> CgroupLimits:
        """``limits_for`` with this daemon's pids cap and the owner's current tier's disk
        throttle on the volume's device (``tier``, when the caller read it already).
        Blocking (database, stat): run it in a thread."""
        tier = tier or self.owner_tier(rec)
        return limits_for(
            res,
            self.cfg.limits.pids_max,
            disk=self.homes.device(rec),
            disk_mbps=tier.disk_mbps,
            disk_iops=tier.disk_iops,
        )
