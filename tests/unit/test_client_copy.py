"""``rexec cp`` unpacking a tar that came out of a container: a hostile tenant shapes
it, so nothing in it may land outside the destination on the client host."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from rexecd.client.copy import _unpack, parse_endpoint


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def unpack(data: bytes, dest: Path, first: str | None = None) -> None:
    r, w = os.pipe()
    assert len(data) < 65536  # fits in the pipe, so no writer thread is needed
    os.write(w, data)
    os.close(w)
    _unpack(r, str(dest), first)


def around(tmp_path: Path) -> tuple[Path, Path]:
    dest = tmp_path / "dest"
    dest.mkdir()
    return dest, tmp_path


@pytest.mark.parametrize(
    "members",
    [
        [_file("../escaped")],
        [_link("box", "..", tarfile.SYMTYPE), _file("box/escaped")],
        [_link("abs", "/etc")],
        [_link("hard", "../escaped", tarfile.LNKTYPE)],
    ],
    ids=["dotdot", "through-symlink", "absolute-symlink", "hardlink-out"],
)
def test_nothing_lands_outside_the_destination(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    dest, outside = around(tmp_path)
    (outside / "escaped").write_text("host file")
    with pytest.raises((tarfile.TarError, OSError)):
        unpack(_tar(*members), dest)
    assert (outside / "escaped").read_text() == "host file"
    assert sorted(p.name for p in outside.iterdir()) == ["dest", "escaped"]


def test_absolute_names_land_inside(tmp_path: Path) -> None:
    dest, outside = around(tmp_path)
    (outside / "escaped").write_text("host file")
    unpack(_tar(_file(str(outside / "escaped"), b"evil")), dest)
    assert (outside / "escaped").read_text() == "host file"
    assert (dest / str(outside / "escaped").lstrip("/")).read_bytes() == b"evil"


def test_device_nodes_and_fifos_are_refused(tmp_path: Path) -> None:
    dest, _ = around(tmp_path)
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        info = tarfile.TarInfo(f"node{kind!r}")
        info.type, info.devmajor, info.devminor = kind, 1, 3
        with pytest.raises(tarfile.TarError):
            unpack(_tar((info, None)), dest)
    assert list(dest.iterdir()) == []


def test_modes_kept_but_not_setuid(tmp_path: Path) -> None:
    dest, _ = around(tmp_path)
    unpack(
        _tar(
            _file("top/plain", b"a", 0o640),
            _file("top/shared", b"b", 0o666),
            _file("top/suid", b"c", 0o4755),
            _link("top/rel", "plain"),
        ),
        dest,
        first="renamed",
    )
    top = dest / "renamed"
    assert stat.S_IMODE((top / "plain").stat().st_mode) == 0o640
    assert stat.S_IMODE((top / "shared").stat().st_mode) == 0o666
    assert stat.S_IMODE((top / "suid").stat().st_mode) == 0o755
    assert os.readlink(top / "rel") == "plain"
    assert (top / "shared").read_bytes() == b"b"


def test_endpoints() -> None:
    assert parse_endpoint("box:/tmp/x") == parse_endpoint("box:/tmp/x")
    assert parse_endpoint("box:/tmp/x").container == "box"
    assert parse_endpoint("./a:b").container is None
    assert parse_endpoint("/abs:x").container is None
    assert parse_endpoint("box:").path == "."
