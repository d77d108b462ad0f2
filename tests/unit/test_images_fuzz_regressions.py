"""Inputs bench/fuzz_images.py found, kept as tests: each must be refused with the
project's ImageError (never another exception), and nothing may be written for it.

* A PAX header with a non-numeric GNU sparse number (``GNU.sparse.realsize=v``, found
  in a layer by the fuzzer; the same in the outer archive): tarfile raises ValueError.
* A sparse member whose map claims a huge size from a few bytes: tarfile expands the
  holes as zeros, so a 2 KiB layer became a terabyte file (found while reducing the
  first finding).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from rexecd.errors import ImageError
from rexecd.runtime.images import ImageStore
from rexecd.runtime.images.unpack import unpack_layer
from tests.unit.fakes.images import docker_archive, layer, oci_archive, reg

TB = 10**12


def _pax_member(pax: dict[str, str], data: bytes = b"x") -> tarfile.TarInfo:
    info, _ = reg("etc/f", data)
    info.pax_headers = pax
    return info


def _tar(pax: dict[str, str]) -> bytes:
    return layer((_pax_member(pax), b"x"))


BAD_NUMBERS = [
    {"GNU.sparse.realsize": "v"},
    {"GNU.sparse.size": "v"},
    {"GNU.sparse.map": "v"},
]
SPARSE_BOMBS = [
    {"GNU.sparse.map": "0,1", "GNU.sparse.size": str(TB)},  # format 0.1
    {"GNU.sparse.map": "0,1", "GNU.sparse.realsize": str(TB)},
]


@pytest.mark.parametrize("pax", BAD_NUMBERS + SPARSE_BOMBS, ids=repr)
def test_layer_header_is_refused(tmp_path: Path, pax: dict[str, str]) -> None:
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageError, match=r"corrupt tar|sparse"):
        unpack_layer(io.BytesIO(_tar(pax)), dest, "test layer")
    # Nothing of the member was created, least of all a terabyte of zeros.
    assert not (dest / "etc" / "f").exists()


def test_real_fuzzer_finding(tmp_path: Path) -> None:
    """The fuzzer's own input, reduced: a PAX record renamed by mutation."""
    data = _tar({"SCHILY.xattr.user.k": "v"})
    bad = data.replace(b"25 SCHILY.xattr.user.k=v\n", b"25 GNU.sparse.realsize=v\n")
    assert bad != data
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageError, match="corrupt tar"):
        unpack_layer(io.BytesIO(bad), dest, "test layer")


def _outer_with(pax: dict[str, str], name: str = "manifest.json") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(b"[]"))
    return buf.getvalue()


@pytest.mark.parametrize("pax", BAD_NUMBERS + SPARSE_BOMBS, ids=repr)
def test_outer_archive_header_is_refused(tmp_path: Path, pax: dict[str, str]) -> None:
    store = ImageStore(tmp_path / "store", durable=False)
    with pytest.raises(ImageError, match=r"not a tar archive|corrupt archive|sparse"):
        store.import_archive(io.BytesIO(_outer_with(pax)), "x:1")
    assert store.list() == []
    assert os.listdir(store.tmp_dir) == []


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_sparse_layer_blob_is_refused(tmp_path: Path, fmt: str) -> None:
    """A layer blob stored as a sparse member of the outer archive: refused before a
    byte of it is read (the size and digest checks come only after reading it all)."""
    lay = layer(reg("a", b"a"))
    if fmt == "oci":
        data = oci_archive([lay], "tar")
    else:
        data = docker_archive([lay], "tar", repo_tags=["x:1"])
    # Rewrite the layer member's header as sparse: same bytes, a map claiming 1 TB.
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for m in src.getmembers():
            f = src.extractfile(m) if m.isreg() else None
            body = f.read() if f is not None else None
            if body == lay:
                m.pax_headers = {"GNU.sparse.map": f"0,{len(lay)}", "GNU.sparse.size": str(TB)}
            dst.addfile(m, io.BytesIO(body) if body is not None else None)
    store = ImageStore(tmp_path / "store", durable=False)
    with pytest.raises(ImageError, match="sparse"):
        store.import_archive(io.BytesIO(out.getvalue()), "x:1")
    assert store.list() == []
