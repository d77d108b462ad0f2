"""What a real daemon keeps stays bounded however many containers come and go: kept
/home/user volumes (the tier's cap, the owner's removal, expiry by age) and the event
log (its row cap), with ``GET /api/volumes`` and ``DELETE /api/volumes/{name}``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    apoll,
    cleaning,
    db_rows,
    running_daemon,
    unique,
    volume_image,
)

KEPT = 2
EVENTS_MAX = 40
FREE = {
    "cpu_millicores": 2000,
    "memory_mb": 2048,
    "disk_mb": 10240,
    "containers": 5,
    "session_hours": None,
    "network_mbps": 50,
    "kept_volumes": KEPT,
    "kept_volumes_mb": 100000,
}
SMALL = {"network_mode": "none", "disk_mb": 32}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    overrides = {
        "tiers": {"free": FREE},
        # A pass every second, so the tests see it work without waiting minutes.
        "retention": {"events_max_rows": EVENTS_MAX, "sweep_interval_s": 1},
    }
    with running_daemon(tmp_path_factory, overrides=overrides) as d:
        yield d


async def _user_id(c: ApiClient) -> str:
    uid: str = (await c.get("/api/tokens/validate")).expect(200)["user_id"]
    return uid


def _images_of(d: Daemon, user_id: str) -> list[str]:
    root = volume_image(d, user_id, "x").parent
    return sorted(p.name for p in root.glob("*.img")) if root.is_dir() else []


async def _cycle(c: ApiClient, name: str, volumes: bool = False) -> None:
    await c.create_running(name, **SMALL)
    await c.remove(name, volumes=volumes)


async def test_kept_volumes_stay_within_the_tiers_cap(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("u"))) as c, cleaning(c) as refs:
        uid = await _user_id(c)
        names = [unique("keep") for _ in range(KEPT + 3)]
        refs.extend(names)
        await c.create_running(names[0], **SMALL)
        await c.sh(names[0], "echo mine > /home/user/data")
        await c.remove(names[0], volumes=False)
        for name in names[1:]:
            await _cycle(c, name)
            listed = (await c.get("/api/volumes")).expect(200).body
            assert listed["kept"] <= KEPT and listed["kept_limit"] == KEPT, listed
            assert len(_images_of(daemon, uid)) <= KEPT
        # The least recently used went first: the last KEPT are the ones kept.
        assert _images_of(daemon, uid) == sorted(f"{n}.img" for n in names[-KEPT:])
        listed = (await c.get("/api/volumes")).expect(200).body
        assert sorted(v["name"] for v in listed["volumes"]) == sorted(names[-KEPT:])
        assert not any(v["in_use"] for v in listed["volumes"])
        # A removed volume's name starts afresh.
        await c.create_running(names[0], **SMALL)
        out = (await c.exec(names[0], "cat /home/user/data")).expect(200).body
        assert out["exit_code"] != 0


async def test_owner_lists_and_deletes_kept_volumes(daemon: Daemon) -> None:
    alice, bob = daemon.token(unique("alice")), daemon.token(unique("bob"))
    async with (
        ApiClient(daemon, alice) as a,
        ApiClient(daemon, bob) as b,
        cleaning(a) as refs,
    ):
        uid = await _user_id(a)
        kept, busy = unique("kept"), unique("busy")
        refs.extend([kept, busy])
        await a.create_running(kept, **SMALL)
        await a.sh(kept, "echo mine > /home/user/data")
        await a.remove(kept, volumes=False)
        await a.create_running(busy, **SMALL)
        (await a.post(f"/api/containers/{busy}/stop")).expect(200)

        listed = (await a.get("/api/volumes")).expect(200).body
        by_name = {v["name"]: v for v in listed["volumes"]}
        assert by_name[busy]["in_use"] and by_name[busy]["container_id"]
        assert not by_name[kept]["in_use"] and by_name[kept]["disk_mb"] >= 32
        assert by_name[kept]["used_bytes"] > 0 and by_name[kept]["expires_at"]
        assert (await b.get("/api/volumes")).expect(200)["volumes"] == []

        # A stopped container still owns its volume (its root lives there too).
        r = (await a.delete(f"/api/volumes/{busy}")).expect(409)
        assert "in use" in r["error"]
        (await b.delete(f"/api/volumes/{kept}")).expect(404)
        (await a.delete("/api/volumes/no-such-volume")).expect(404)
        assert volume_image(daemon, uid, kept).exists()
        (await a.delete(f"/api/volumes/{kept}")).expect(200)
        assert not volume_image(daemon, uid, kept).exists()
        (await a.delete(f"/api/volumes/{kept}")).expect(404)
        await a.create_running(kept, **SMALL)
        assert (await a.exec(kept, "cat /home/user/data")).expect(200)["exit_code"] != 0


async def test_a_volume_unused_too_long_expires(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("u"))) as c, cleaning(c) as refs:
        uid = await _user_id(c)
        old, recent = unique("old"), unique("recent")
        refs.extend([old, recent])
        await _cycle(c, old)
        await _cycle(c, recent)
        long_ago = datetime.now(UTC) - timedelta(days=31)
        with sqlite3.connect(daemon.state / "state.db", timeout=10) as db:
            db.execute(
                "UPDATE volumes SET last_used_at = ? WHERE user_id = ? AND name = ?",
                (long_ago.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), uid, old),
            )

        async def gone() -> bool:
            names = [v["name"] for v in (await c.get("/api/volumes")).expect(200)["volumes"]]
            return old not in names

        await apoll(gone, timeout=15, what="the housekeeping pass to expire the volume")
        assert _images_of(daemon, uid) == [f"{recent}.img"]


async def test_the_event_log_stays_bounded(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("u"))) as c, cleaning(c) as refs:
        for _ in range(12):
            name = unique("ev")
            refs.append(name)
            await _cycle(c, name, volumes=True)

        async def trimmed() -> bool:
            return int(db_rows(daemon, "SELECT count(*) FROM events")[0][0]) <= EVENTS_MAX

        assert int(db_rows(daemon, "SELECT max(seq) FROM events")[0][0]) > EVENTS_MAX
        await apoll(trimmed, timeout=15, what="the event log trimmed to its cap")
