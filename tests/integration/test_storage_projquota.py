"""Integration tests of ProjectQuotaStorage on a real ext4 (and xfs) file system with project
quota: EDQUOT at the limit, wipe/destroy, rename, online growth, usage, reconcile, an
overlay with its upper/work on a volume, and the choice ``choose_storage`` makes.

Every test makes its own file system in an image file (``mkfs -O quota,project``,
mounted ``-o loop,prjquota``) and unmounts it after. Writes that must meet the quota run
in a child without CAP_SYS_RESOURCE, as a container's do: the kernel lets a process
with it write past any quota limit. Skipped, with the kernel's reason, where the kernel
cannot mount a file system with project quota (no CONFIG_QFMT_V2 / CONFIG_XFS_QUOTA).
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rexecd.errors import Conflict, InvalidRequest, NotFound, RuntimeFailure
from rexecd.runtime.storage import LoopStorage, ProjectQuotaStorage, choose_storage, projquota
from tests.deadlines import scaled

MiB = 1024 * 1024
USER = "7d3a9c1e-0f4b-4e2a-b8c6-5d1e2f3a4b5c"
# Over the quota either way: ext4 says EDQUOT, xfs ENOSPC for a project quota.
FULL = (errno.EDQUOT, errno.ENOSPC)
NO_RESOURCE = ["setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource", "--"]

pytestmark = pytest.mark.skipif(
    shutil.which("setpriv") is None or not Path("/dev/loop-control").exists(),
    reason="needs util-linux setpriv and loop devices",
)

_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-O", "quota,project", "-E", "lazy_itable_init=1"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}
_MOUNT_OPTS = {"ext4": "loop,prjquota", "xfs": "loop,pquota"}


def _scratch() -> Path | None:
    # /var/tmp is on disk here; in the test VM it is read-only, and pytest's tmp is used.
    return Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else None


def _why(kind: str, proc: subprocess.CompletedProcess[str]) -> str:
    # mount(8) only says "wrong fs type, bad option..."; the kernel's build says why.
    need = {"ext4": "CONFIG_QFMT_V2", "xfs": "CONFIG_XFS_QUOTA"}[kind]
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            if f"# {need} is not set" in f.read():
                return f"built without {need}"
    except OSError:
        pass
    return proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else "mount failed"


@pytest.fixture(params=["ext4", "xfs"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A fresh file system with project quota enforced, mounted; its mount point."""
    kind: str = request.param
    if shutil.which(_MKFS[kind][0]) is None:
        pytest.skip(f"{_MKFS[kind][0]} is not installed")
    scratch = _scratch()
    base = Path(tempfile.mkdtemp(prefix="rexecd-pq-", dir=scratch)) if scratch else tmp_path
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    try:
        with open(image, "wb") as f:
            f.truncate(512 * MiB)
        subprocess.run([*_MKFS[kind], str(image)], check=True, capture_output=True)
        proc = subprocess.run(
            ["mount", "-t", kind, "-o", _MOUNT_OPTS[kind], str(image), str(mnt)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"this kernel cannot mount {kind} with project quota: {_why(kind, proc)}")
        try:
            yield mnt
        finally:
            # Lazily: a test that failed half way may still hold a file open in it.
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def storage(fs: Path) -> ProjectQuotaStorage:
    return ProjectQuotaStorage(fs / "state")


def write(path: Path, limit: int, *, caps: bool = False, mode: str = "wb") -> tuple[int, int]:
    """Write 1 MiB chunks to ``path`` in a child until it fails or ``limit`` bytes are
    written; ``(bytes written, errno or 0)``. Without CAP_SYS_RESOURCE unless ``caps``."""
    script = (
        "import json, os, sys\n"
        "path, limit, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n"
        "done, err = 0, 0\n"
        "try:\n"
        "    with open(path, mode) as f:\n"
        "        while done < limit:\n"
        "            done += f.write(b'\\xa5' * (1 << 20))\n"
        "            f.flush()\n"
        "        os.fsync(f.fileno())\n"
        "except OSError as exc:\n"
        "    err = exc.errno\n"
        "print(json.dumps([done, err]))\n"
    )
    argv = [sys.executable, "-c", script, str(path), str(limit), mode]
    out = subprocess.run(
        argv if caps else [*NO_RESOURCE, *argv], check=True, capture_output=True, text=True
    ).stdout
    done, err = json.loads(out)
    return int(done), int(err)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + scaled(timeout)
    while not check():
        if time.monotonic() > deadline:
            return False
        os.sync()
        time.sleep(0.05)
    return True


def projid(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, projquota.FS_IOC_FSGETXATTR, bytes(28))
    finally:
        os.close(fd)
    return projquota.FsXattr.unpack(raw).projid


def quota(storage: ProjectQuotaStorage, pid: int) -> projquota.DqBlk:
    return storage._get(pid)


# -- quota ------------------------------------------------------------------------------


def test_full_volume_fails_writes_and_others_are_unaffected(storage: ProjectQuotaStorage) -> None:
    vol = storage.ensure(USER, "web", 64, (1000, 1000))
    assert vol.size_mb == 64
    assert vol.mountpoint == vol.image == storage.root / USER / "web"
    used, total = storage.usage(vol)
    # xfs keeps small directories inside their inodes: nothing may be charged yet.
    assert 0 <= used < MiB and total == 64 * MiB

    done, err = write(vol.home / "big", 1 << 30)
    assert err in FULL, os.strerror(err)
    assert 56 * MiB <= done <= 64 * MiB
    done, err = write(vol.upper / "more", 16 * MiB)
    assert err in FULL and done < 8 * MiB
    used, total = storage.usage(vol)
    assert total - used < 2 * MiB
    # What df shows inside: statfs of a project dir reports the project's limit.
    st = os.statvfs(vol.home)
    assert st.f_blocks * st.f_frsize == 64 * MiB

    other = storage.ensure(USER, "other", 32)
    assert projid(other.mountpoint) != projid(vol.mountpoint)
    assert write(other.home / "ok", 16 * MiB) == (16 * MiB, 0)

    (vol.home / "big").unlink()
    (vol.upper / "more").unlink(missing_ok=True)  # xfs refuses even to create it
    assert write(vol.upper / "again", 8 * MiB) == (8 * MiB, 0)


def test_the_volume_and_its_limit_are_on_the_file_system(
    storage: ProjectQuotaStorage, fs: Path
) -> None:
    """Nothing but the file system records a volume: a new daemon (or a host reboot,
    here an unmount and mount) finds it whole, with its data, owner and limit."""
    vol = storage.ensure(USER, "web", 48, (1000, 1001))
    (vol.home / "notes.txt").write_text("hello")
    storage.release(vol)
    assert vol.mountpoint.is_dir()  # nothing was mounted, nothing goes
    fstype = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", str(fs)], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["umount", str(fs)], check=True)
    image = fs.parent / "fs.img"
    subprocess.run(
        ["mount", "-t", fstype, "-o", _MOUNT_OPTS[fstype], str(image), str(fs)], check=True
    )

    again = ProjectQuotaStorage(fs / "state")
    assert [(v.name, v.size_mb) for v in again.mounted()] == [("web", 48)]
    vol = again.ensure(USER, "web", 32, (1000, 1001))  # a smaller request keeps the size
    assert vol.size_mb == 48
    assert (vol.home / "notes.txt").read_text() == "hello"
    st = vol.home.stat()
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    done, err = write(vol.home / "big", 1 << 30)
    assert err in FULL and done <= 48 * MiB


def test_overlay_with_upper_and_work_on_a_volume(storage: ProjectQuotaStorage, fs: Path) -> None:
    """What a container's root is: an overlay whose upper and work dirs are the volume's.
    Writes through it, copy-ups included, are charged to the volume's project; even a
    writer with CAP_SYS_RESOURCE is held (overlayfs writes without it)."""
    vol = storage.ensure(USER, "web", 32)
    lower = fs / "lower"
    lower.mkdir()
    (lower / "big-lower").write_bytes(b"x" * 8 * MiB)
    merged = fs / "merged"
    merged.mkdir()
    script = f"""
set -u
mount -t overlay overlay -o lowerdir={lower},upperdir={vol.upper},workdir={vol.work} {merged}
cat {merged}/big-lower >/dev/null && echo lower=ok
echo y >> {merged}/big-lower && echo copyup=ok
dd if=/dev/zero of={merged}/full bs=1M count=64 2>&1; echo "rc=$?"
df -k {merged} | tail -n1
{" ".join(NO_RESOURCE)} dd if=/dev/zero of={merged}/more bs=1M count=8 2>&1; echo "rc=$?"
"""
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    out = proc.stdout + proc.stderr
    assert "lower=ok" in out and "copyup=ok" in out, out
    assert out.count("rc=1") == 2, out
    assert out.count("Disk quota exceeded") + out.count("No space left") == 2, out
    df = next(line for line in out.splitlines() if line.startswith("overlay")).split()
    assert int(df[1]) * 1024 == 32 * MiB, out
    # The copy-up and the file are in the upper dir, charged to the project.
    assert (vol.upper / "big-lower").stat().st_size == 8 * MiB + 2
    assert (vol.upper / "full").stat().st_size <= 32 * MiB - 8 * MiB
    used, total = storage.usage(vol)
    assert total - used < 2 * MiB
    assert not os.path.ismount(merged)  # it lived and died in its own mount namespace


# -- delete -----------------------------------------------------------------------------


def test_wipe_root_keeps_home_and_destroy_removes(storage: ProjectQuotaStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    (vol.upper / "usr").mkdir()
    (vol.upper / "usr" / "junk").write_bytes(b"x" * 4 * MiB)
    (vol.work / "work").mkdir(mode=0)
    (vol.home / "keep").write_text("mine")
    used_before = storage.usage(vol)[0]
    storage.wipe_root(vol)
    assert list(vol.upper.iterdir()) == []
    assert list(vol.work.iterdir()) == []
    assert (vol.home / "keep").read_text() == "mine"
    # xfs frees deleted inodes' blocks from a background worker: give it a moment.
    assert wait_for(lambda: storage.usage(vol)[0] < used_before - 3 * MiB)
    assert projid(vol.upper) == projid(vol.mountpoint)  # the new root is in the project

    storage.release(vol)
    vol = storage.ensure(USER, "web", 32)
    assert (vol.home / "keep").read_text() == "mine"

    old = projid(vol.mountpoint)
    storage.destroy(USER, "web")
    assert not vol.mountpoint.exists()
    assert list(vol.mountpoint.parent.iterdir()) == []
    assert quota(storage, old).unused  # the limit went with the data
    storage.destroy(USER, "web")  # idempotent
    vol = storage.ensure(USER, "web", 32)
    assert list(vol.home.iterdir()) == []
    with pytest.raises(NotFound):
        storage.wipe_root(storage.volume(USER, "nope"))


def test_rename_keeps_data_project_and_limit(storage: ProjectQuotaStorage) -> None:
    vol = storage.ensure("u1", "old", 48)
    (vol.home / "kept").write_text("mine")
    pid = projid(vol.mountpoint)
    with pytest.raises(Conflict):
        storage.rename("u1", "old", "new")  # in use
    storage.release(vol)
    storage.release(storage.ensure("u1", "taken", 16))
    with pytest.raises(Conflict):
        storage.rename("u1", "old", "taken")
    storage.rename("u1", "old", "new")
    assert not storage.volume("u1", "old").mountpoint.exists()
    moved = storage.ensure("u1", "new", 16)
    assert moved.size_mb == 48
    assert projid(moved.mountpoint) == pid
    assert (moved.home / "kept").read_text() == "mine"
    done, err = write(moved.home / "big", 1 << 30)
    assert err in FULL and 40 * MiB < done <= 48 * MiB
    storage.rename("u1", "absent", "whatever")  # nothing to move: no error


# -- growth -----------------------------------------------------------------------------


def test_resize_grows_online_and_never_shrinks(storage: ProjectQuotaStorage) -> None:
    vol = storage.ensure(USER, "web", 32)
    (vol.home / "keep").write_text("mine")
    assert write(vol.home / "big", 1 << 30)[1] in FULL

    vol = storage.resize(vol, 64)
    assert vol.size_mb == 64
    assert storage.usage(vol)[1] == 64 * MiB
    assert write(vol.home / "more", 24 * MiB) == (24 * MiB, 0)
    assert (vol.home / "keep").read_text() == "mine"
    with pytest.raises(InvalidRequest, match="only grows"):
        storage.resize(vol, 48)
    assert storage.resize(vol, 64).size_mb == 64
    assert storage.ensure(USER, "web", 80).size_mb == 80  # a bigger ensure grows it too


# -- bookkeeping ------------------------------------------------------------------------


def test_mounted_and_reconcile(storage: ProjectQuotaStorage, fs: Path) -> None:
    storage.ensure(USER, "keep", 16)
    storage.ensure(USER, "orphan", 24)
    storage.ensure("other-user", "orphan", 16)
    # What a daemon killed during a create and during a delete leaves.
    for leftover in (storage.root / USER / "half.part", storage.root / USER / "x.gone-1234"):
        leftover.mkdir()
        projquota._set_project(leftover, projquota.PROJID_MIN + 7, inherit=True)
        (leftover / "data").write_bytes(b"x" * MiB)
    assert [(v.user_id, v.name, v.size_mb) for v in storage.mounted()] == [
        (USER, "keep", 16),
        (USER, "orphan", 24),
        ("other-user", "orphan", 16),
    ]
    assert storage.reconcile({(USER, "keep")}) == [f"{USER}/orphan", "other-user/orphan"]
    assert sorted(p.name for p in (storage.root / USER).iterdir()) == ["keep", "orphan"]
    assert quota(storage, projquota.PROJID_MIN + 7).unused
    # A restarted daemon has nothing in use to release, and sees every volume.
    restarted = ProjectQuotaStorage(fs / "state")
    assert restarted.reconcile(set()) == []
    assert len(restarted.mounted()) == 3


def test_ensure_is_idempotent_and_thread_safe(storage: ProjectQuotaStorage) -> None:
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
    vols = storage.mounted()
    assert [v.name for v in vols] == sorted(set(names))
    assert len({projid(v.mountpoint) for v in vols}) == len(vols)


def test_a_failed_create_leaves_nothing_and_a_failed_ensure_keeps_data(
    storage: ProjectQuotaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = storage.ensure(USER, "web", 16)
    (vol.home / "keep").write_text("mine")

    def broken(vol: object, owner: tuple[int, int]) -> None:
        raise RuntimeFailure("prepare volume dirs", "broken for the test")

    monkeypatch.setattr(projquota, "make_dirs", broken)
    with pytest.raises(RuntimeFailure):
        storage.ensure(USER, "new", 16)
    with pytest.raises(RuntimeFailure):
        storage.ensure(USER, "web", 16)
    monkeypatch.undo()
    assert sorted(p.name for p in (storage.root / USER).iterdir()) == ["web"]
    assert (storage.ensure(USER, "web", 16).home / "keep").read_text() == "mine"


def test_bad_requests(storage: ProjectQuotaStorage) -> None:
    with pytest.raises(InvalidRequest):
        storage.ensure(USER, "web", 8)
    with pytest.raises(InvalidRequest):
        storage.ensure(USER, "../etc", 32)
    with pytest.raises(InvalidRequest):
        storage.ensure("..", "web", 32)
    vol = storage.volume(USER, "web")
    with pytest.raises(NotFound):
        storage.resize(vol, 64)
    with pytest.raises(NotFound):
        storage.usage(vol)
    storage.release(vol)  # nothing to release: fine
    storage.destroy(USER, "web")


# -- the choice -------------------------------------------------------------------------


def test_choose_storage_picks_project_quota_where_enforced(fs: Path) -> None:
    assert isinstance(choose_storage(fs / "state", fs / "run"), ProjectQuotaStorage)
    assert isinstance(choose_storage(fs / "state", fs / "run", "project"), ProjectQuotaStorage)
    assert isinstance(choose_storage(fs / "state", fs / "run", "loop"), LoopStorage)
    # auto takes project quota only where no container can change its files' project
    # (user namespaces, or a seccomp profile refusing FS_IOC_FSSETXATTR in every tier).
    unsafe = choose_storage(fs / "state", fs / "run", "auto", project_safe=False)
    assert isinstance(unsafe, LoopStorage)
    forced = choose_storage(fs / "state", fs / "run", "project", project_safe=False)
    assert isinstance(forced, ProjectQuotaStorage)
    # A state dir already holding loop images stays with them.
    (fs / "old" / "volumes" / USER).mkdir(parents=True)
    (fs / "old" / "volumes" / USER / "web.img").write_bytes(b"")
    assert isinstance(choose_storage(fs / "old", fs / "run"), LoopStorage)


def test_choose_storage_picks_loop_without_project_quota(tmp_path: Path) -> None:
    scratch = _scratch() or tmp_path
    if projquota.probe(scratch).ok:
        pytest.skip(f"{scratch} has project quota on this host")
    base = Path(tempfile.mkdtemp(prefix="rexecd-choose-", dir=scratch))
    try:
        assert isinstance(choose_storage(base / "state", base / "run"), LoopStorage)
        with pytest.raises(RuntimeFailure, match=r"storage.method is project, but .* on "):
            choose_storage(base / "state", base / "run", "project")
        with pytest.raises(RuntimeFailure, match="project quota"):
            ProjectQuotaStorage(base / "state")
        assert not (base / "state").exists()  # refusing made nothing
    finally:
        shutil.rmtree(base)


# -- the limit of project quota ---------------------------------------------------------


def test_a_file_owner_can_leave_the_project_unless_in_a_user_namespace(
    storage: ProjectQuotaStorage,
) -> None:
    """Documents what the runtime has to close: in the initial user namespace the kernel
    lets a file's owner set its project id (FS_IOC_FSSETXATTR), which takes the file out
    of the volume's quota; in a user namespace it refuses any change of project."""
    vol = storage.ensure(USER, "web", 16, (1000, 1000))
    # The child gets the open file, as a container gets its files through its mounts
    # (STATE/volumes/<user> is 0700: uid 1000 could not walk the path).
    script = (
        "import fcntl, os, struct, sys\n"
        "fd = int(sys.argv[1])\n"
        "raw = bytearray(fcntl.ioctl(fd, 0x801C581F, bytes(28)))\n"
        "struct.pack_into('=I', raw, 12, 0)\n"
        "try:\n"
        "    fcntl.ioctl(fd, 0x401C5820, bytes(raw))\n"
        "except OSError as exc:\n"
        "    sys.exit(f'refused {exc.errno}')\n"
        "for _ in range(32):\n"
        "    os.write(fd, b'x' * (1 << 20))\n"
        "os.fsync(fd)\n"
        "print('moved and wrote 32 MiB')\n"
    )

    def run(argv: list[str], path: Path, owner: int) -> subprocess.CompletedProcess[str]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.fchown(fd, owner, owner)
            return subprocess.run(
                [*argv, sys.executable, "-c", script, str(fd)],
                pass_fds=(fd,),
                capture_output=True,
                text=True,
            )
        finally:
            os.close(fd)

    as_user = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
    out = run(as_user, vol.home / "escape", 1000)
    assert out.stdout.strip() == "moved and wrote 32 MiB", out.stderr
    assert projid(vol.home / "escape") == 0
    (vol.home / "escape").unlink()

    # Root in a user namespace owns the file (uid 0 is mapped) and still may not.
    out = run(["unshare", "--user", "--map-root-user"], vol.upper / "escape", 0)
    assert out.stderr.strip() == f"refused {errno.EINVAL}", out.stdout + out.stderr
