"""`rexecd image import --rootfs|rm|tag|prune|ls`, against a state dir in tmp (no root)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rexecd.runtime.images import ImageStore
from tests.unit.fakes.cli import run
from tests.unit.fakes.images import digest, dir_, layer, reg

ROOTFS = layer(dir_("./"), dir_("./etc"), reg("./etc/hostname", b"x\n"))


def test_rootfs_import_tag_rm_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "state")
    src = tmp_path / "rootfs.tar.gz"
    src.write_bytes(gzip.compress(ROOTFS))
    code, out, err = run(
        capsys, "image", "import", "--state-dir", state, "--rootfs", str(src), "--name", "deb:12"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["name"] == "deb:12" and doc["layers"] == 1

    code, _, err = run(capsys, "image", "import", "--state-dir", state, "--rootfs", str(src))
    assert code == 125 and "--name" in err

    assert run(capsys, "image", "tag", "--state-dir", state, "deb:12", "mine/deb:v1")[0] == 0
    code, out, _ = run(capsys, "image", "ls", "--state-dir", state)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["deb:12", "mine/deb:v1"] and rows[0][-1] == "0"

    store = ImageStore(tmp_path / "state" / "images")
    store.pin("c" * 64, store.get("deb:12"))
    code, out, _ = run(capsys, "image", "ls", "--state-dir", state)
    assert out.splitlines()[1].split()[-1] == "1"
    code, _, err = run(capsys, "image", "rm", "--state-dir", state, "deb:12")
    assert code == 125 and "in use by 1 container" in err
    code, out, _ = run(capsys, "image", "rm", "--state-dir", state, "mine/deb:v1")
    assert code == 0 and "removed mine/deb:v1" in out and "0 layer(s)" in out

    store.unpin("c" * 64)
    code, out, _ = run(capsys, "image", "prune", "--state-dir", state)
    assert code == 0 and "0 layer(s) removed" in out
    code, out, _ = run(capsys, "image", "prune", "--state-dir", state, "--all")
    assert code == 0 and "removed deb:12" in out and "1 layer(s) removed" in out
    assert store.list() == [] and not (store.layers_dir / digest(ROOTFS)[7:]).exists()
