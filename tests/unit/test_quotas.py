"""Quota arithmetic: defaults, clamping to tier and minimums, counts, expiry, exec timeouts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rexecd.config import Config
from rexecd.errors import RexecError
from rexecd.models import ContainerCreate, ContainerResources, SettingsPatch
from rexecd.service import quotas

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def create(**kw: int | None) -> ContainerCreate:
    return ContainerCreate.model_validate({"image": "ubuntu", **kw})


def test_defaults_for_a_new_container() -> None:
    cfg = Config()
    free = quotas.resources_for_create(cfg, "free", create())
    assert free == ContainerResources(memory_mb=512, cpu_shares=1000, disk_mb=4096, network_mbps=50)
    guest = quotas.resources_for_create(cfg, "guest", create())
    # Defaults never exceed the tier: guest has 500 m of cpu and 2 GiB of disk.
    assert guest == ContainerResources(memory_mb=512, cpu_shares=500, disk_mb=2048, network_mbps=10)


def test_zero_means_default() -> None:
    got = quotas.resources_for_create(Config(), "pro", create(memory_mb=0, cpu_shares=0, disk_mb=0))
    assert (got.memory_mb, got.cpu_shares, got.disk_mb) == (512, 1000, 4096)


def test_clamped_to_tier_maximum_and_minimums() -> None:
    cfg = Config()
    big = quotas.resources_for_create(
        cfg, "free", create(memory_mb=99999, cpu_shares=99999, disk_mb=999999)
    )
    assert (big.memory_mb, big.cpu_shares, big.disk_mb) == (2048, 2000, 10240)
    small = quotas.resources_for_create(
        cfg, "enterprise", create(memory_mb=1, cpu_shares=1, disk_mb=1)
    )
    assert (small.memory_mb, small.cpu_shares, small.disk_mb) == (256, 250, 1024)


def test_lowered_minimums_for_tests() -> None:
    cfg = Config()
    cfg.minimums.memory_mb, cfg.minimums.cpu_millicores, cfg.minimums.disk_mb = 16, 10, 8
    got = quotas.resources_for_create(cfg, "free", create(memory_mb=32, cpu_shares=50, disk_mb=16))
    assert (got.memory_mb, got.cpu_shares, got.disk_mb) == (32, 50, 16)


def test_update_changes_only_what_is_given() -> None:
    cfg = Config()
    current = ContainerResources(memory_mb=512, cpu_shares=1000, disk_mb=4096, network_mbps=50)
    same = quotas.resources_for_update(cfg, "free", current, SettingsPatch(name="x"))
    assert same == current
    more = quotas.resources_for_update(cfg, "free", current, SettingsPatch(memory_mb=100000))
    assert more == current.model_copy(update={"memory_mb": 2048})
    cpu = quotas.resources_for_update(
        cfg, "free", current, SettingsPatch(cpu_shares=100, disk_mb=0)
    )
    assert (cpu.cpu_shares, cpu.disk_mb) == (250, 4096)


def test_container_limit_and_unknown_tier() -> None:
    cfg = Config()
    assert [quotas.container_limit(cfg, t) for t in ("guest", "free", "pro", "enterprise")] == [
        1, 5, 10, 20,
    ]  # fmt: skip
    with pytest.raises(RexecError, match="not configured"):
        quotas.container_limit(cfg, "platinum")


def test_session_expiry() -> None:
    cfg = Config()
    assert quotas.session_expiry(cfg, "free", T0) == T0 + timedelta(hours=50)
    assert quotas.session_expiry(cfg, "pro", T0) is None
    cfg.tiers.guest.session_hours = 0.5
    assert quotas.session_expiry(cfg, "guest", T0) == T0 + timedelta(minutes=30)
    assert quotas.is_expired(T0, T0)
    assert not quotas.is_expired(T0 + timedelta(seconds=1), T0)
    assert not quotas.is_expired(None, T0)


def test_exec_timeout() -> None:
    cfg = Config()
    assert quotas.exec_timeout(cfg, None) == 60
    assert quotas.exec_timeout(cfg, 0) == 60
    assert quotas.exec_timeout(cfg, 5) == 5
    assert quotas.exec_timeout(cfg, 1000) == 300
    cfg.exec.max_timeout_s = 10
    assert quotas.exec_timeout(cfg, 30) == 10
