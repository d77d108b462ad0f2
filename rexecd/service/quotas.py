"""Tier quotas: container sizes (defaults, clamping), counts, session expiry, exec timeouts.

Sizes are limits, not reservations (a memory or cpu cgroup limit, a sparse disk
image), so clamping a request to the tier maximum costs the host nothing until
it is used. A request that leaves a size out gets ``config.defaults`` (512 MB,
one core, 4 GiB of disk unless configured), which suits an interactive shell and
a package install; a larger size has to be asked for, up to the tier maximum.
Every size is then clamped into ``[minimum, tier maximum]``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from rexecd.config import Config, TierLimits
from rexecd.errors import RexecError
from rexecd.models import ContainerCreate, ContainerResources, SettingsPatch


def tier_limits(cfg: Config, tier: str) -> TierLimits:
    try:
        return cfg.tiers.get(tier)
    except KeyError:
        # Only reachable with a hand-edited database: a user's tier is checked when set.
        raise RexecError(f"user tier {tier!r} is not configured") from None


def clamp(value: int, floor: int, ceiling: int) -> int:
    return max(floor, min(value, ceiling))


def _given(value: int | None) -> bool:
    # 0 means "not given": some clients send zero values for unset fields.
    return value is not None and value > 0


def resources_for_create(cfg: Config, tier: str, req: ContainerCreate) -> ContainerResources:
    """The sizes a new container gets: the request (or the defaults), clamped to the tier."""
    limits, floor, dflt = tier_limits(cfg, tier), cfg.minimums, cfg.defaults
    memory = req.memory_mb if _given(req.memory_mb) else dflt.memory_mb
    cpu = req.cpu_shares if _given(req.cpu_shares) else dflt.cpu_millicores
    disk = req.disk_mb if _given(req.disk_mb) else dflt.disk_mb
    assert memory is not None and cpu is not None and disk is not None
    return ContainerResources(
        memory_mb=clamp(memory, floor.memory_mb, limits.memory_mb),
        cpu_shares=clamp(cpu, floor.cpu_millicores, limits.cpu_millicores),
        disk_mb=clamp(disk, floor.disk_mb, limits.disk_mb),
        network_mbps=limits.network_mbps,
    )


def resources_for_update(
    cfg: Config, tier: str, current: ContainerResources, patch: SettingsPatch
) -> ContainerResources:
    """The sizes after a settings change: only the sizes the patch gives change (clamped)."""
    limits, floor = tier_limits(cfg, tier), cfg.minimums
    memory, cpu, disk = current.memory_mb, current.cpu_shares, current.disk_mb
    if patch.memory_mb is not None and _given(patch.memory_mb):
        memory = clamp(patch.memory_mb, floor.memory_mb, limits.memory_mb)
    if patch.cpu_shares is not None and _given(patch.cpu_shares):
        cpu = clamp(patch.cpu_shares, floor.cpu_millicores, limits.cpu_millicores)
    if patch.disk_mb is not None and _given(patch.disk_mb):
        disk = clamp(patch.disk_mb, floor.disk_mb, limits.disk_mb)
    return ContainerResources(
        memory_mb=memory, cpu_shares=cpu, disk_mb=disk, network_mbps=current.network_mbps
    )


def container_limit(cfg: Config, tier: str) -> int:
    return tier_limits(cfg, tier).containers


def session_expiry(cfg: Config, tier: str, start: datetime) -> datetime | None:
    """When a container created at ``start`` expires; None for an unlimited tier."""
    hours = tier_limits(cfg, tier).session_hours
    return None if hours is None else start + timedelta(hours=hours)


def is_expired(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is not None and expires_at <= now


def exec_timeout(cfg: Config, requested: int | None) -> int:
    """Seconds an exec may run: the request (or the default) capped at the configured max."""
    seconds = requested if requested is not None and requested > 0 else cfg.exec.default_timeout_s
    return min(seconds, cfg.exec.max_timeout_s)
