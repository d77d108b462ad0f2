"""Builders for image tarballs in tests (no tests here): layer tars member by member, and
OCI image-layout or docker-archive tarballs around them, with hooks to tamper."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import zstandard

from rexecd.runtime.images import ImageConfig, ImageRecord
from rexecd.runtime.images.manifest import host_arch

Member = tuple[tarfile.TarInfo, bytes | None]
MTIME = 1700000000


def _info(name: str, type_: bytes, mode: int, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.mtime = kw.pop("mtime", MTIME)
    info.uid = kw.pop("uid", 0)
    info.gid = kw.pop("gid", 0)
    info.pax_headers = kw.pop("pax", {})
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def reg(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Member:
    info = _info(name, tarfile.REGTYPE, mode, **kw)
    info.size = len(data)
    return info, data


def dir_(name: str, mode: int = 0o755, **kw: Any) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, **kw), None


def sym(name: str, target: str, **kw: Any) -> Member:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=target, **kw), None


def hard(name: str, target: str, **kw: Any) -> Member:
    return _info(name, tarfile.LNKTYPE, 0o644, linkname=target, **kw), None


def dev(name: str, block: bool = False, major: int = 1, minor: int = 3) -> Member:
    kind = tarfile.BLKTYPE if block else tarfile.CHRTYPE
    return _info(name, kind, 0o666, devmajor=major, devminor=minor), None


def fifo(name: str, mode: int = 0o600, **kw: Any) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode, **kw), None


def layer(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return bytes(zstandard.ZstdCompressor().compress(data))
    assert kind == "tar"
    return data


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(data: bytes) -> str:
    return "blobs/sha256/" + hashlib.sha256(data).hexdigest()


def image_config(diff_ids: list[str], cfg: dict[str, Any] | None = None, **top: Any) -> bytes:
    doc: dict[str, Any] = {
        "architecture": host_arch(),
        "os": "linux",
        "created": "2024-05-06T07:08:09.123456789Z",
        "config": cfg if cfg is not None else {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    doc.update(top)
    return json.dumps(doc).encode()


def outer_tar(files: dict[str, bytes | None], links: dict[str, str] | None = None) -> bytes:
    """The outer archive: name -> bytes (None: a directory); links: name -> symlink target."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            if data is None:
                tar.addfile(_info(name, tarfile.DIRTYPE, 0o755))
            else:
                info = _info(name, tarfile.REGTYPE, 0o644)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            tar.addfile(_info(name, tarfile.SYMTYPE, 0o777, linkname=target))
    return buf.getvalue()


def oci_manifest(
    files: dict[str, bytes | None],
    layers: list[bytes],
    compression: str = "gzip",
    cfg: dict[str, Any] | None = None,
    diff_ids: list[str] | None = None,
    **config_top: Any,
) -> bytes:
    """Add the config and layer blobs of one image to ``files``; returns the manifest."""
    blobs = [compress(x, compression) for x in layers]
    config = image_config(diff_ids or [digest(x) for x in layers], cfg, **config_top)
    files[blob_path(config)] = config
    for b in blobs:
        files[blob_path(b)] = b
    media = {"gzip": "+gzip", "zstd": "+zstd", "tar": ""}[compression]
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": f"application/vnd.oci.image.layer.v1.tar{media}",
                "digest": digest(b),
                "size": len(b),
            }
            for b in blobs
        ],
    }
    data = json.dumps(manifest).encode()
    files[blob_path(data)] = data
    return data


def descriptor(data: bytes, media: str, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media, "digest": digest(data), "size": len(data), **extra}


MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def oci_archive(
    layers: list[bytes],
    compression: str = "gzip",
    ref: str | None = "test:latest",
    cfg: dict[str, Any] | None = None,
    tamper: Callable[[dict[str, bytes | None]], None] | None = None,
    **config_top: Any,
) -> bytes:
    """A one-image OCI image-layout tarball."""
    files: dict[str, bytes | None] = {"blobs": None, "blobs/sha256": None}
    manifest = oci_manifest(files, layers, compression, cfg, **config_top)
    ann = {"org.opencontainers.image.ref.name": ref} if ref else {}
    index = {"schemaVersion": 2, "manifests": [descriptor(manifest, MANIFEST, annotations=ann)]}
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = json.dumps(index).encode()
    if tamper:
        tamper(files)
    return outer_tar(files)


def docker_archive(
    layers: list[bytes],
    compression: str = "tar",
    repo_tags: list[str] | None = None,
    cfg: dict[str, Any] | None = None,
    digest_paths: bool = False,
    diff_ids: list[str] | None = None,
    tamper: Callable[[dict[str, bytes | None]], None] | None = None,
) -> bytes:
    """A docker-archive: legacy ``<id>/layer.tar`` names, or Docker 25+ digest paths."""
    files: dict[str, bytes | None] = {}
    blobs = [compress(x, compression) for x in layers]
    config = image_config(diff_ids or [digest(x) for x in layers], cfg)
    paths = []
    for i, b in enumerate(blobs):
        if digest_paths:
            paths.append(blob_path(b))
        else:
            lid = hashlib.sha256(f"{i}{digest(b)}".encode()).hexdigest()
            files[lid] = None
            paths.append(f"{lid}/layer.tar")
        files[paths[-1]] = b
    cfg_name = blob_path(config) if digest_paths else hashlib.sha256(config).hexdigest() + ".json"
    files[cfg_name] = config
    tags = ["test:latest"] if repo_tags is None else repo_tags
    manifest = [{"Config": cfg_name, "RepoTags": tags, "Layers": paths}]
    files["manifest.json"] = json.dumps(manifest).encode()
    if tamper:
        tamper(files)
    return outer_tar(files)


SIMPLE = layer(dir_("etc"), reg("etc/hello", b"hello\n"), sym("bin", "usr/bin"))


class Bomb:
    """A compressed layer tar of one file of ``size`` zero bytes, made as it is read: a
    few KB of gzip or zstd per ~MB, never the whole plain tar in memory. ``read`` counts
    the compressed bytes handed out, to show a consumer stopped early."""

    def __init__(self, size: int, kind: str = "gzip", name: str = "zeros") -> None:
        info, _ = reg(name)
        info.size = size
        self._plain = self._tar(info)
        self._z: Any = (
            zstandard.ZstdCompressor().compressobj()
            if kind == "zstd"
            # Level 1: fast to make; still ~230 bytes of tar per byte of gzip.
            else zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        )
        self._out = b""
        self._done = False
        self.given = 0

    @staticmethod
    def _tar(info: tarfile.TarInfo) -> Iterator[bytes]:
        yield info.tobuf(tarfile.PAX_FORMAT)
        left = info.size
        zeros = bytes(1 << 20)
        while left:
            n = min(left, len(zeros))
            yield zeros[:n]
            left -= n
        yield bytes(-info.size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)

    def read(self, n: int = -1, /) -> bytes:
        n = 1 << 16 if n < 0 else n
        while len(self._out) < n and not self._done:
            piece = next(self._plain, None)
            if piece is None:
                self._out += self._z.flush()
                self._done = True
            else:
                self._out += self._z.compress(piece)
        data, self._out = self._out[:n], self._out[n:]
        self.given += len(data)
        return data

    def whole(self) -> bytes:
        """All of it (for a blob that must sit in an archive or a registry)."""
        out = []
        while data := self.read(1 << 20):
            out.append(data)
        return b"".join(out)


BASE_DIGEST = "sha256:" + "1" * 64
LAYER = "sha256:" + "2" * 64


def base_image(digest: str = BASE_DIGEST, layers: tuple[str, ...] = (LAYER,)) -> ImageRecord:
    """The record of a base image (debian:bookworm) a role is installed on."""
    now = datetime.now(UTC)
    return ImageRecord(
        name="debian",
        tag="bookworm",
        digest=digest,
        size=1,
        layers=list(layers),
        config=ImageConfig(),
        created=now,
        imported=now,
    )
