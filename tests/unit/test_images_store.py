"""The image store: records, lookup, layer reuse, removal and gc, crash leftovers and
concurrent imports (no root needed)."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from rexecd.errors import ImageError, InvalidRequest, NotFound, RexecError
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.runtime.images import store as store_mod
from rexecd.runtime.images.files import rmtree
from tests.unit.fakes.images import SIMPLE, digest, docker_archive, layer, oci_archive, reg

BASE = layer(reg("base", b"base\n"))
TOP_A = layer(reg("a", b"a\n"))
TOP_B = layer(reg("b", b"b\n"))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store", durable=False)


def archive(tmp_path: Path, layers: list[bytes], ref: str) -> Path:
    p = tmp_path / f"{ref.replace(':', '_').replace('/', '_')}.tar"
    p.write_bytes(oci_archive(layers, ref=ref))
    return p


def test_store_layout_is_private(tmp_path: Path) -> None:
    s = ImageStore(tmp_path / "a" / "b", durable=False)
    for d in (s.layers_dir, s.images_dir, s.tmp_dir):
        assert d.stat().st_mode & 0o777 == 0o700


def test_get_list_remove(store: ImageStore, tmp_path: Path) -> None:
    rec = store.import_archive(archive(tmp_path, [SIMPLE], "busybox:latest"))
    assert store.get("busybox") == rec
    assert store.get("busybox:latest") == rec
    assert store.get("docker.io/library/busybox") == rec
    assert store.get(rec.digest) == rec
    with pytest.raises(NotFound):
        store.get("busybox:other")
    with pytest.raises(NotFound):
        store.get("sha256:" + "0" * 64)
    with pytest.raises(NotFound, match="not a valid image name"):
        store.get("Not/A..Name")
    store.import_archive(archive(tmp_path, [SIMPLE], "alpine:3"))
    assert [r.ref for r in store.list()] == ["alpine:3", "busybox:latest"]
    store.remove("busybox")
    with pytest.raises(NotFound):
        store.get("busybox")
    with pytest.raises(NotFound):
        store.remove("busybox")
    assert [r.ref for r in store.list()] == ["alpine:3"]


def test_record_is_json_on_disk(store: ImageStore, tmp_path: Path) -> None:
    rec = store.import_archive(archive(tmp_path, [SIMPLE], "team/tool:v1"))
    (path,) = store.images_dir.iterdir()
    assert path.name == "team%2Ftool:v1.json"
    doc = json.loads(path.read_text())
    assert doc["layers"] == [digest(SIMPLE)] and doc["digest"] == rec.digest
    assert ImageRecord.model_validate(doc) == rec
    # A second store on the same root sees it (the daemon restarting).
    assert ImageStore(store.root).get("team/tool:v1") == rec


def test_unreadable_record_is_skipped(store: ImageStore, tmp_path: Path) -> None:
    store.import_archive(archive(tmp_path, [SIMPLE], "good:1"))
    (store.images_dir / "bad:1.json").write_text("{not json")
    assert [r.ref for r in store.list()] == ["good:1"]


def test_layers_are_shared_and_unpacked_once(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = store_mod.unpack_layer

    def counting(stream: Any, dest: Path, label: str, budget: Any) -> Any:
        calls.append(dest)
        return real(stream, dest, label, budget)

    monkeypatch.setattr(store_mod, "unpack_layer", counting)
    a = store.import_archive(archive(tmp_path, [BASE, TOP_A], "a:1"))
    base_dir = store.layer_paths(a)[0]
    inode = base_dir.stat().st_ino
    assert len(calls) == 2
    b = store.import_archive(archive(tmp_path, [BASE, TOP_B], "b:1"))
    assert len(calls) == 3  # only TOP_B
    assert store.layer_paths(b)[0] == base_dir and base_dir.stat().st_ino == inode
    store.import_archive(archive(tmp_path, [BASE, TOP_A], "a:1"))
    assert len(calls) == 3
    assert sorted(p.name for p in store.layers_dir.iterdir()) == sorted(
        d[7:] for d in {*a.layers, *b.layers}
    )


def test_layer_paths_lowest_first_and_missing(store: ImageStore, tmp_path: Path) -> None:
    rec = store.import_archive(archive(tmp_path, [BASE, TOP_A, TOP_B], "x:1"))
    paths = store.layer_paths(rec)
    assert [p.name for p in paths] == [d[7:] for d in rec.layers]
    assert [sorted(os.listdir(p)) for p in paths] == [["base"], ["a"], ["b"]]
    rmtree(paths[1])
    with pytest.raises(RexecError, match="missing from the store"):
        store.layer_paths(rec)


def test_gc_keeps_used_layers(store: ImageStore, tmp_path: Path) -> None:
    a = store.import_archive(archive(tmp_path, [BASE, TOP_A], "a:1"))
    b = store.import_archive(archive(tmp_path, [BASE, TOP_B], "b:1"))
    assert store.gc() == []
    store.remove("a:1")
    assert store.gc(keep=[a.layers[1]]) == []
    assert store.gc() == [a.layers[1]]
    assert {p.name for p in store.layers_dir.iterdir()} == {d[7:] for d in b.layers}
    store.remove("b:1")
    assert sorted(store.gc()) == sorted(b.layers)
    assert list(store.layers_dir.iterdir()) == []


def test_same_layer_twice_in_one_image(store: ImageStore, tmp_path: Path) -> None:
    rec = store.import_archive(archive(tmp_path, [BASE, TOP_A, BASE], "twice:1"))
    assert rec.layers[0] == rec.layers[2]
    assert len(list(store.layers_dir.iterdir())) == 2


def test_crash_leftovers_are_swept(store: ImageStore, tmp_path: Path) -> None:
    stale = store.tmp_dir / "0123456789ab.crashed"
    (stale / "usr/lib").mkdir(parents=True)
    (stale / "usr/lib/file").write_text("half")
    os.chmod(stale / "usr", 0o555)  # an image's read-only directory
    store.import_archive(archive(tmp_path, [SIMPLE], "s:1"))
    assert list(store.tmp_dir.iterdir()) == []


def test_failed_import_leaves_nothing(store: ImageStore, tmp_path: Path) -> None:
    bad = layer(reg("ok", b"fine"), reg("../escape", b"no"))
    with pytest.raises(ImageError, match=r"member '\.\./escape'"):
        store.import_archive(archive(tmp_path, [BASE, bad], "bad:1"))
    assert list(store.tmp_dir.iterdir()) == []
    # The good layer of the failed image is complete and may stay, or not: never half.
    for p in store.layers_dir.iterdir():
        assert os.listdir(p) == ["base"]
    assert store.list() == []
    assert not (tmp_path / "escape").exists() and not (store.root / "escape").exists()


def test_invalid_name_is_refused(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        store.import_archive(archive(tmp_path, [SIMPLE], "ok:1"), name="UPPER:case")
    with pytest.raises(InvalidRequest):
        store.import_archive(archive(tmp_path, [SIMPLE], "ok:1"), name="a/../b")


def test_rename_race_loser_discards(store: ImageStore, tmp_path: Path) -> None:
    final = store.layers_dir / ("ab" * 32)
    final.mkdir()
    (final / "winner").write_text("w")
    mine = store.tmp_dir / "mine"
    mine.mkdir()
    (mine / "loser").write_text("l")
    store._commit(mine, final)
    assert os.listdir(final) == ["winner"]


def test_concurrent_imports_threads(store: ImageStore, tmp_path: Path) -> None:
    big = layer(*(reg(f"d{i // 50}/f{i}", os.urandom(64)) for i in range(500)))
    path = archive(tmp_path, [big, TOP_A], "conc:1")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            ImageStore(store.root, durable=False).import_archive(path)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_conc(store, 500)


def _check_conc(store: ImageStore, files: int) -> None:
    rec = store.get("conc:1")
    paths = store.layer_paths(rec)
    assert len(list(store.layers_dir.iterdir())) == 2
    assert sum(len(fs) for _, _, fs in os.walk(paths[0])) == files
    assert list(store.tmp_dir.iterdir()) == []


def _import_in_child(root: str, path: str) -> None:
    ImageStore(Path(root), durable=False).import_archive(Path(path))


def test_concurrent_imports_processes(store: ImageStore, tmp_path: Path) -> None:
    big = layer(*(reg(f"d{i // 50}/f{i}", os.urandom(64)) for i in range(300)))
    path = archive(tmp_path, [big, TOP_A], "conc:1")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_import_in_child, args=(str(store.root), str(path))) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    _check_conc(store, 300)


def test_size_counts_archive_blob_bytes(store: ImageStore, tmp_path: Path) -> None:
    p = tmp_path / "d.tar"
    p.write_bytes(docker_archive([BASE, TOP_A], "tar"))
    rec = store.import_archive(p)
    assert rec.size == len(BASE) + len(TOP_A)
