"""Unit tests of the pure parts of project-quota storage: the kernel structures, the
probe's reading of /proc/self/mountinfo, and the choice ``choose_storage`` makes (with the
kernel-facing parts replaced)."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from rexecd.config import Config, ConfigError, load_config
from rexecd.errors import RuntimeFailure
from rexecd.runtime import storage as storage_pkg
from rexecd.runtime.storage import LoopStorage, choose_storage, kinds_in_use, mountinfo
from rexecd.runtime.storage import projquota as pq


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    # linux/ioctl.h on x86, arm and most others: dir(2) size(14) type(8) nr(8).
    return direction << 30 | size << 16 | ord(kind) << 8 | nr


# -- kernel structures ------------------------------------------------------------------


def test_fsxattr_ioctls_and_layout() -> None:
    assert _ioc(2, "X", 31, 28) == pq.FS_IOC_FSGETXATTR
    assert _ioc(1, "X", 32, 28) == pq.FS_IOC_FSSETXATTR
    attr = pq.FsXattr(xflags=pq.FS_XFLAG_PROJINHERIT, extsize=1, nextents=2, projid=0x01020304)
    raw = attr.pack()
    assert len(raw) == 28
    assert struct.unpack_from("=I", raw, 12)[0] == 0x01020304  # fsx_projid
    assert raw[20:] == bytes(8)  # fsx_pad
    assert pq.FsXattr.unpack(raw) == attr


def test_if_dqblk_layout() -> None:
    dq = pq.DqBlk(bhardlimit=64 * 1024, curspace=12345, curinodes=3, valid=pq.QIF_BLIMITS)
    raw = dq.pack()
    # 72 bytes: the kernel's size on 64-bit ABIs, and a safe superset of i386's 68.
    assert len(raw) == 72
    assert struct.unpack_from("=Q", raw, 0)[0] == 64 * 1024  # dqb_bhardlimit
    assert struct.unpack_from("=Q", raw, 16)[0] == 12345  # dqb_curspace
    assert struct.unpack_from("=I", raw, 64)[0] == pq.QIF_BLIMITS  # dqb_valid
    assert pq.DqBlk.unpack(bytearray(raw)) == dq


def test_an_id_is_unused_only_without_charges_or_limits() -> None:
    assert pq.DqBlk().unused
    assert pq.DqBlk(btime=5, valid=0x3F).unused  # times and flags say nothing about use
    assert not pq.DqBlk(curinodes=1).unused  # a directory in the project
    assert not pq.DqBlk(curspace=4096).unused
    assert not pq.DqBlk(bhardlimit=1024).unused  # someone's limit on an empty project


def test_quotactl_commands() -> None:
    assert pq.qcmd(pq.Q_GETQUOTA, pq.PRJQUOTA) == 0x80000702
    assert pq.qcmd(pq.Q_SETQUOTA, pq.PRJQUOTA) == 0x80000802
    assert pq.qcmd(pq.Q_XGETQSTATV, pq.PRJQUOTA) == (ord("X") << 8 | 8) << 8 | 2


def test_quota_statv_request_and_flags() -> None:
    buf = pq.statv_request()
    assert len(buf) == 160 and buf[0] == pq.FS_QSTATV_VERSION1 and not any(buf[1:])
    struct.pack_into("=H", buf, 2, pq.FS_QUOTA_PDQ_ACCT | pq.FS_QUOTA_PDQ_ENFD)
    assert pq.statv_flags(buf) & pq.FS_QUOTA_PDQ_ENFD


# -- the probe's reading of mountinfo ---------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
30 27 259:1 / /srv rw,relatime - ext4 /dev/nvme0n1p1 rw,quota,prjquota
31 27 259:2 / /data rw,relatime - xfs /dev/nvme0n1p2 rw,attr2,inode64,logbufs=8,prjquota
32 27 259:3 / /xfs-acct rw,relatime - xfs /dev/nvme0n1p3 rw,attr2,inode64,pqnoenforce
33 27 0:40 / /var/lib/tmpfs rw - tmpfs tmpfs rw,size=1g
34 30 254:0 /home /srv/bound rw,relatime - ext4 /dev/vda rw,discard
35 27 259:4 / /with\\040space rw - ext4 /dev/sdb rw,prjquota
36 27 0:41 / /stacked rw - tmpfs tmpfs rw
37 27 259:5 / /stacked rw - ext4 /dev/sdc rw,prjquota
"""


def judge(path: str, dev: tuple[int, int]) -> pq.Support:
    mounts = mountinfo.parse(MOUNTINFO)
    return pq.judge(pq.mount_of(mounts, Path(path), dev), Path(path))


def test_ext4_and_xfs_with_enforcement_qualify() -> None:
    found = judge("/srv/rexecd", (259, 1))
    assert found.ok, found.reason
    assert "ext4 (/dev/nvme0n1p1 at /srv)" in found.reason
    assert judge("/data/rexecd", (259, 2)).ok
    assert judge("/with space/state", (259, 4)).ok


def test_without_enforcement_or_on_other_file_systems_it_says_why() -> None:
    found = judge("/var/lib/rexecd", (254, 0))
    assert not found.ok
    assert "ext4 (/dev/vda at /)" in found.reason and "prjquota" in found.reason
    found = judge("/xfs-acct/state", (259, 3))  # accounting only
    assert not found.ok and "mount -o pquota" in found.reason
    found = judge("/var/lib/tmpfs/state", (0, 40))
    assert not found.ok and "needs ext4 or xfs" in found.reason


def test_the_mount_holding_a_path_is_the_deepest_of_its_device() -> None:
    mounts = mountinfo.parse(MOUNTINFO)
    # A bind mount of the root file system inside /srv: the path is on /dev/vda.
    m = pq.mount_of(mounts, Path("/srv/bound/x"), (254, 0))
    assert m is not None and m.mount_id == 34
    assert not pq.judge(m, Path("/srv/bound/x")).ok
    # Two mounts on one point: the later one is what the path sees.
    m = pq.mount_of(mounts, Path("/stacked/state"), (259, 5))
    assert m is not None and m.mount_id == 37
    # A device no line names (btrfs subvolumes): the deepest mount above the path.
    m = pq.mount_of(mounts, Path("/srv/x"), (0, 99))
    assert m is not None and m.mount_id == 30
    # /srvx is not below /srv.
    m = pq.mount_of(mounts, Path("/srvx/state"), (0, 99))
    assert m is not None and m.mount_id == 27
    assert pq.judge(None, Path("/x")).reason.startswith("no mount")


# -- the choice -------------------------------------------------------------------------


class FakeProject:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> list[pq.Support]:
    """Replaces the probe (answering the last Support put in the list) and the project
    storage (whose real constructor probes the kernel)."""
    answers = [pq.Support(False, "/x is on tmpfs (tmpfs at /x): project quota needs ext4 or xfs")]
    monkeypatch.setattr(pq, "probe", lambda path: answers[-1])
    monkeypatch.setattr(storage_pkg, "ProjectQuotaStorage", FakeProject)
    return answers


def volumes(tmp_path: Path, *entries: str) -> Path:
    for entry in entries:
        path = tmp_path / "volumes" / "u1" / entry
        path.parent.mkdir(parents=True, exist_ok=True)
        if entry.endswith(".img"):
            path.write_bytes(b"")
        else:
            path.mkdir()
    return tmp_path


def test_auto_takes_project_quota_where_enforced(fake: list[pq.Support], tmp_path: Path) -> None:
    fake.append(pq.Support(True, "enforced"))
    assert isinstance(choose_storage(tmp_path, tmp_path / "run"), FakeProject)
    assert isinstance(choose_storage(volumes(tmp_path, "web"), tmp_path / "run"), FakeProject)


def test_auto_takes_loop_images_otherwise(fake: list[pq.Support], tmp_path: Path) -> None:
    assert isinstance(choose_storage(tmp_path, tmp_path / "run"), LoopStorage)
    assert not (tmp_path / "volumes").exists()  # choosing makes nothing


def test_auto_stays_with_the_method_the_volumes_use(
    fake: list[pq.Support], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.append(pq.Support(True, "enforced"))
    state = volumes(tmp_path, "web.img")
    with caplog.at_level(logging.WARNING):
        assert isinstance(choose_storage(state, tmp_path / "run"), LoopStorage)
    assert "holds loop images" in caplog.text
    # Project volumes on a file system that no longer enforces it: refuse, say why.
    fake.append(pq.Support(False, "/s is on ext4 (/dev/vda at /), mounted without prjquota"))
    state = volumes(tmp_path / "other", "web")
    with pytest.raises(
        RuntimeFailure, match=r"holds project-quota volumes, but .*without prjquota"
    ):
        choose_storage(state, tmp_path / "run")


def test_forced_methods(fake: list[pq.Support], tmp_path: Path) -> None:
    assert isinstance(choose_storage(tmp_path, tmp_path / "run", "loop"), LoopStorage)
    with pytest.raises(RuntimeFailure) as err:
        choose_storage(tmp_path, tmp_path / "run", "project")
    assert err.value.message == (
        "choose storage: storage.method is project, but /x is on tmpfs (tmpfs at /x): "
        "project quota needs ext4 or xfs"
    )
    fake.append(pq.Support(True, "enforced"))
    assert isinstance(choose_storage(tmp_path, tmp_path / "run", "project"), FakeProject)
    with pytest.raises(ValueError, match="unknown storage method 'zfs'"):
        choose_storage(tmp_path, tmp_path / "run", "zfs")


def test_kinds_in_use(tmp_path: Path) -> None:
    assert kinds_in_use(tmp_path / "volumes") == set()
    volumes(tmp_path, "a.img", "a.img.part", "b.part", "c.gone-12ab")
    assert kinds_in_use(tmp_path / "volumes") == {"loop"}
    volumes(tmp_path, "web")
    assert kinds_in_use(tmp_path / "volumes") == {"loop", "project"}


# -- configuration ----------------------------------------------------------------------


def test_storage_method_in_the_config(tmp_path: Path) -> None:
    # loop by default: project quota is opt-in until seccomp refuses FS_IOC_FSSETXATTR.
    assert Config().storage.method == "loop"
    assert load_config(None).storage.method == "loop"  # default.yaml spells it out
    path = tmp_path / "c.yaml"
    path.write_text("storage: {method: project}\n")
    assert load_config(path).storage.method == "project"
    path.write_text("storage: {method: zfs}\n")
    with pytest.raises(ConfigError, match=r"storage\.method"):
        load_config(path)
