"""Integration tests of LoopStorage on real loop devices and ext4: quota enforcement,
durability across remounts and crashes, wipe/destroy, growth, leaks and reconcile.

Every test works in its own tmp dir; teardown unmounts whatever is left under it and
fails the test if a loop device backed by a file under it remains.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexecd import _native as n
from rexecd.errors import Conflict, InvalidRequest, NotFound, RuntimeFailure
from rexecd.runtime.storage import LoopStorage, Volume, ext4, loop, loopdev, mountinfo

MiB = 1024 * 1024
USER = "7d3a9c1e-0f4b-4e2a-b8c6-5d1e2f3a4b5c"

pytestmark = pytest.mark.skipif(
    not Path("/dev/loop-control").exists() or shutil.which("losetup") is None,
    reason="needs /dev/loop-control and util-linux losetup (to check for leaks)",
)


def our_loops(base: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if str(base) in line]


def our_mounts(base: Path) -> list[Path]:
    return [m.mountpoint for m in mountinfo.read() if m.mountpoint.is_relative_to(base)]


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    base = tmp_path.resolve()
    assert our_loops(base) == []
    yield base
    for mp in reversed(our_mounts(base)):
        try:
            n.umount2(str(mp), n.MNT_DETACH)
        except OSError:
            pass
    left: list[str] = []
    for _ in range(50):  # a lazily detached mount lets go of its device at its last user
        left = our_loops(base)
        if not left:
            break
        time.sleep(0.1)
    assert left == [], f"loop devices leaked: {left}"
    assert our_mounts(base) == []


@pytest.fixture
def storage(base: Path) -> LoopStorage:
    return LoopStorage(base / "state", base / "run")


def fill(path: Path, limit: int = 1 << 40) -> int:
    """Write 1 MiB chunks into ``path`` until ENOSPC (returned) or ``limit`` bytes."""
    chunk = b"\xa5" * MiB
    written = 0
    with open(path, "wb") as f:
        try:
            while written < limit:
                written += f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return -written
    return written


def attached(vol: Volume) -> list[str]:
    """The loop devices still backed by ``vol``'s image, after giving udev (which opens
    a device to probe it when a writer closes it) a moment to let go."""
    return loopdev.wait_detached(vol.image, 5.0)


def can_punch_holes(directory: Path) -> bool:
    probe = directory / "punch-probe"
    probe.write_bytes(b"x" * 65536)
    try:
        cmd = ["fallocate", "--punch-hole", "--offset", "0", "--length", "65536", str(probe)]
        return subprocess.run(cmd, capture_output=True).returncode == 0
    finally:
        probe.unlink()


# -- quota ------------------------------------------------------------------------------


def test_full_volume_gives_enospc_and_host_pays_at_most_the_quota(
    storage: LoopStorage, base: Path
) -> None:
    os.sync()
    before = os.statvfs(base)
    vol = storage.ensure(USER, "web", 64, (1000, 1000))
    assert vol.size_mb == 64
    used, total = storage.usage(vol)
    assert 0 < used < total <= 64 * MiB

    written = fill(vol.home / "big")
    assert written < 0, "home must hit ENOSPC"
    assert -written <= 64 * MiB
    proc = subprocess.run(
        ["dd", "if=/dev/zero", f"of={vol.upper / 'big'}", "bs=1M", "count=16"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr
    used, total = storage.usage(vol)
    assert total - used < 2 * MiB

    os.sync()
    after = os.statvfs(base)
    # The image is sparse: the host pays for what was written, never past the size
    # (plus the host's own extent blocks for the file).
    assert vol.image.stat().st_blocks * 512 <= 64 * MiB + MiB
    # Other work on this disk moves the host's free space too: allow a little.
    host_drop = (before.f_bavail - after.f_bavail) * after.f_frsize
    assert host_drop <= 64 * MiB + 32 * MiB, host_drop

    (vol.home / "big").unlink()
    (vol.upper / "big").unlink()
    assert fill(vol.upper / "again", 8 * MiB) == 8 * MiB


def test_other_volumes_are_unaffected_by_a_full_one(storage: LoopStorage) -> None:
    a = storage.ensure(USER, "a", 32)
    b = storage.ensure(USER, "b", 32)
    assert fill(a.home / "big") < 0
    assert fill(b.home / "ok", 16 * MiB) == 16 * MiB


# -- durability -------------------------------------------------------------------------


def test_data_and_owner_survive_release_and_ensure(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 32, (1000, 1001))
    (vol.home / "notes.txt").write_text("hello")
    (vol.upper / "etc").mkdir()
    storage.release(vol)
    assert not vol.mountpoint.exists()
    assert attached(vol) == []
    vol = storage.ensure(USER, "web", 32, (1000, 1001))
    assert (vol.home / "notes.txt").read_text() == "hello"
    assert (vol.upper / "etc").is_dir()
    st = vol.home.stat()
    assert (st.st_uid, st.st_gid) == (1000, 1001)


def test_writer_killed_mid_write_leaves_a_usable_volume(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 64)
    script = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1] + '/durable', os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "os.write(fd, b'committed' * 1000); os.fsync(fd); os.close(fd)\n"
        "print('synced', flush=True)\n"
        "with open(sys.argv[1] + '/partial', 'wb') as f:\n"
        "    while True:\n"
        "        f.write(os.urandom(65536))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(vol.home)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "synced"
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    proc.stdout.close()

    storage.release(vol)
    vol = storage.ensure(USER, "web", 64)
    assert (vol.home / "durable").read_bytes() == b"committed" * 1000
    (vol.home / "after").write_text("still writable")
    storage.release(vol)
    check = subprocess.run(["e2fsck", "-f", "-n", str(vol.image)], capture_output=True)
    assert check.returncode == 0, check.stdout


def test_crashed_image_is_recovered_by_fsck(storage: LoopStorage) -> None:
    """A copy taken while mounted is what the disk holds after a power cut: the
    journal is dirty (needs_recovery) and ensure() must replay it before mounting."""
    vol = storage.ensure(USER, "web", 64)
    with open(vol.home / "durable", "wb") as f:
        f.write(b"fsynced" * 1000)
        f.flush()
        os.fsync(f.fileno())
    crashed = vol.image.with_name("crashed.img")
    subprocess.run(["cp", "--sparse=always", str(vol.image), str(crashed)], check=True)
    header = subprocess.run(["dumpe2fs", "-h", str(crashed)], capture_output=True, text=True).stdout
    assert "needs_recovery" in header

    storage.release(vol)
    other = storage.ensure(USER, "crashed", 64)
    assert (other.home / "durable").read_bytes() == b"fsynced" * 1000
    storage.release(other)
    check = subprocess.run(["e2fsck", "-f", "-n", str(crashed)], capture_output=True)
    assert check.returncode == 0, check.stdout


def test_damaged_image_is_refused_and_kept(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    storage.release(vol)
    with open(vol.image, "r+b") as f:  # zero the primary superblock
        f.seek(1024)
        f.write(bytes(1024))
    with pytest.raises(RuntimeFailure) as err:
        storage.ensure(USER, "web", 32)
    assert err.value.step == "e2fsck"
    assert vol.image.exists()
    assert attached(vol) == []
    assert not os.path.ismount(vol.mountpoint)


# -- delete -----------------------------------------------------------------------------


def test_wipe_root_keeps_home_and_destroy_removes_the_image(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    (vol.upper / "usr").mkdir()
    (vol.upper / "usr" / "junk").write_bytes(b"x" * MiB)
    (vol.work / "work").mkdir(mode=0)
    (vol.home / "keep").write_text("mine")
    storage.wipe_root(vol)
    assert list(vol.upper.iterdir()) == []
    assert list(vol.work.iterdir()) == []
    assert (vol.home / "keep").read_text() == "mine"

    # Delete keeps the image; recreating the same name sees the old home, fresh root.
    storage.release(vol)
    vol = storage.ensure(USER, "web", 32)
    assert (vol.home / "keep").read_text() == "mine"
    assert list(vol.upper.iterdir()) == []

    storage.destroy(USER, "web")
    assert not vol.image.exists()
    assert not os.path.ismount(vol.mountpoint)
    assert attached(vol) == []
    storage.destroy(USER, "web")  # idempotent
    vol = storage.ensure(USER, "web", 32)
    assert list(vol.home.iterdir()) == []


def test_wipe_root_of_an_unmounted_volume_mounts_it_for_the_wipe(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    (vol.upper / "junk").write_text("x")
    (vol.home / "keep").write_text("mine")
    storage.release(vol)
    storage.wipe_root(vol)
    assert not os.path.ismount(vol.mountpoint)
    assert attached(vol) == []
    vol = storage.ensure(USER, "web", 32)
    assert not (vol.upper / "junk").exists()
    assert (vol.home / "keep").read_text() == "mine"
    with pytest.raises(NotFound):
        storage.wipe_root(storage.layout.volume(USER, "nope", 32))


def test_wipe_root_gives_the_space_back_to_the_host(storage: LoopStorage, base: Path) -> None:
    if not can_punch_holes(base):
        pytest.skip("the file system under the test dir cannot punch holes (no FITRIM)")
    vol = storage.ensure(USER, "web", 64)
    assert fill(vol.upper / "big", 40 * MiB) == 40 * MiB
    os.sync()
    assert vol.image.stat().st_blocks * 512 >= 40 * MiB
    storage.wipe_root(vol)
    os.sync()
    assert vol.image.stat().st_blocks * 512 < 20 * MiB


# -- growth -----------------------------------------------------------------------------


def test_resize_grows_and_the_new_space_is_usable(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    (vol.home / "keep").write_text("mine")
    assert fill(vol.home / "big") < 0
    _, total_before = storage.usage(vol)

    vol = storage.resize(vol, 64)
    assert vol.size_mb == 64
    assert os.path.ismount(vol.mountpoint)
    _, total = storage.usage(vol)
    assert total - total_before >= 30 * MiB
    assert fill(vol.home / "more", 24 * MiB) == 24 * MiB
    assert (vol.home / "keep").read_text() == "mine"

    with pytest.raises(InvalidRequest, match="only grows"):
        storage.resize(vol, 48)
    assert storage.resize(vol, 64).size_mb == 64


def test_growth_while_unmounted_is_finished_by_ensure(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    storage.release(vol)
    assert storage.resize(vol, 48).size_mb == 48
    vol = storage.ensure(USER, "web", 32)  # a smaller request keeps the real size
    assert vol.size_mb == 48
    assert storage.usage(vol)[1] > 40 * MiB
    storage.release(vol)
    vol = storage.ensure(USER, "web", 80)  # a bigger one grows it
    assert vol.size_mb == 80
    assert storage.usage(vol)[1] > 70 * MiB
    vol = storage.ensure(USER, "web", 96)  # and so does one while mounted
    assert storage.usage(vol)[1] > 85 * MiB


def test_resize_while_in_use(storage: LoopStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    with open(vol.home / "open", "wb") as f:
        f.write(b"x")
        if ext4.can_grow_online():
            assert storage.resize(vol, 64).size_mb == 64
            f.write(b"y" * 40 * MiB)  # past the old size, through the open file
        else:
            with pytest.raises(Conflict, match="CAP_SYS_RESOURCE"):
                storage.resize(vol, 64)
            assert os.path.ismount(vol.mountpoint)
            f.write(b"y")
    assert vol.image.stat().st_size in (32 * MiB, 64 * MiB)


def test_resize_refused_while_another_mount_holds_the_file_system(
    storage: LoopStorage, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a running container's overlay does: hold the file system from elsewhere,
    so unmounting ours does not free it. It must never be mounted a second time."""
    monkeypatch.setattr(loop, "DETACH_WAIT", 0.3)
    vol = storage.ensure(USER, "web", 32)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    n.mount(str(vol.home), str(elsewhere), None, n.MS_BIND)
    try:
        if not ext4.can_grow_online():
            with pytest.raises(Conflict, match="in use"):
                storage.resize(vol, 64)
            assert os.path.ismount(vol.mountpoint)
            assert (vol.home / "x").write_text("still here") > 0
        storage.release(vol)
        assert not os.path.ismount(vol.mountpoint)
        assert len(loopdev.wait_detached(vol.image, 0.5)) == 1
        with pytest.raises(RuntimeFailure, match="still in use") as err:
            storage.ensure(USER, "web", 32)
        assert err.value.errno == errno.EBUSY
    finally:
        n.umount2(str(elsewhere))
    assert attached(vol) == []
    assert storage.ensure(USER, "web", 32).size_mb == 32


# -- failure leaves nothing ---------------------------------------------------------------


def test_failed_mount_leaves_no_device_mount_or_image(
    storage: LoopStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise OSError(errno.EPERM, "mount: refused for the test", args[1])

    monkeypatch.setattr(n, "mount", refuse)
    with pytest.raises(RuntimeFailure) as err:
        storage.ensure(USER, "web", 32)
    assert err.value.step == "mount volume"
    vol = storage.layout.volume(USER, "web", 32)
    assert not vol.image.exists()
    assert not storage.layout.partial(USER, "web").exists()
    assert not vol.mountpoint.exists()
    assert attached(vol) == []


def test_failure_after_mount_unmounts_but_keeps_existing_data(
    storage: LoopStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = storage.ensure(USER, "web", 32)
    (vol.home / "keep").write_text("mine")
    storage.release(vol)

    def broken(vol: Volume, owner: tuple[int, int]) -> None:
        raise RuntimeFailure("prepare volume dirs", "broken for the test")

    monkeypatch.setattr(loop, "make_dirs", broken)
    with pytest.raises(RuntimeFailure):
        storage.ensure(USER, "web", 32)
    with pytest.raises(RuntimeFailure):
        storage.ensure(USER, "new", 32)
    monkeypatch.undo()
    assert vol.image.exists()
    assert not storage.layout.image(USER, "new").exists()
    assert storage.mounted() == []
    assert (storage.ensure(USER, "web", 32).home / "keep").read_text() == "mine"


def test_failed_mkfs_leaves_no_partial_image(
    storage: LoopStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(image: Path) -> None:
        raise RuntimeFailure("mkfs.ext4", "broken for the test")

    monkeypatch.setattr(ext4, "mkfs", broken)
    with pytest.raises(RuntimeFailure, match="broken"):
        storage.ensure(USER, "web", 32)
    images = storage.layout.images / USER
    assert list(images.iterdir()) == []


def test_leftover_partial_image_is_replaced(storage: LoopStorage) -> None:
    part = storage.layout.partial(USER, "web")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"half a mkfs")
    vol = storage.ensure(USER, "web", 32)
    assert not part.exists()
    assert storage.usage(vol)[1] > 16 * MiB


# -- leaks ------------------------------------------------------------------------------


def test_a_hundred_cycles_leak_nothing(storage: LoopStorage, base: Path) -> None:
    for i in range(100):
        vol = storage.ensure(USER, "cycle", 16)
        if i == 0:
            (vol.home / "keep").write_text("x")
        storage.release(vol)
        assert attached(vol) == [], i
    assert (storage.ensure(USER, "cycle", 16).home / "keep").read_text() == "x"
    storage.release(vol)
    for i in range(100):
        vol = storage.ensure(USER, "gone", 16)
        storage.destroy(USER, "gone")
        assert attached(vol) == [], i
        assert not vol.image.exists()
    assert our_loops(base) == []
    assert our_mounts(base) == []


def test_ensure_is_idempotent_and_thread_safe(storage: LoopStorage, base: Path) -> None:
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            storage.ensure(USER, name, 16)
        except BaseException as exc:
            errors.append(exc)

    names = [f"v{i}" for i in range(8)] + ["same"] * 6
    threads = [threading.Thread(target=work, args=(nm,)) for nm in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v.name for v in storage.mounted()] == sorted(set(names))
    assert len(our_mounts(base)) == 9
    assert len(our_loops(base)) == 9
    for vol in storage.mounted():
        storage.release(vol)
        storage.release(vol)  # idempotent


# -- reconcile --------------------------------------------------------------------------


def test_reconcile_after_restart_releases_orphans_only(storage: LoopStorage, base: Path) -> None:
    storage.ensure(USER, "keep", 16)
    storage.ensure(USER, "orphan", 16)
    storage.ensure("other-user", "orphan", 16)
    unrelated = [base / "unrelated", base / "run" / "not-volumes"]
    for mp in unrelated:
        mp.mkdir(parents=True)
        n.mount("tmpfs", str(mp), "tmpfs", 0, "size=1m")
    stale = base / "run" / "volumes" / USER / "stale"
    stale.mkdir()

    restarted = LoopStorage(base / "state", base / "run")
    assert [(v.user_id, v.name, v.size_mb) for v in restarted.mounted()] == [
        (USER, "keep", 16),
        (USER, "orphan", 16),
        ("other-user", "orphan", 16),
    ]
    released = restarted.reconcile({(USER, "keep")})
    assert released == [f"{USER}/orphan", "other-user/orphan"]
    assert [v.name for v in restarted.mounted()] == ["keep"]
    assert all(os.path.ismount(mp) for mp in unrelated)
    assert not stale.exists()
    assert restarted.layout.image(USER, "orphan").exists()  # data kept
    for mp in unrelated:
        n.umount2(str(mp))


# -- validation -------------------------------------------------------------------------


def test_bad_requests(storage: LoopStorage) -> None:
    with pytest.raises(InvalidRequest):
        storage.ensure(USER, "web", 8)
    with pytest.raises(InvalidRequest):
        storage.ensure(USER, "../etc", 32)
    with pytest.raises(InvalidRequest):
        storage.ensure("..", "web", 32)
    vol = storage.layout.volume(USER, "web", 32)
    with pytest.raises(NotFound):
        storage.resize(vol, 64)
    with pytest.raises(Conflict, match="not mounted"):
        storage.usage(vol)
    storage.release(vol)  # nothing to release: fine
    storage.destroy(USER, "web")


def test_rename_moves_an_unmounted_volume_and_refuses_in_use(storage: LoopStorage) -> None:
    vol = storage.ensure("u1", "old", 16)
    (vol.home / "kept").write_text("mine")
    with pytest.raises(Conflict):
        storage.rename("u1", "old", "new")  # mounted
    storage.release(vol)
    other = storage.ensure("u1", "taken", 16)
    storage.release(other)
    with pytest.raises(Conflict):
        storage.rename("u1", "old", "taken")
    storage.rename("u1", "old", "new")
    assert not storage.volume("u1", "old").image.exists()
    moved = storage.ensure("u1", "new", 16)
    try:
        assert (moved.home / "kept").read_text() == "mine"
    finally:
        storage.release(moved)
    storage.rename("u1", "absent", "whatever")  # nothing to move: no error
