"""Image management in the store: leases (reference counts), remove of an image in use,
tag, prune, pull sessions and plain rootfs imports (no root needed)."""

from __future__ import annotations

import bz2
import io
import lzma
import os
from pathlib import Path

import pytest

from rexecd.errors import Conflict, ImageError, NotFound
from rexecd.runtime.images import ImageStore
from tests.unit.fakes.images import compress, digest, dir_, layer, oci_archive, reg, sym

BASE = layer(reg("base", b"base\n"))
TOP = layer(reg("top", b"top\n"))
CID = "c" * 64


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store", durable=False)


def imp(store: ImageStore, tmp_path: Path, layers: list[bytes], ref: str) -> None:
    p = tmp_path / f"{ref.replace(':', '_')}.tar"
    p.write_bytes(oci_archive(layers, ref=ref))
    store.import_archive(p)


def test_pinned_image_cannot_be_removed_and_keeps_its_layers(
    store: ImageStore, tmp_path: Path
) -> None:
    imp(store, tmp_path, [BASE, TOP], "app:1")
    rec = store.get("app:1")
    store.pin(CID, rec)
    assert store.pinned(CID) == rec
    assert store.layer_refs()[digest(TOP)] == 2  # the record and the lease
    with pytest.raises(Conflict, match="in use by 1 container") as info:
        store.remove("app:1")
    assert info.value.extra["containers"] == [CID]
    assert store.get("app:1") == rec  # unchanged

    # Re-importing the name with other content moves the name, not the container.
    imp(store, tmp_path, [BASE], "app:1")
    assert store.get("app:1").digest != rec.digest
    store.remove("app:1")  # the new image is not in use
    assert store.gc() == []  # the old layers are still leased
    assert [p.name for p in store.layer_paths(rec)] == [d[7:] for d in rec.layers]

    assert store.unpin(CID) and not store.unpin(CID)
    assert sorted(store.gc()) == sorted(rec.layers)


def test_pin_refuses_missing_layers(store: ImageStore, tmp_path: Path) -> None:
    imp(store, tmp_path, [BASE], "a:1")
    rec = store.get("a:1")
    store.remove("a:1")
    store.gc()
    with pytest.raises(Exception, match="missing from the store"):
        store.pin(CID, rec)
    assert store.pinned(CID) is None


def test_drop_leases_keeps_live_owners(store: ImageStore, tmp_path: Path) -> None:
    imp(store, tmp_path, [BASE], "a:1")
    rec = store.get("a:1")
    store.pin("a" * 64, rec)
    store.pin("b" * 64, rec)
    assert store.drop_leases(keep={"a" * 64}) == ["b" * 64]
    assert [o for o, _ in store.leases.items()] == ["a" * 64]
    with pytest.raises(Exception, match="invalid lease owner"):
        store.pin("../x", rec)


def test_tag_and_prune(store: ImageStore, tmp_path: Path) -> None:
    imp(store, tmp_path, [BASE, TOP], "app:1")
    imp(store, tmp_path, [BASE], "base:1")
    tagged = store.tag("app:1", "registry.local:5000/team/app:v2")
    assert tagged.ref == "registry.local:5000/team/app:v2"
    assert tagged.digest == store.get("app:1").digest
    with pytest.raises(NotFound):
        store.tag("nope:1", "x:1")
    store.pin(CID, store.get("base:1"))
    res = store.prune(all_unused=True)
    assert sorted(res.images) == ["app:1", "registry.local:5000/team/app:v2"]
    assert res.layers == [digest(TOP)] and res.bytes > 0
    assert [r.ref for r in store.list()] == ["base:1"]
    assert store.prune().layers == []


ROOTFS = layer(
    dir_("./"),
    dir_("./etc"),
    reg("./etc/os-release", b"ID=test\n"),
    sym("./bin", "usr/bin"),
    dir_("./usr/bin"),
    reg("./usr/bin/sh", b"#!fake\n", mode=0o755),
)


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd", "xz", "bzip2"])
def test_rootfs_import_any_compression(store: ImageStore, tmp_path: Path, kind: str) -> None:
    if kind == "xz":
        data = lzma.compress(ROOTFS)
    elif kind == "bzip2":
        data = bz2.compress(ROOTFS)
    else:
        data = compress(ROOTFS, kind)
    src = tmp_path / "rootfs.tar"
    src.write_bytes(data)
    rec = store.import_rootfs(src, "debian:bookworm")
    assert rec.ref == "debian:bookworm" and rec.layers == [digest(ROOTFS)]
    assert rec.size == len(data)
    assert rec.config.cmd == ["/bin/sh"] and rec.config.env[0].startswith("PATH=")
    (root,) = store.layer_paths(rec)
    assert (root / "etc/os-release").read_bytes() == b"ID=test\n"
    assert os.readlink(root / "bin") == "usr/bin"
    # The same tree gives the same digest whatever the compression (from a stream too).
    again = store.import_rootfs(io.BytesIO(ROOTFS), "again")
    assert again.digest == rec.digest and again.layers == rec.layers
    assert list(store.tmp_dir.iterdir()) == []


def test_rootfs_import_refuses_unsafe_and_leaves_nothing(store: ImageStore, tmp_path: Path) -> None:
    bad = layer(reg("ok", b"1"), reg("../../escape", b"no"))
    with pytest.raises(ImageError, match="escape"):
        store.import_rootfs(io.BytesIO(bad), "bad:1")
    assert list(store.tmp_dir.iterdir()) == [] and list(store.layers_dir.iterdir()) == []
    assert store.list() == []
    with pytest.raises(ImageError):
        store.import_rootfs(io.BytesIO(lzma.compress(ROOTFS)[:-20]), "cut:1")
    assert list(store.tmp_dir.iterdir()) == []


def test_session_unpacks_verifies_and_commits(store: ImageStore, tmp_path: Path) -> None:
    imp(store, tmp_path, [BASE], "seed:1")
    rec = store.get("seed:1")
    blob = compress(TOP, "gzip")
    with store.session() as s:
        assert s.has_layer(digest(BASE)) and not s.has_layer(digest(TOP))
        with pytest.raises(ImageError, match="digest mismatch"):
            s.unpack(
                io.BytesIO(blob),
                label="top",
                diff_id=digest(TOP),
                blob_digest=digest(b"other"),
                blob_size=len(blob),
            )
        assert not s.has_layer(digest(TOP)) and list(store.tmp_dir.iterdir()) == []
        s.unpack(
            io.BytesIO(blob),
            label="top",
            diff_id=digest(TOP),
            blob_digest=digest(blob),
            blob_size=len(blob),
        )
        new = rec.model_copy(
            update={"name": "pulled", "tag": "latest", "layers": [digest(BASE), digest(TOP)]}
        )
        s.commit(new)
    assert store.get("pulled").layers == [digest(BASE), digest(TOP)]
