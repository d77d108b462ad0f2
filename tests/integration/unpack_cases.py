"""Malicious layer cases and their check, shared by test_unpack_malicious and the CVE
regression tests: each case is a layer whose import must be refused naming a member,
or land with nothing outside the store changed."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rexecd.errors import ImageError
from rexecd.runtime.images import ImageStore
from rexecd.runtime.images.unpack import OPAQUE_XATTR
from tests.unit.fakes.images import dev, dir_, fifo, hard, layer, oci_archive, reg, sym

Member = tuple[tarfile.TarInfo, bytes | None]
# From a layer root (STORE/tmp/<x>/ while unpacking, STORE/layers/<hex>/ after), four
# levels up is the test's tmp_path, where the sentinel lives.
UP = "../../../.."


@dataclass
class Case:
    id: str
    members: Callable[[Path], list[Member]]
    refused: str | None = None  # the member named in the ImageError
    check: Callable[[Path, Path], None] | None = None  # (layer dir, sentinel)


def _absent(*rels: str) -> Callable[[Path, Path], None]:
    def check(d: Path, _s: Path) -> None:
        for r in rels:
            assert not os.path.lexists(d / r), r

    return check


def _abs_lands_inside(d: Path, s: Path) -> None:
    assert (d / str(s).lstrip("/") / "pwned").read_bytes() == b"inside"
    wh = (d / str(s).lstrip("/") / "victim").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0


def _replaced_symlink(d: Path, _s: Path) -> None:
    assert not (d / "v").is_symlink() and (d / "v").read_bytes() == b"overwrite"
    assert (d / "d").is_dir() and not (d / "d").is_symlink()


def _loops_stored(d: Path, _s: Path) -> None:
    assert os.readlink(d / "l1") == "l2" and os.readlink(d / "self") == "self"
    assert os.readlink(d / "up") == f"{UP}/sentinel"
    assert os.readlink(d / "abs") == "/etc/shadow"


def _long_ok(d: Path, _s: Path) -> None:
    assert (d / "/".join(["x" * 200] * 15)).read_bytes() == b"deep"


def _no_trusted(d: Path, _s: Path) -> None:
    for p in (d / "f", d / "dir"):
        assert not [x for x in os.listxattr(p, follow_symlinks=False) if x.startswith("trusted.")]


CASES = [
    Case("dotdot", lambda s: [reg(f"{UP}/sentinel/pwned", b"x")], f"{UP}/sentinel/pwned"),
    Case(
        "dotdot-inside-name",
        lambda s: [dir_("a"), reg(f"a/../{UP}/sentinel/pwned", b"x")],
        f"a/../{UP}/sentinel/pwned",
    ),
    Case("dotdot-leading-slash", lambda s: [reg("/../pwned", b"x")], "/../pwned"),
    Case(
        "absolute-names-land-inside",
        lambda s: [reg(f"{s}/pwned", b"inside"), reg(f"{s}/.wh.victim", b"")],
        check=_abs_lands_inside,
    ),
    Case("symlink-abs-then-write", lambda s: [sym("a", str(s)), reg("a/pwned", b"x")], "a/pwned"),
    Case("symlink-dotdot-then-write", lambda s: [sym("a", "../.."), reg("a/x", b"x")], "a/x"),
    Case(
        "symlink-rel-then-write",
        lambda s: [sym("a", f"{UP}/sentinel"), reg("a/pwned", b"x")],
        "a/pwned",
    ),
    Case("symlink-then-mkdir", lambda s: [sym("a", str(s)), dir_("a/sub")], "a/sub"),
    Case("symlink-then-symlink", lambda s: [sym("a", str(s)), sym("a/evil", "/")], "a/evil"),
    Case("symlink-then-fifo", lambda s: [sym("a", str(s)), fifo("a/p")], "a/p"),
    Case(
        "symlink-then-hardlink-beneath",
        lambda s: [reg("x", b"x"), sym("a", str(s)), hard("a/x2", "x")],
        "a/x2",
    ),
    Case(
        "symlink-in-middle-of-path",
        lambda s: [dir_("d"), sym("d/l", str(s)), reg("d/l/deeper/pwned", b"x")],
        "d/l/deeper/pwned",
    ),
    Case("hardlink-etc-passwd", lambda s: [hard("h", "/etc/passwd")], "h"),
    Case("hardlink-dotdot", lambda s: [hard("h", "../../x")], "h"),
    Case("hardlink-sentinel-abs", lambda s: [hard("h", f"{s}/victim")], "h"),
    Case(
        "hardlink-through-symlink",
        lambda s: [sym("s", str(s)), hard("h", "s/victim")],
        "h",
    ),
    Case(
        "hardlink-through-symlink-rel",
        lambda s: [sym("s", f"{UP}/sentinel"), hard("h", "s/victim")],
        "h",
    ),
    Case(
        "whiteout-through-symlink",
        lambda s: [sym("s", str(s)), reg("s/.wh.victim", b"")],
        "s/.wh.victim",
    ),
    Case(
        "opaque-through-symlink",
        lambda s: [sym("s", str(s)), reg("s/.wh..wh..opq", b"")],
        "s/.wh..wh..opq",
    ),
    Case(
        "dir-replaced-by-symlink-then-write",
        lambda s: [dir_("d"), reg("d/f", b"f"), sym("d", str(s)), reg("d/pwned", b"x")],
        "d/pwned",
    ),
    Case(
        "dir-replaced-by-symlink-then-whiteout",
        lambda s: [dir_("d"), reg("d/f", b"f"), sym("d", str(s)), reg("d/.wh.victim", b"")],
        "d/.wh.victim",
    ),
    Case(
        "devices-are-skipped",
        lambda s: [
            dir_("dev"),
            dev("dev/mem", major=1, minor=1),
            dev("dev/sda", block=True, major=8, minor=0),
            dev("dev/kmsg", major=1, minor=11),
            hard("dev/mem2", "dev/mem"),
        ],
        check=_absent("dev/mem", "dev/sda", "dev/kmsg", "dev/mem2"),
    ),
    Case(
        "symlink-loop-then-write", lambda s: [sym("a", "b"), sym("b", "a"), reg("a/x", b"")], "a/x"
    ),
    Case(
        "symlink-loops-are-just-stored",
        lambda s: [
            sym("l1", "l2"),
            sym("l2", "l1"),
            sym("self", "self"),
            sym("up", f"{UP}/sentinel"),
            sym("abs", "/etc/shadow"),
        ],
        check=_loops_stored,
    ),
    Case(
        "replacing-symlinks-never-writes-through",
        lambda s: [
            sym("v", f"{s}/victim"),
            reg("v", b"overwrite"),
            sym("d", str(s)),
            dir_("d", mode=0o777),
        ],
        check=_replaced_symlink,
    ),
    Case("name-component-too-long", lambda s: [reg("n" * 300, b"")], "n" * 300),
    Case("path-too-long", lambda s: [reg("/".join(["d"] * 2100), b"")], "/".join(["d"] * 2100)),
    Case("long-but-legal", lambda s: [reg("/".join(["x" * 200] * 15), b"deep")], check=_long_ok),
    Case(
        "trusted-xattrs-dropped",
        lambda s: [
            reg("f", b"", pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc"}),
            dir_("dir", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        ],
        check=_no_trusted,
    ),
]


def _snapshot(root: Path) -> dict[str, Any]:
    """Everything observable about a tree: types, owners, modes, times, links, data, xattrs."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            p = Path(dirpath, name) if name else Path(dirpath)
            st = p.lstat()
            entry: list[Any] = [
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                st.st_rdev,
                sorted(os.listxattr(p, follow_symlinks=False)),
            ]
            if stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                entry.append(hashlib.sha256(p.read_bytes()).hexdigest())
            out[str(p.relative_to(root))] = entry
    return out


def _host_state() -> dict[str, Any]:
    st = os.stat("/etc/passwd")
    return {
        "passwd": (st.st_nlink, st.st_mtime_ns, st.st_size),
        "root": sorted(os.listdir("/")),
    }


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    s = tmp_path / "sentinel"
    (s / "sub").mkdir(parents=True)
    (s / "victim").write_text("precious\n")
    (s / "sub/deep").write_text("also precious\n")
    os.symlink("victim", s / "link")
    return s


def check_layer(tmp_path: Path, sentinel: Path, case: Case) -> None:
    """Import ``case`` as a layer through the whole store and prove that nothing outside
    the store changed and that the layer holds what the case says, or that the import
    was refused naming the member with nothing left behind."""
    store = ImageStore(tmp_path / "state" / "images", durable=False)
    archive = tmp_path / "evil.tar"
    archive.write_bytes(oci_archive([layer(*case.members(sentinel))], ref="evil:1"))
    beside = sorted(os.listdir(tmp_path))
    before, host = _snapshot(sentinel), _host_state()

    if case.refused is not None:
        with pytest.raises(ImageError) as e:
            store.import_archive(archive)
        assert f"member {case.refused!r}" in e.value.message
        assert os.listdir(store.layers_dir) == [] and os.listdir(store.tmp_dir) == []
        assert store.list() == []
    else:
        rec = store.import_archive(archive)
        (layer_dir,) = store.layer_paths(rec)
        assert case.check is not None
        case.check(layer_dir, sentinel)

    assert _snapshot(sentinel) == before
    assert sorted(os.listdir(tmp_path)) == beside
    assert _host_state() == host
    assert OPAQUE_XATTR not in os.listxattr(sentinel)
