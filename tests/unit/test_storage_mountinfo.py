"""Unit tests of /proc/self/mountinfo parsing, on sample text."""

from __future__ import annotations

from pathlib import Path

from rexecd.runtime.storage import mountinfo
from rexecd.runtime.storage.volume import Layout

SAMPLE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
46 27 7:3 / /run/rx/volumes/u1/web rw,nosuid,nodev shared:20 - ext4 /dev/loop3 rw,errors=remount-ro
47 27 7:4 / /run/rx/volumes/u1/my\\040box rw,nosuid,nodev - ext4 /dev/loop4 rw
48 46 7:3 /home /srv/bind rw,relatime master:20 propagate_from:1 - ext4 /dev/loop3 rw
49 27 0:55 / /run/rx/other rw - tmpfs tmpfs rw,size=1024k
50 27 0:56 / /with\\011tab\\012nl\\134back rw - tmpfs none\\040x rw
51 27 0:57 / /no/super rw - tmpfs tmpfs
garbage line
52 27 x:y / /bad rw - tmpfs tmpfs rw
53 27 0:58 / /no/separator rw tmpfs tmpfs rw
"""


def test_parse_fields() -> None:
    mounts = mountinfo.parse(SAMPLE)
    web = next(m for m in mounts if m.mount_id == 46)
    assert web.parent_id == 27
    assert (web.major, web.minor) == (7, 3)
    assert web.root == "/"
    assert web.mountpoint == Path("/run/rx/volumes/u1/web")
    assert web.options == "rw,nosuid,nodev"
    assert web.fstype == "ext4"
    assert web.source == "/dev/loop3"
    assert web.super_options == "rw,errors=remount-ro"


def test_optional_fields_of_any_number() -> None:
    bind = next(m for m in mountinfo.parse(SAMPLE) if m.mount_id == 48)
    assert bind.root == "/home"
    assert bind.mountpoint == Path("/srv/bind")
    assert bind.fstype == "ext4"
    assert bind.source == "/dev/loop3"


def test_octal_escapes() -> None:
    mounts = {m.mount_id: m for m in mountinfo.parse(SAMPLE)}
    assert mounts[47].mountpoint == Path("/run/rx/volumes/u1/my box")
    assert mounts[50].mountpoint == Path("/with\ttab\nnl\\back")
    assert mounts[50].source == "none x"


def test_missing_super_options_and_malformed_lines() -> None:
    mounts = {m.mount_id: m for m in mountinfo.parse(SAMPLE)}
    assert mounts[51].super_options == ""
    assert 52 not in mounts
    assert 53 not in mounts
    assert sorted(mounts) == [22, 27, 46, 47, 48, 49, 50, 51]


def test_volume_keys_from_sample() -> None:
    lay = Layout(Path("/var/lib/rexecd"), Path("/run/rx"))
    keys = [lay.key_of(m.mountpoint) for m in mountinfo.parse(SAMPLE)]
    # "my box" is no valid name, a bind elsewhere and /run/rx/other are not ours.
    assert [k for k in keys if k] == [("u1", "web")]


def test_read_real_mountinfo() -> None:
    mounts = mountinfo.read()
    assert any(m.mountpoint == Path("/") for m in mounts)
