"""The real test images from scripts/build-test-image, imported as root: contents, owners
and modes of the busybox layer, layer sharing, and an overlay mount of the layered image
(in a private mount namespace) showing its whiteouts applied."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rexecd.runtime.images import ImageStore
from rexecd.runtime.images.unpack import OPAQUE_XATTR

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-test-image"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path("/bin/busybox").exists():
        pytest.skip("needs /bin/busybox (Debian package busybox-static)")
    out = tmp_path_factory.mktemp("images")
    subprocess.run([sys.executable, str(BUILD), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def test_busybox_image(store: ImageStore, images: Path) -> None:
    rec = store.import_archive(images / "busybox.tar")
    assert rec.ref == "busybox:latest"
    assert rec.config.env == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert rec.config.cmd == ["sh"] and rec.config.entrypoint is None
    (d,) = store.layer_paths(rec)
    busybox = d / "bin/busybox"
    assert busybox.read_bytes() == Path("/bin/busybox").read_bytes()
    assert stat.S_IMODE(busybox.stat().st_mode) == 0o755
    assert os.readlink(d / "bin/sh") == "busybox"
    applets = subprocess.run(
        ["/bin/busybox", "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    assert {p.name for p in (d / "bin").iterdir()} == set(applets)
    assert "user:x:1000:1000:user:/home/user:/bin/sh" in (d / "etc/passwd").read_text()
    assert stat.S_IMODE((d / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((d / "root").stat().st_mode) == 0o700
    home = (d / "home/user").stat()
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    out = subprocess.run(
        ["chroot", str(d), "/bin/sh", "-c", "echo $((6 * 7))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "42\n"


def test_layered_image_shares_the_base_layer(store: ImageStore, images: Path) -> None:
    busybox = store.import_archive(images / "busybox.tar")
    layered = store.import_archive(images / "layered.tar")
    assert layered.ref == "layered:latest" and len(layered.layers) == 3
    assert layered.layers[0] == busybox.layers[0]
    assert "LAYERED=1" in layered.config.env
    assert len(list(store.layers_dir.iterdir())) == 3
    top = store.layer_paths(layered)[2]
    wh = (top / "etc/deleteme").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(top / "opt/old", OPAQUE_XATTR) == b"y"
    assert (top / "srv/data2").stat().st_ino == (top / "srv/data2-link").stat().st_ino
    assert stat.S_IMODE((top / "usr/local/bin/suid-test").stat().st_mode) == 0o4755
    # Importing again unpacks nothing and changes nothing.
    inode = top.stat().st_ino
    again = store.import_archive(images / "layered.tar")
    assert again.layers == layered.layers and top.stat().st_ino == inode


# Runs inside `unshare -m`: the mount dies with the namespace, whatever happens.
_OVERLAY_CHECK = r"""
import json, os, subprocess, sys
mnt, lower = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + lower, mnt], check=True)
run = subprocess.run(
    ["chroot", mnt, "/bin/sh", "-c", "cat /etc/replaceme; ls /opt/old; echo ok"],
    capture_output=True, text=True,
)
print(json.dumps({
    "etc": sorted(os.listdir(mnt + "/etc")),
    "opt_old": sorted(os.listdir(mnt + "/opt/old")),
    "var": sorted(os.listdir(mnt + "/var")),
    "vi": os.path.lexists(mnt + "/bin/vi"),
    "sh": os.path.lexists(mnt + "/bin/sh"),
    "replaceme": open(mnt + "/etc/replaceme").read(),
    "srv": sorted(os.listdir(mnt + "/srv")),
    "link": os.stat(mnt + "/srv/data2").st_ino == os.stat(mnt + "/srv/data2-link").st_ino,
    "chroot": run.stdout,
}))
"""


def test_overlay_of_layered_image_applies_whiteouts(
    store: ImageStore, images: Path, tmp_path: Path
) -> None:
    rec = store.import_archive(images / "layered.tar")
    lower = ":".join(str(p) for p in reversed(store.layer_paths(rec)))  # uppermost first
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", _OVERLAY_CHECK, str(mnt), lower],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["etc"] == ["group", "passwd", "replaceme"]  # deleteme whited out
    assert seen["opt_old"] == ["new.txt"]  # opaque: a.txt, b.txt hidden
    assert seen["var"] == []  # the whole cache directory whited out
    assert seen["vi"] is False and seen["sh"] is True
    assert seen["replaceme"] == "new\n"
    assert seen["srv"] == ["data", "data2", "data2-link"] and seen["link"] is True
    assert seen["chroot"] == "new\nnew.txt\nok\n"
    # Nothing is left mounted in our namespace.
    assert str(mnt) not in Path("/proc/self/mountinfo").read_text()
    assert os.listdir(mnt) == []
