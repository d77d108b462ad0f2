"""The layer unpacker on its own: entry kinds, metadata, replacement rules and the
refusals that need no privilege. Whiteouts, owners and trusted xattrs need root and are
skipped otherwise (the integration battery covers them as root)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from rexecd.config import UnpackLimits
from rexecd.errors import ImageError, ImageTooLarge
from rexecd.runtime.images.limits import Budget
from rexecd.runtime.images.unpack import OPAQUE_XATTR, UnpackStats, unpack_layer
from tests.unit.fakes.images import MTIME, dev, dir_, fifo, hard, layer, reg, sym

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: mknod of whiteouts, trusted.* xattrs, chown"
)


def unpack(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    dest = tmp_path / "layer"
    dest.mkdir()
    unpack_layer(io.BytesIO(layer(*members)), dest, "test layer")
    return dest


def refused(tmp_path: Path, member: str, *members: tuple[tarfile.TarInfo, bytes | None]) -> str:
    dest = tmp_path / "layer"
    dest.mkdir(exist_ok=True)
    with pytest.raises(ImageError) as e:
        unpack_layer(io.BytesIO(layer(*members)), dest, "test layer")
    assert f"member {member!r}" in e.value.message
    assert e.value.extra["member"] == member
    return e.value.message


def test_entry_kinds(tmp_path: Path) -> None:
    d = unpack(
        tmp_path,
        dir_("usr"),
        dir_("usr/bin"),
        reg("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
        sym("usr/bin/abs", "/usr/bin/tool"),
        sym("usr/bin/rel", "tool"),
        sym("dangling", "/nowhere/at/all"),
        hard("usr/bin/tool2", "usr/bin/tool"),
        fifo("run.fifo", mode=0o620),
    )
    assert (d / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert os.readlink(d / "usr/bin/abs") == "/usr/bin/tool"  # verbatim, not resolved
    assert os.readlink(d / "usr/bin/rel") == "tool"
    assert os.readlink(d / "dangling") == "/nowhere/at/all"
    assert (d / "usr/bin/tool2").stat().st_ino == (d / "usr/bin/tool").stat().st_ino
    st = (d / "run.fifo").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_modes_and_times(tmp_path: Path) -> None:
    d = unpack(
        tmp_path,
        dir_("ro", mode=0o555, mtime=1000),
        reg("ro/file", b"x", mode=0o400, mtime=2000),
        dir_("sticky", mode=0o1777),
        reg("suid", b"x", mode=0o4755),
        reg("sgid", b"x", mode=0o2755),
        sym("link", "file", mtime=3000),
        reg("frac", b"", pax={"mtime": "1234.5"}),
    )
    assert stat.S_IMODE((d / "ro").stat().st_mode) == 0o555
    # Directory mtimes survive the creation of their children.
    assert (d / "ro").stat().st_mtime == 1000
    assert stat.S_IMODE((d / "ro/file").stat().st_mode) == 0o400
    assert (d / "ro/file").stat().st_mtime == 2000
    assert stat.S_IMODE((d / "sticky").stat().st_mode) == 0o1777
    assert stat.S_IMODE((d / "suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((d / "sgid").stat().st_mode) == 0o2755
    assert (d / "link").lstat().st_mtime == 3000
    assert (d / "frac").stat().st_mtime_ns == 1234_500_000_000
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    os.chmod(d / "ro", 0o755)  # let tmp_path cleanup in


def test_implicit_parents_ignore_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        d = unpack(tmp_path, reg("a/b/c/file", b"x"))
    finally:
        os.umask(old)
    for p in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE((d / p).stat().st_mode) == 0o755


def test_root_entry_sets_layer_root(tmp_path: Path) -> None:
    d = unpack(tmp_path, dir_("./", mode=0o750, mtime=5000), reg("./f", b"x"))
    assert stat.S_IMODE(d.stat().st_mode) == 0o750 and d.stat().st_mtime == 5000
    assert (d / "f").exists()


def test_absolute_and_dot_names_land_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside-abs"
    d = unpack(tmp_path, reg(f"{outside}/f", b"x"), reg("./././g", b"y"), reg("//h", b"z"))
    assert not outside.exists()
    assert (d / str(outside).lstrip("/") / "f").read_bytes() == b"x"
    assert (d / "g").exists() and (d / "h").exists()


def test_later_member_wins(tmp_path: Path) -> None:
    d = unpack(
        tmp_path,
        reg("f", b"one"),
        reg("f", b"two"),
        dir_("d", mode=0o700),
        reg("d/keep", b"k"),
        dir_("d", mode=0o755),  # a directory over a directory merges
        dir_("gone"),
        reg("gone/x", b"x"),
        sym("gone", "d"),  # a symlink over a directory replaces it
        sym("s", "f"),
        reg("s", b"file now"),  # a file over a symlink does not write through it
        reg("h", b"h"),
        hard("h2", "h"),
        reg("h2", b"separate"),
    )
    assert (d / "f").read_bytes() == b"two"
    assert (d / "d/keep").exists() and stat.S_IMODE((d / "d").stat().st_mode) == 0o755
    assert os.readlink(d / "gone") == "d"
    assert not (d / "s").is_symlink() and (d / "s").read_bytes() == b"file now"
    assert (d / "f").read_bytes() == b"two"
    assert (d / "h").read_bytes() == b"h" and (d / "h2").read_bytes() == b"separate"


def test_devices_are_skipped(tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    dest.mkdir()
    members = [
        dir_("dev"),
        reg("dev/null", b"placeholder"),
        dev("dev/null"),
        dev("dev/sda", block=True, major=8, minor=0),
        hard("dev/null2", "dev/null"),
        reg("after", b"ok"),
    ]
    stats = unpack_layer(io.BytesIO(layer(*members)), dest, "test layer")
    assert isinstance(stats, UnpackStats)
    assert stats.skipped == ["dev/null", "dev/sda", "dev/null2"]
    assert os.listdir(dest / "dev") == []  # the placeholder was replaced by nothing
    assert (dest / "after").exists()


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../escape", "a/..", "..", "ok/../ok", "/../../escape"]
)
def test_dotdot_is_refused(tmp_path: Path, name: str) -> None:
    msg = refused(tmp_path, name, reg("ok/file", b"fine"), reg(name, b"bad"))
    assert "'..'" in msg
    assert not (tmp_path / "escape").exists()


def test_write_through_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    refused(tmp_path, "a/x", sym("a", str(outside)), reg("a/x", b"pwned"))
    assert os.listdir(outside) == []


def test_write_through_inner_symlink_is_refused(tmp_path: Path) -> None:
    # Even a symlink that stays inside is not followed while unpacking.
    msg = refused(tmp_path, "b/x", dir_("a"), sym("b", "a"), reg("b/x", b"x"))
    assert "symlink" in msg


@pytest.mark.parametrize(
    ("members", "bad", "reason"),
    [
        ([hard("h", "/etc/passwd")], "h", "not in this layer"),
        ([hard("h", "../../etc/passwd")], "h", "'..'"),
        ([sym("s", "/etc"), hard("h", "s/passwd")], "h", "symlink"),
        ([dir_("d"), hard("h", "d")], "h", "directory"),
        ([hard("h", "")], "h", "layer root"),
        ([hard("h", "later")], "h", "not in this layer"),
    ],
)
def test_hardlinks_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], bad: str, reason: str
) -> None:
    assert reason in refused(tmp_path, bad, *members, reg("later", b"x"))


def test_hardlink_to_symlink_links_the_symlink(tmp_path: Path) -> None:
    d = unpack(tmp_path, sym("s", "/etc/passwd"), hard("h", "s"))
    assert os.readlink(d / "h") == "/etc/passwd"
    assert (d / "h").lstat().st_ino == (d / "s").lstat().st_ino


@pytest.mark.parametrize(
    ("members", "bad"),
    [
        ([reg("./", b"x")], "./"),
        ([reg("a" * 256, b"x")], "a" * 256),
        ([reg("/".join(["d"] * 2100), b"x")], "/".join(["d"] * 2100)),
        ([sym("e", "")], "e"),
        ([reg("f", b""), reg("f/x", b"")], "f/x"),
        ([reg(".wh.", b"")], ".wh."),
        ([reg(".wh..", b"")], ".wh.."),
    ],
)
def test_other_refusals(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], bad: str
) -> None:
    refused(tmp_path, bad, *members)


def test_xattrs_from_pax(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        pytest.skip("filesystem of tmp_path has no user xattrs")
    pax = {
        "SCHILY.xattr.user.note": "hello",
        "SCHILY.xattr.trusted.overlay.redirect": "/elsewhere",
        "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0",
    }
    d = unpack(tmp_path, reg("f", b"x", pax=pax), dir_("d", pax={"SCHILY.xattr.user.d": "v"}))
    assert os.getxattr(d / "f", "user.note") == b"hello"
    assert os.getxattr(d / "d", "user.d") == b"v"
    names = os.listxattr(d / "f")
    assert "trusted.overlay.redirect" not in names and "security.selinux" not in names


def test_corrupt_and_empty_tars(tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    dest.mkdir()
    data = layer(reg("big", b"x" * 5000))
    with pytest.raises(ImageError, match="corrupt tar at member 'big'"):
        unpack_layer(io.BytesIO(data[:2048]), dest, "test layer")
    with pytest.raises(ImageError, match="corrupt tar"):
        unpack_layer(io.BytesIO(b""), tmp_path, "test layer")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert unpack_layer(io.BytesIO(layer()), empty, "test layer").entries == 0


def test_many_directories_exceed_fd_cache(tmp_path: Path) -> None:
    members = []
    for i in range(300):
        members += [dir_(f"d{i}"), reg(f"d{i}/f", b"x")]
    members += [reg(f"d{i}/g", b"y") for i in range(300)]  # revisit after eviction
    d = unpack(tmp_path, *members)
    assert all((d / f"d{i}/g").exists() for i in range(300))
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) < 64  # nothing leaked


@needs_root
def test_whiteouts(tmp_path: Path) -> None:
    d = unpack(
        tmp_path,
        dir_("etc"),
        reg("etc/.wh.gone", b""),
        dir_("opq"),
        reg("opq/.wh..wh..opq", b""),
        reg("opq/new", b"n"),
        reg("deep/er/.wh.x", b""),
        reg(".wh..wh.plnk", b""),
        reg(".wh.both", b""),
        dir_("both"),  # this layer's own dir over its own whiteout: opaque
        dir_("mine"),
        reg(".wh.mine", b""),  # whiteout after this layer's own dir: opaque too
    )
    st = (d / "etc/gone").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(d / "opq", OPAQUE_XATTR) == b"y"
    assert (d / "opq/new").exists() and not (d / "opq/.wh..wh..opq").exists()
    assert stat.S_ISCHR((d / "deep/er/x").lstat().st_mode)
    assert not (d / ".wh..wh.plnk").exists() and not (d / "plnk").exists()
    assert os.getxattr(d / "both", OPAQUE_XATTR) == b"y"
    assert os.getxattr(d / "mine", OPAQUE_XATTR) == b"y"


@needs_root
def test_owners_and_capabilities(tmp_path: Path) -> None:
    # security.capability v2 for cap_net_raw+ep, as setcap writes it.
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    pax = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")}
    d = unpack(
        tmp_path,
        dir_("home/user", uid=1000, gid=1000, mode=0o2750),
        reg("ping", b"\x7fELF", mode=0o4755, uid=0, gid=0, pax=pax),
        reg("home/user/f", b"x", uid=1000, gid=100, mode=0o6755),
        sym("home/user/l", "f", uid=1000, gid=1000),
        fifo("home/user/p", uid=1000, gid=1000, mode=0o640),
    )
    st = (d / "home/user").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o2750)
    st = (d / "home/user/f").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 100, 0o6755)
    assert (d / "home/user/l").lstat().st_uid == 1000
    st = (d / "home/user/p").lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o640)
    assert os.getxattr(d / "ping", "security.capability") == cap
    assert stat.S_IMODE((d / "ping").stat().st_mode) == 0o4755
    assert (d / "ping").stat().st_mtime == MTIME


# --- images.unpack limits (limits.py): entries, depth, name length, header size --------


def _budget(**limits: int) -> Budget:
    return Budget(UnpackLimits.model_validate(limits))


def too_large(
    tmp_path: Path, budget: Budget, *members: tuple[tarfile.TarInfo, bytes | None]
) -> str:
    dest = tmp_path / "layer"
    dest.mkdir(exist_ok=True)
    with pytest.raises(ImageTooLarge) as e:
        unpack_layer(io.BytesIO(layer(*members)), dest, "test layer", budget)
    assert e.value.code == "image_too_large" and e.value.status == 400
    assert "test layer" in e.value.message
    return str(e.value.extra["limit"])


def test_too_many_entries_are_refused_at_the_limit(tmp_path: Path) -> None:
    budget = _budget(max_entries=20)
    members = [reg(f"f{i}") for i in range(50)]
    assert too_large(tmp_path, budget, *members) == "max_entries"
    # Stopped at the limit, not after the layer: the 21st member was never created.
    assert len(list((tmp_path / "layer").iterdir())) == 20
    assert budget.entries == 21


def test_parent_directories_a_member_implies_are_entries_too(tmp_path: Path) -> None:
    # One member, 30 directories: counting members alone would let a tar of a few KB
    # make millions of inodes.
    deep = "/".join(f"d{i}" for i in range(30)) + "/f"
    assert too_large(tmp_path, _budget(max_entries=10), reg(deep)) == "max_entries"


def test_the_entries_budget_is_shared_by_the_layers_of_an_image(tmp_path: Path) -> None:
    budget = _budget(max_entries=15)
    first = tmp_path / "first"
    first.mkdir()
    unpack_layer(io.BytesIO(layer(*(reg(f"f{i}") for i in range(10)))), first, "one", budget)
    members = [reg(f"g{i}") for i in range(10)]
    assert too_large(tmp_path, budget, *members) == "max_entries"


def test_names_deeper_or_longer_than_allowed_are_refused(tmp_path: Path) -> None:
    budget = _budget(max_path_depth=4, max_path_bytes=64)
    assert too_large(tmp_path, budget, reg("a/b/c/d/e")) == "max_path_depth"
    assert too_large(tmp_path, budget, reg("x" * 65)) == "max_path_bytes"
    # A hardlink's target is a name too.
    assert too_large(tmp_path, budget, reg("f"), hard("g", "f/" * 40 + "f")) == "max_path_bytes"
    unpack_layer(io.BytesIO(layer(reg("a/b/c/d"), reg("y" * 64))), tmp_path / "layer", "ok", budget)
    assert (tmp_path / "layer/a/b/c/d").is_file()


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # tarfile would read the whole extended header into memory: a few KB of gzip can
    # claim gigabytes there. 2 MiB here, past the 1 MiB MAX_HEADER.
    value = "v" * (2 << 20)
    member = reg("f", b"x", pax={"SCHILY.xattr.user.big": value})
    assert too_large(tmp_path, _budget(), member) == "header"
    assert not (tmp_path / "layer/f").exists()
