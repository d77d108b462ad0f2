"""Containers in user namespaces of their own, through a real daemon on the real kernel:
the map, ownership inside and on the host, disjoint ranges leased in the state
database across restarts, and a failed create that leaves no lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from rexecd.runtime.cgroups import open_driver
from rexecd.runtime.container import Runtime
from rexecd.runtime.spawner import Spawner
from rexecd.runtime.userns import HOLDER_NAME, IdRanges
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    ApiClient,
    children,
    cleaning,
    db_rows,
    kill_spawner,
    poll,
    proc_stat,
    running_daemon,
    spawner_pid,
    unique,
    write_proc_symlink_image,
    zombies_of,
)
from tests.integration.probe import exec_out, image, parse, probe_bin, probe_lower, running
from tests.integration.runtime_helpers import RangedRuntime, run

__all__ = ["probe_bin", "probe_lower"]  # fixtures

BASE, SIZE = 3_000_000, 65536


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    overrides = {"userns": {"enabled": "on", "base": BASE, "size": SIZE, "count": 64}}
    with running_daemon(tmp_path_factory, overrides) as d:
        yield d


def userns_leases(d: Daemon) -> dict[str, int]:
    return dict(db_rows(d, "SELECT container_db_id, slot FROM userns_leases"))


def uid_map(text: str) -> tuple[int, int, int]:
    inside, outside, count = (int(x) for x in text.split())
    return inside, outside, count


def upper_file(d: Daemon, name: str, under: str = "/upper") -> Path:
    """The one file called ``name`` in any upper dir (or ``under`` another dir, /home)
    of this daemon (host side)."""
    found: list[Path] = []
    for root in (d.state, d.run):
        for dirpath, _dirs, files in os.walk(root):
            if name in files and under in dirpath:
                found.append(Path(dirpath) / name)
    assert len(found) == 1, found
    return found[0]


async def test_root_inside_is_an_unprivileged_range_on_the_host(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("u"))) as c, cleaning(c) as refs:
        ref = unique("uns")
        refs.append(ref)
        box = await c.create_running(ref)
        out = await c.sh(
            ref,
            "cat /proc/self/uid_map; cat /proc/self/gid_map; id -u; id -g;"
            " grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status;"
            " stat -c '%u:%g %n' /bin/busybox /etc /dev/null /home/user",
        )
        lines = out.splitlines()
        inside, outside, count = uid_map(lines[0])
        slot = userns_leases(daemon)[box["db_id"]]
        assert (inside, outside, count) == (0, BASE + slot * SIZE, SIZE), out
        assert uid_map(lines[1]) == (0, outside, SIZE)
        assert lines[2:4] == ["0", "0"], out
        assert "Seccomp:\t2" in out and "NoNewPrivs:\t1" in out, out
        # The image's root-owned files, and what the daemon made, are root's inside.
        for path in ("/bin/busybox", "/etc", "/dev/null", "/home/user"):
            assert f"0:0 {path}" in out, out

        # A file the container makes is owned by the range on the host, in the upper
        # dir (overlay's copy-up too), and by root inside.
        marker = unique("made")
        await c.sh(ref, f"echo x > /{marker}; chown 1000:1000 /etc/passwd; touch /bin/{marker}.bin")
        host = upper_file(daemon, marker)
        assert (host.stat().st_uid, host.stat().st_gid) == (outside, outside)
        # bin/ was copied up from the image (owned by 0 there) into the range.
        assert (host.parent / "bin").stat().st_uid == outside
        assert upper_file(daemon, marker + ".bin").stat().st_uid == outside
        assert (await c.sh(ref, f"stat -c %u /{marker} /etc/passwd")).split() == ["0", "1000"]

        # Files and directories the API writes are root's inside, in the range outside.
        files = f"/api/containers/{ref}/files"
        (await c.post(files + "/mkdir", params={"path": "/srv/api-dir"})).expect(200)
        form = aiohttp.FormData()
        form.add_field("file", b"data", filename="api.txt")
        (await c.post(files, data=form, params={"path": "/srv/api-dir"})).expect(200)
        owners = await c.sh(ref, "stat -c %u:%g /srv/api-dir /srv/api-dir/api.txt")
        assert owners.split() == ["0:0", "0:0"], owners
        assert upper_file(daemon, "api.txt").stat().st_uid == outside


async def test_namespaces_refused_and_capabilities_scoped(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("u"))) as c, cleaning(c) as refs:
        ref = unique("caps")
        refs.append(ref)
        await c.create_running(ref)
        r = (await c.exec(ref, "unshare -U true")).expect(200)
        assert r["exit_code"] != 0, r.body
        # net_admin is not in the set; raw sockets (net_raw) on its own netns are.
        r = (await c.exec(ref, "ping -c1 -W2 127.0.0.1")).expect(200)
        assert r["exit_code"] == 0, r.body
        # The daemon's mounts stay: nothing can be unmounted or mounted anew.
        r = (await c.exec(ref, "umount /proc/keys; umount /proc/sys")).expect(200)
        assert r["exit_code"] != 0, r.body
        r = (await c.exec(ref, "mkdir -p /mnt/p; mount -t proc proc /mnt/p")).expect(200)
        assert r["exit_code"] != 0, r.body
        mounts = await c.sh(ref, "cat /proc/mounts")
        assert " /proc/keys " in mounts and " /proc/sys " in mounts, mounts
        assert " /mnt/p " not in mounts
        # Host root's files (a sysctl in the container's read-only /proc/sys) are not root's.
        assert (await c.sh(ref, "stat -c %u /proc/sys/kernel/hostname")).strip() == "65534"
        # An id the namespace does not map is the caller's mistake, said before any fork.
        for user in ("70000", "0:70000", "65536"):
            r = (await c.exec(ref, "id", user=user)).expect(400)
            assert "outside the container's user namespace" in r["error"], r.body
        assert (await c.exec(ref, "id -u", user="65535")).expect(200)["exit_code"] == 0


async def test_two_containers_get_disjoint_ranges_and_keep_them_across_a_restart(
    daemon: Daemon,
) -> None:
    tok = daemon.token(unique("u"))
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        a, b = unique("a"), unique("b")
        refs += [a, b]
        boxes = [await c.create_running(a), await c.create_running(b)]
        maps = [uid_map(await c.sh(x, "cat /proc/self/uid_map")) for x in (a, b)]
        (_, oa, na), (_, ob, nb) = maps
        assert oa + na <= ob or ob + nb <= oa, maps
        before = {
            k: v for k, v in userns_leases(daemon).items() if k in {x["db_id"] for x in boxes}
        }
        assert len(set(before.values())) == 2

    # (cleaning deleted them: their leases went with them)
    assert not set(before) & set(userns_leases(daemon))

    # (no cleaning here: it must outlive the restart; the daemon fixture removes it
    # if the test fails before the block that does)
    async with ApiClient(daemon, tok) as c:
        keep = unique("keep")
        box = await c.create_running(keep)
        held = userns_leases(daemon)[box["db_id"]]
        first_map = await c.sh(keep, "cat /proc/self/uid_map")
        # A stop and start keeps the range, so its files stay its own.
        (await c.post(f"/api/containers/{keep}/stop")).expect(200)
        assert userns_leases(daemon)[box["db_id"]] == held
        (await c.post(f"/api/containers/{keep}/start")).expect(200)
        await c.wait_status(keep, "running")
        assert await c.sh(keep, "cat /proc/self/uid_map") == first_map
    daemon.restart()
    async with ApiClient(daemon, tok) as c, cleaning(c) as refs:
        refs.append(keep)
        assert userns_leases(daemon).get(box["db_id"]) == held
        # The re-adopted container is still entered through its own user namespace.
        assert await c.sh(keep, "cat /proc/self/uid_map") == first_map
        other = unique("other")
        refs.append(other)
        new = await c.create_running(other)
        assert userns_leases(daemon)[new["db_id"]] != held


async def import_broken_image(d: Daemon, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``brokenproc``: an image whose start fails (a /proc symlink), after the lease."""
    image = write_proc_symlink_image(tmp_path_factory.mktemp("img") / "broken.tar")
    admin = d.token(unique("adm"), scopes="read,write,admin")
    async with ApiClient(d, admin) as c:
        r = await c.post(
            "/api/images/import", params={"name": "brokenproc:latest"}, data=image.read_bytes()
        )
        r.expect(201)


async def test_a_failed_create_leaves_no_lease(
    daemon: Daemon, tmp_path_factory: pytest.TempPathFactory
) -> None:
    await import_broken_image(daemon, tmp_path_factory)
    async with ApiClient(daemon, daemon.token(unique("f"))) as c, cleaning(c) as refs:
        name = unique("broken")
        refs.append(name)
        created: dict[str, Any] = (await c.create(name, image="brokenproc")).expect(202).body
        failed = await c.wait_status(name, "error")
        assert "mount /proc" in (failed.get("error_message") or ""), failed
        assert created["db_id"] not in userns_leases(daemon)
        # ... and the slot it had is handed out again.
        ok = unique("ok")
        refs.append(ok)
        await asyncio.wait_for(c.create_running(ok), 120)


async def test_a_kept_home_moves_into_the_new_range(daemon: Daemon) -> None:
    """/home/user outlives its container: recreated under another range, its files keep
    their owners as seen inside."""
    async with ApiClient(daemon, daemon.token(unique("u"))) as c, cleaning(c) as refs:
        name, filler = unique("home"), unique("fill")
        refs += [name, filler]
        await c.create_running(name)
        await c.sh(
            name, "echo r > /home/user/r; echo u > /home/user/u; chown 1000:1000 /home/user/u"
        )
        first = uid_map(await c.sh(name, "cat /proc/self/uid_map"))[1]
        await c.create_running(filler)  # holds the next slot
        await c.remove(name, volumes=False)  # kept: /home/user stays
        # Another container takes the freed slot, so the name comes back in a new one.
        other = unique("other")
        refs.append(other)
        await c.create_running(other)
        await c.create_running(name)
        again = uid_map(await c.sh(name, "cat /proc/self/uid_map"))[1]
        assert again != first
        owners = await c.sh(name, "stat -c %u:%g /home/user /home/user/r /home/user/u")
        assert owners.split() == ["0:0", "0:0", "1000:1000"], owners
        assert (await c.sh(name, "cat /home/user/r /home/user/u")).split() == ["r", "u"]


def holders_under(ppid: int) -> list[int]:
    """Live (not zombie) user namespace holders whose parent is ``ppid``."""
    return [p for p, comm, state in children(ppid) if comm == HOLDER_NAME and state != "Z"]


async def test_a_killed_spawner_leaves_no_zombie_and_no_stray_spare_holder(
    daemon: Daemon,
) -> None:
    """The spawner makes a user namespace holder ahead of the next start. SIGKILLed, it
    leaves that spare to the daemon (a child subreaper): the spare dies with it
    (PDEATHSIG) and the daemon reaps it (the holder sent it its pidfd first)."""
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    async with ApiClient(daemon, daemon.token(unique("u"))) as c, cleaning(c) as refs:
        first, second, third = unique("first"), unique("second"), unique("third")
        refs += [first, second, third]
        await c.create_running(first)
        sp = spawner_pid(daemon)
        (spare,) = poll(lambda: holders_under(sp), what="the spawner's spare holder")
        # A spare killed by someone else is reaped by the spawner, never used: the next
        # start makes a fresh holder, and a new spare follows.
        os.kill(spare, signal.SIGKILL)
        poll(lambda: proc_stat(spare) is None, what=f"killed spare {spare} reaped")
        await c.create_running(second)
        assert (await c.sh(second, "id -u")).strip() == "0"
        (spare,) = poll(lambda: holders_under(sp), what="a new spare holder")
        kill_spawner(daemon)
        poll(
            lambda: proc_stat(spare) is None and not zombies_of(dpid),
            what=f"spare holder {spare} reaped, no zombie of the daemon",
        )
        # The next start works, through a new spawner (which makes a spare of its own).
        await c.create_running(third)
        inside, outside, _ = uid_map(await c.sh(third, "cat /proc/self/uid_map"))
        assert inside == 0 and outside >= BASE
        assert not zombies_of(dpid), zombies_of(dpid)
        assert proc_stat(spare) is None


# ------------------------------------------------------------------ userns.mode: user

# Another daemon's ranges: disjoint from the first's, so that both may run at once.
USER_BASE = BASE + 64 * SIZE


def mode_overrides(mode: str) -> dict[str, Any]:
    return {"userns": {"enabled": "on", "mode": mode, "base": USER_BASE, "size": SIZE, "count": 64}}


@pytest.fixture(scope="module")
def per_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory, mode_overrides("user")) as d:
        yield d


def userns_ranges(d: Daemon) -> dict[int, tuple[str, int]]:
    """(owner's user id, shared) by leased slot."""
    rows = db_rows(d, "SELECT slot, user_id, per_user FROM userns_ranges")
    return {slot: (user, shared) for slot, user, shared in rows}


def owner_id(d: Daemon, user: str) -> str:
    ((uid,),) = db_rows(d, "SELECT id FROM users WHERE name = ?", user)
    return str(uid)


@contextlib.asynccontextmanager
async def two_users(
    d: Daemon, first: str, second: str
) -> AsyncIterator[tuple[tuple[ApiClient, list[str]], tuple[ApiClient, list[str]]]]:
    """A client of each user, with its list of containers deleted at the end."""
    async with (
        ApiClient(d, d.token(first)) as a,
        ApiClient(d, d.token(second)) as b,
        cleaning(a) as a_refs,
        cleaning(b) as b_refs,
    ):
        yield (a, a_refs), (b, b_refs)


async def test_per_user_one_range_for_a_users_containers_none_shared_across_users(
    per_user: Daemon,
) -> None:
    ua, ub = unique("ua"), unique("ub")
    async with two_users(per_user, ua, ub) as ((a, a_refs), (b, b_refs)):
        a1, a2, b1 = unique("a1"), unique("a2"), unique("b1")
        a_refs += [a1, a2]
        b_refs.append(b1)
        boxes = {x: await c.create_running(x) for c, x in ((a, a1), (a, a2), (b, b1))}
        maps = {
            x: uid_map(await c.sh(x, "cat /proc/self/uid_map"))
            for c, x in ((a, a1), (a, a2), (b, b1))
        }
        assert maps[a1] == maps[a2], maps
        (_, oa, n), (_, ob, _) = maps[a1], maps[b1]
        assert oa + n <= ob or ob + n <= oa, maps
        leases = userns_leases(per_user)
        slot = leases[boxes[a1]["db_id"]]
        assert leases[boxes[a2]["db_id"]] == slot != leases[boxes[b1]["db_id"]]
        ranges = userns_ranges(per_user)
        assert ranges[slot] == (owner_id(per_user, ua), 1)
        assert ranges[leases[boxes[b1]["db_id"]]] == (owner_id(per_user, ub), 1)

        # a1's kept /home/user comes back under the same range: owners as they were,
        # nothing moved.
        kept = unique("kept")
        await a.sh(a1, f"echo u > /home/user/{kept}; chown 1000:1000 /home/user/{kept}")
        host_before = upper_file(per_user, kept, under="/home").stat()
        await a.remove(a1, volumes=False)
        # One of the user's two went: the range stays with the other.
        assert boxes[a1]["db_id"] not in userns_leases(per_user)
        assert userns_ranges(per_user).get(slot) == (owner_id(per_user, ua), 1)
        assert userns_leases(per_user)[boxes[a2]["db_id"]] == slot
        again = await a.create_running(a1)
        assert userns_leases(per_user)[again["db_id"]] == slot
        assert (await a.sh(a1, f"stat -c %u:%g /home/user/{kept}")).split() == ["1000:1000"]
        host_after = upper_file(per_user, kept, under="/home").stat()
        assert (host_after.st_uid, host_after.st_ctime_ns) == (
            oa + 1000,
            host_before.st_ctime_ns,
        ), "the volume was shifted although its range did not change"

        # The last of the user's containers goes: so does the range.
        await a.remove(a1)
        await a.remove(a2)
        assert slot not in userns_ranges(per_user)
        assert leases[boxes[b1]["db_id"]] in userns_ranges(per_user)


async def test_per_user_a_failed_create_leaves_no_lease_and_no_range(
    per_user: Daemon, tmp_path_factory: pytest.TempPathFactory
) -> None:
    await import_broken_image(per_user, tmp_path_factory)
    lonely, busy = unique("lonely"), unique("busy")
    async with two_users(per_user, lonely, busy) as ((lc, l_refs), (bc, b_refs)):
        # A user with no container: no lease, and no range left in its name.
        name = unique("broken")
        l_refs.append(name)
        created = (await lc.create(name, image="brokenproc")).expect(202).body
        await lc.wait_status(name, "error")
        assert created["db_id"] not in userns_leases(per_user)
        assert owner_id(per_user, lonely) not in {u for u, _ in userns_ranges(per_user).values()}
        # A user with a running container: the failed one's lease goes, the range stays.
        ok, bad = unique("ok"), unique("bad")
        b_refs += [ok, bad]
        box = await bc.create_running(ok)
        slot = userns_leases(per_user)[box["db_id"]]
        failed = (await bc.create(bad, image="brokenproc")).expect(202).body
        await bc.wait_status(bad, "error")
        leases = userns_leases(per_user)
        assert failed["db_id"] not in leases and leases[box["db_id"]] == slot
        assert userns_ranges(per_user)[slot] == (owner_id(per_user, busy), 1)
        assert (await bc.sh(ok, "cat /proc/self/uid_map")).split()[1] == str(
            USER_BASE + slot * SIZE
        )


@pytest.fixture
def per_container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon of its own (its mode is changed): outside the test's event loop, as
    its clean-up runs pyroute2's own."""
    with running_daemon(tmp_path_factory, mode_overrides("container")) as d:
        yield d


async def test_a_change_of_mode_keeps_existing_containers_in_their_ranges(
    per_container: Daemon,
) -> None:
    d = per_container
    user = unique("sw")
    tok = d.token(user)
    async with ApiClient(d, tok) as c:
        old = unique("old")
        box = await c.create_running(old)
        old_map = await c.sh(old, "cat /proc/self/uid_map")
        await c.sh(old, "echo x > /home/user/x")
        held = userns_leases(d)[box["db_id"]]
    cfg = yaml.safe_load(d.config.read_text())
    cfg["userns"]["mode"] = "user"
    d.config.write_text(yaml.safe_dump(cfg))
    d.restart()
    async with ApiClient(d, tok) as c, cleaning(c) as refs:
        refs.append(old)
        # The re-adopted container: same range, still entered through it.
        assert await c.sh(old, "cat /proc/self/uid_map") == old_map
        assert userns_ranges(d)[held] == (owner_id(d, user), 0)
        # New containers of the same user share a new range, not the old one's.
        n1, n2 = unique("n1"), unique("n2")
        refs += [n1, n2]
        new = [await c.create_running(x) for x in (n1, n2)]
        shared = {userns_leases(d)[x["db_id"]] for x in new}
        assert len(shared) == 1 and held not in shared, (held, shared)
        assert userns_ranges(d)[shared.pop()] == (owner_id(d, user), 1)
        # A stop and start under the new mode keeps the old range and its files.
        (await c.post(f"/api/containers/{old}/stop")).expect(200)
        (await c.post(f"/api/containers/{old}/start")).expect(200)
        await c.wait_status(old, "running")
        assert await c.sh(old, "cat /proc/self/uid_map") == old_map
        assert (await c.sh(old, "stat -c %u /home/user/x")).strip() == "0"
        assert userns_leases(d)[box["db_id"]] == held
    assert not userns_leases(d) and not userns_ranges(d)


# ------------------------------------------------------------------ the runtime alone


@pytest.fixture
def ranged(tmp_path: Path, spawner: Spawner, cgroup_parent: str) -> Runtime:
    ranges = IdRanges(base=BASE, size=SIZE, count=64)
    return RangedRuntime(
        tmp_path / "state", tmp_path / "run", open_driver(cgroup_parent), spawner, userns=ranges
    )


def test_runtime_container_exec_and_terminal_are_mapped_and_filtered(
    ranged: Runtime, busybox_layer: Path, probe_lower: Path
) -> None:
    img = image(busybox_layer, probe_lower)
    res = run(
        ranged,
        img,
        "cat /proc/self/uid_map; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status;"
        ' probe keyctl unshare-user; unshare -U true; echo "-U: $?"',
    )
    inside, outside, count = uid_map(res.out.splitlines()[0])
    assert inside == 0 and outside >= BASE and count == SIZE, res.out
    assert "Seccomp:\t2" in res.out and "NoNewPrivs:\t1" in res.out, res.out
    got = parse(res.out)
    assert got["keyctl"] == "EPERM" and got["unshare-user"] == "EPERM", res.out
    assert "-U: 1" in res.out
    with running(ranged, img) as (cid, pid):
        want = (0, BASE + (int(cid[:8], 16) % 64) * SIZE, SIZE)
        for tty in (False, True):
            status, out = exec_out(
                ranged, cid, pid, ["sh", "-c", "cat /proc/self/uid_map; id"], tty=tty
            )
            assert status == 0, out
            lines = out.replace("\r", "").splitlines()
            assert uid_map(lines[0]) == want and "uid=0(root) gid=0(root)" in lines[1], (tty, out)
        # The terminal's PTY belongs to the container's root.
        status, out = exec_out(ranged, cid, pid, ["sh", "-c", "stat -c %u $(tty)"], tty=True)
        assert status == 0 and out.split()[-1] == "0", out


# ------------------------------------------------------------------ the fallback


@pytest.fixture
def ramfs_state(tmp_path: Path) -> Iterator[Path]:
    """A state dir on ramfs, which cannot be idmapped (tmpfs can, since Linux 6.3)."""
    from rexecd import _native as n

    where = tmp_path / "ramfs"
    where.mkdir()
    try:
        n.mount("none", str(where), "ramfs", 0, "mode=0700")
    except OSError as exc:
        pytest.skip(f"cannot mount ramfs: {exc}")
    try:
        (where / "state" / "tmp").mkdir(parents=True)
        yield where / "state"
    finally:
        n.umount2(str(where), n.MNT_DETACH)


def test_auto_falls_back_with_the_failed_call_and_on_refuses(
    ramfs_state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rexecd.config import Config
    from rexecd.daemon import _userns
    from rexecd.errors import RuntimeFailure

    def cfg(enabled: str) -> Config:
        return Config.model_validate(
            {"state_dir": str(ramfs_state), "userns": {"enabled": enabled}}
        )

    with caplog.at_level("WARNING", logger="rexecd.daemon"):
        assert _userns(cfg("auto")) is None
    assert "mount_setattr(MOUNT_ATTR_IDMAP): errno 22" in caplog.text, caplog.text
    with pytest.raises(RuntimeFailure, match=r"userns\.enabled is on, but mount_setattr"):
        _userns(cfg("on"))
    # The control: on the test's own file system the same probe says yes.
    disk = ramfs_state.parent.parent / "disk"
    (disk / "tmp").mkdir(parents=True)
    on_disk = Config.model_validate({"state_dir": str(disk), "userns": {"enabled": "auto"}})
    ranges = _userns(on_disk)
    assert ranges is not None and ranges.base == on_disk.userns.base


_ATTACHED = """
import os, sys
from rexecd import _native as n
from rexecd.runtime import userns
from rexecd.runtime.spec import UsernsSpec
n.unshare(n.CLONE_NEWNS)
n.mount(None, "/", None, n.MS_REC | n.MS_PRIVATE)
lower = sys.argv[1]
fds = userns.make_namespaces(UsernsSpec(base=3_100_000, size=65536))
before = os.stat(os.path.join(lower, "f")).st_uid
for fd in userns.idmap_layers([lower], fds.user).values():
    os.close(fd)
fds.close()
print(before, os.stat(os.path.join(lower, "f")).st_uid)
"""


def test_idmapped_layers_are_attached_in_the_callers_mount_namespace(tmp_path: Path) -> None:
    # overlayfs before Linux 6.15 (Debian 12's 6.1, Ubuntu 24.04's 6.8) refuses a
    # detached mount as a layer with EINVAL: an idmapped copy left detached made every
    # such kernel fall back to no user namespaces. Each copy is mounted over its own
    # path, in the caller's (private) mount namespace only: the path itself then shows
    # the mapped owner (a detached copy would leave it reading 0).
    import subprocess
    import sys

    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-c", _ATTACHED, str(lower)],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )
    if "mount_setattr" in out.stderr:
        pytest.skip(f"no idmapped mounts on {tmp_path}: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "3100000"]
    # Only in the child's namespace: the host's view of the layer is unchanged.
    assert os.stat(lower / "f").st_uid == 0
