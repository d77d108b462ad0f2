"""Unit tests of the binary and text formats the storage modules exchange with the kernel:
struct loop_config, the ext4 superblock, sysfs loop attributes, /proc status caps."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from rexecd.runtime.storage import ext4, loopdev


def test_loop_config_layout() -> None:
    raw = loopdev.loop_config(7, "/var/lib/rexecd/volumes/u/web.img")
    assert len(raw) == 304  # sizeof(struct loop_config) in linux/loop.h
    fd, block_size = struct.unpack_from("=II", raw, 0)
    assert (fd, block_size) == (7, 0)
    info = 8  # struct loop_info64 follows fd and block_size
    (flags,) = struct.unpack_from("=I", raw, info + 52)
    assert flags == loopdev.LO_FLAGS_AUTOCLEAR
    name = raw[info + 56 : info + 56 + 64]
    assert name.rstrip(b"\0") == b"/var/lib/rexecd/volumes/u/web.img"
    assert raw[info + 232 :] == bytes(64)  # __reserved


def test_loop_config_truncates_long_names_keeping_a_nul() -> None:
    raw = loopdev.loop_config(3, "/" + "x" * 200)
    name = raw[8 + 56 : 8 + 56 + 64]
    assert name[-1] == 0
    assert name[:63] == b"/" + b"x" * 62


def fake_sysfs(tmp_path: Path, bound: dict[str, str]) -> Path:
    block = tmp_path / "block"
    for name in ("loop0", "loop1", "loop2", "vda"):
        (block / name).mkdir(parents=True)
    for name, backing in bound.items():
        (block / name / "loop").mkdir()
        (block / name / "loop" / "backing_file").write_text(backing + "\n")
    return block


def test_devices_backing(tmp_path: Path) -> None:
    img = "/state/volumes/u/web.img"
    block = fake_sysfs(tmp_path, {"loop0": "/other.img", "loop1": img, "loop2": img + " (deleted)"})
    assert loopdev.devices_backing(Path(img), block) == ["loop1"]
    assert loopdev.devices_backing(Path("/nothing.img"), block) == []


def test_device_of(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "7:5" / "loop").mkdir(parents=True)
    (dev / "7:5" / "uevent").write_text("MAJOR=7\nMINOR=5\nDEVNAME=loop5\nDEVTYPE=disk\n")
    (dev / "7:5" / "loop" / "backing_file").write_text("/state/volumes/u/web.img\n")
    assert loopdev.device_of(os.makedev(7, 5), dev) == ("/dev/loop5", "/state/volumes/u/web.img")
    (dev / "7:6").mkdir()
    (dev / "7:6" / "uevent").write_text("MAJOR=7\nMINOR=6\nDEVNAME=loop6\n")
    assert loopdev.device_of(os.makedev(7, 6), dev) == ("/dev/loop6", None)
    with pytest.raises(OSError, match="not a loop device"):
        loopdev.device_of(os.makedev(254, 0), dev)


def superblock(blocks: int, log_size: int, incompat: int = 0, hi: int = 0) -> bytes:
    raw = bytearray(1024)
    struct.pack_into("<I", raw, 0x04, blocks)
    struct.pack_into("<I", raw, 0x18, log_size)
    struct.pack_into("<H", raw, 0x38, ext4.EXT4_MAGIC)
    struct.pack_into("<I", raw, 0x60, incompat)
    struct.pack_into("<I", raw, 0x150, hi)
    return bytes(raw)


def test_superblock_32bit_ignores_the_high_word() -> None:
    assert ext4.parse_superblock(superblock(16384, 2, hi=9)) == (16384, 4096)


def test_superblock_64bit_adds_the_high_word() -> None:
    blocks, size = ext4.parse_superblock(superblock(5, 2, incompat=0x80, hi=1))
    assert (blocks, size) == ((1 << 32) + 5, 4096)


def test_superblock_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="magic"):
        ext4.parse_superblock(bytes(1024))
    with pytest.raises(ValueError, match="short"):
        ext4.parse_superblock(b"\x53\xef")


def test_has_capability() -> None:
    status = "Name:\tpython\nCapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n"
    assert not ext4.has_capability(status, ext4.CAP_SYS_RESOURCE)
    assert ext4.has_capability(status, 21)  # CAP_SYS_ADMIN
    assert not ext4.has_capability("Name:\tx\n", 0)


def test_mkfs_keeps_the_journal_and_reserves_nothing() -> None:
    args = " ".join(ext4.MKFS_ARGS)
    assert "has_journal" not in args
    assert "-m 0" in args
    assert "-b 4096" in args
