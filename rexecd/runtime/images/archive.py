"""Image archives: docker-archive and OCI image-layout tarballs, read in place and verified."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from rexecd.errors import ImageError, InvalidRequest, UnsupportedImage

from .blobs import CHUNK, CountingReader, check_digest, decompress
from .limits import BoundedTarInfo, Budget, HeaderTooLarge, RatioGuard, refuse_header
from .manifest import (
    descriptors,
    digest_of,
    image_entries,
    is_index,
    parse_config,
    parse_manifest,
    pick_platform,
)
from .models import ImageConfig, parse_reference
from .unpack import TAR_HEADER_ERRORS

# Small JSON documents only: a bigger one is not an image, and must not fill memory.
_JSON_LIMIT = 16 << 20
_BLOB_PATH_RE = re.compile(r"^blobs/(sha256)/([0-9a-f]{64})\Z")
_LEGACY_CONFIG_RE = re.compile(r"^([0-9a-f]{64})\.json\Z")
_MAX_INDEX_DEPTH = 4


@dataclass(frozen=True)
class LayerBlob:
    """One layer as the archive holds it."""

    diff_id: str
    path: str  # the member name the manifest gives, for messages
    member: tarfile.TarInfo  # the regular-file member holding the bytes (links resolved)
    digest: str | None  # None when the archive gives no blob digest (legacy docker-archive)
    size: int


@dataclass(frozen=True)
class ParsedImage:
    name: str | None
    tag: str | None
    digest: str
    config: ImageConfig
    created: datetime | None
    layers: list[LayerBlob]


class OuterArchive:
    """Random access to the members of the (uncompressed, seekable) outer tarball."""

    def __init__(self, tar: tarfile.TarFile, budget: Budget) -> None:
        self._tar = tar
        self._members: dict[str, tarfile.TarInfo] = {}
        members = []
        try:
            # Counted as they are read: the member table is held in memory.
            for m in tar:
                budget.charge_entries(1, "archive")
                members.append(m)
        except (tarfile.TarError, *TAR_HEADER_ERRORS) as e:
            raise ImageError(f"corrupt archive: {e}") from None
        except HeaderTooLarge as e:
            raise refuse_header("archive", members[-1].name if members else "", e) from None
        for m in members:
            # Later members win, as when a tar is extracted.
            self._members[_norm(m.name)] = m

    def has(self, name: str) -> bool:
        return _norm(name) in self._members

    def member(self, name: str) -> tarfile.TarInfo:
        """The regular-file member at ``name``, following links inside the archive only."""
        key = _norm(name)
        for _ in range(16):
            m = self._members.get(key)
            if m is None:
                raise ImageError(f"archive has no member {name!r}")
            if m.issparse():
                # Its map may claim any size from a few bytes (see unpack.py).
                raise ImageError(f"archive member {name!r} is a sparse file")
            if m.isreg():
                return m
            if m.issym():
                key = _norm(posixpath.join(posixpath.dirname(key), m.linkname))
            elif m.islnk():
                key = _norm(m.linkname)
            else:
                raise ImageError(f"archive member {name!r} is not a regular file")
        raise ImageError(f"archive member {name!r}: too many levels of links")

    def open(self, member: tarfile.TarInfo) -> IO[bytes]:
        f = self._tar.extractfile(member)
        assert f is not None  # member() only returns regular files
        return f

    def read(self, name: str, digest: str | None = None) -> bytes:
        m = self.member(name)
        if m.size > _JSON_LIMIT:
            raise ImageError(f"archive member {name!r} is too large ({m.size} bytes)")
        data = self.open(m).read()
        if digest is not None:
            check_digest(digest_of(data, digest), digest, f"blob {name!r}")
        return data

    def read_json(self, name: str, digest: str | None = None) -> Any:
        try:
            return json.loads(self.read(name, digest))
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"archive member {name!r} is not valid JSON: {e}") from None


def _norm(name: str) -> str:
    # Names are only keys into the member table here; nothing is created from them.
    return posixpath.normpath("/" + name).lstrip("/")


@contextmanager
def open_archive(src: Path | BinaryIO, spool_dir: Path, budget: Budget) -> Iterator[OuterArchive]:
    """Open an image tarball for random access.

    A seekable plain tar is read in place. A gzip/zstd-compressed one (``docker save |
    gzip``), or a stream that cannot seek, is first copied whole (decompressed) into an
    anonymous temporary file in ``spool_dir``; its members are never extracted. The
    spool's bytes and the number of members are charged to ``budget``.
    """
    with _plain_seekable(src, spool_dir, budget) as f, _open_tar(f) as tar:
        try:
            yield OuterArchive(tar, budget)
        except tarfile.TarError as e:
            raise ImageError(f"corrupt archive: {e}") from None


def _open_tar(f: BinaryIO) -> tarfile.TarFile:
    try:
        return tarfile.open(
            fileobj=f,
            mode="r:",
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=BoundedTarInfo,
        )
    except (tarfile.TarError, *TAR_HEADER_ERRORS) as e:
        raise ImageError(f"not a tar archive: {e}") from None
    except HeaderTooLarge as e:
        raise refuse_header("archive", "(start of archive)", e) from None


@contextmanager
def _plain_seekable(src: Path | BinaryIO, spool_dir: Path, budget: Budget) -> Iterator[BinaryIO]:
    if isinstance(src, Path):
        with src.open("rb") as f:
            if _is_plain(f):
                yield f
                return
            with _spool(f, spool_dir, budget) as s:
                yield s
        return
    if src.seekable() and _is_plain(src):
        yield src
        return
    with _spool(src, spool_dir, budget) as s:
        yield s


def _is_plain(f: BinaryIO) -> bool:
    pos = f.tell()
    head = f.read(8)
    f.seek(pos)
    return not head.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd"))


@contextmanager
def _spool(f: BinaryIO, spool_dir: Path, budget: Budget) -> Iterator[BinaryIO]:
    raw = CountingReader(f)
    kind, inflated = decompress(raw, "archive")
    plain = RatioGuard(inflated, raw, budget, "archive", ratio=kind != "tar")
    # Anonymous: a refused or failed spool leaves nothing in spool_dir.
    with tempfile.TemporaryFile(dir=spool_dir) as out:
        while data := plain.read(CHUNK):
            out.write(data)
        out.seek(0)
        yield out


def read_image(arc: OuterArchive, want: tuple[str, str | None] | None) -> ParsedImage:
    """Parse and verify everything but the layer contents.

    ``want`` (a parsed ``name[:tag]``) chooses the image when the archive holds several.
    OCI image-layout is preferred when present (Docker 25+ writes both layouts), since
    it carries a digest for every blob.
    """
    if arc.has("oci-layout") and arc.has("index.json"):
        return _read_oci(arc, want)
    if arc.has("manifest.json"):
        return _read_docker(arc, want)
    raise ImageError("archive is neither an OCI image layout nor a docker-archive")


# --- OCI image layout -------------------------------------------------------------------


def _read_oci(arc: OuterArchive, want: tuple[str, str | None] | None) -> ParsedImage:
    layout = arc.read_json("oci-layout")
    if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith(
        "1."
    ):
        raise UnsupportedImage("oci-layout: unsupported imageLayoutVersion")
    entries = image_entries(descriptors(arc.read_json("index.json"), "index.json"))
    if not entries:
        raise ImageError("index.json lists no image")
    pairs = [(d, _ref_of(d)) for d in entries]
    if want is not None:
        pairs = [p for p in pairs if _same_ref(p[1], want)] or pairs
    # Several entries are fine when they are one image under several tags, or one
    # reference across platforms; several references to different manifests are not.
    if len({d["digest"] for d, _ in pairs}) > 1 and len({r for _, r in pairs}) > 1:
        names = ", ".join(sorted({f"{r[0]}:{r[1]}" for _, r in pairs if r is not None}))
        raise ImageError(f"archive holds several images ({names}); name the one to import")
    desc = pick_platform([d for d, _ in pairs], "index.json")
    ref = next(r for d, r in pairs if d is desc)
    for _ in range(_MAX_INDEX_DEPTH):
        doc = arc.read_json(_blob_path(desc), desc["digest"])
        if not is_index(desc.get("mediaType"), doc):
            return _read_manifest(arc, desc, doc, ref)
        where = f"index {desc['digest']}"
        desc = pick_platform(image_entries(descriptors(doc, where)), where)
    raise ImageError("image indexes nested too deeply")


def _read_manifest(
    arc: OuterArchive, desc: dict[str, Any], doc: Any, ref: tuple[str | None, str | None] | None
) -> ParsedImage:
    where = f"manifest {desc['digest']}"
    m = parse_manifest(doc, where, desc.get("mediaType"))
    cfg_bytes = arc.read(_blob_path(m.config), m.config["digest"])
    config, created, diff_ids = parse_config(cfg_bytes, f"config {m.config['digest']}")
    if len(diff_ids) != len(m.layers):
        raise ImageError(f"{where}: {len(m.layers)} layers but {len(diff_ids)} diff_ids")
    layers = []
    for d, diff_id in zip(m.layers, diff_ids, strict=True):
        path = _blob_path(d)
        member = arc.member(path)
        if member.size != d["size"]:
            raise ImageError(f"blob {path!r}: size {member.size}, manifest says {d['size']}")
        layers.append(LayerBlob(diff_id, path, member, d["digest"], member.size))
    name, tag = ref if ref is not None else (None, None)
    return ParsedImage(name, tag, desc["digest"], config, created, layers)


def _blob_path(d: dict[str, Any]) -> str:
    algo, _, hexd = d["digest"].partition(":")
    return f"blobs/{algo}/{hexd}"


def _ref_of(d: dict[str, Any]) -> tuple[str | None, str | None] | None:
    """The (name, tag) an index entry is annotated with, if any.

    containerd/Docker put the full reference in ``io.containerd.image.name``. The OCI
    ``org.opencontainers.image.ref.name`` is by convention only a tag ("latest"), but
    skopeo and others write a full "name:tag" there: with a ':' or '/' it is taken as a
    full reference, otherwise as a tag.
    """
    ann = d.get("annotations") or {}
    full = ann.get("io.containerd.image.name")
    short = ann.get("org.opencontainers.image.ref.name")
    try:
        if isinstance(full, str):
            name, tag = parse_reference(full)
            return name, tag or (short if isinstance(short, str) else None)
        if isinstance(short, str):
            if ":" in short or "/" in short:
                return parse_reference(short)
            return None, short
    except InvalidRequest as e:
        raise ImageError(f"index.json: bad image reference annotation: {e}") from None
    return None


def _same_ref(ref: tuple[str | None, str | None] | None, want: tuple[str, str | None]) -> bool:
    if ref is None:
        return False
    return ref[0] == want[0] and (ref[1] or "latest") == (want[1] or "latest")


# --- docker-archive ---------------------------------------------------------------------


def _read_docker(arc: OuterArchive, want: tuple[str, str | None] | None) -> ParsedImage:
    manifest = arc.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError("manifest.json: expected a non-empty list")
    entries = [_docker_entry(e) for e in manifest]
    if len(entries) > 1:
        wanted = []
        if want is not None:
            wanted = [e for e in entries if any(_same_ref(t, want) for t in e[2])]
        if len(wanted) != 1:
            listed = ", ".join(f"{n}:{t}" for e in entries for n, t in e[2]) or "untagged"
            raise ImageError(f"archive holds several images ({listed}); name the one to import")
        entries = wanted
    config_name, layer_paths, tags = entries[0]
    cfg_bytes = arc.read(config_name, _digest_in_name(config_name))
    # No manifest exists in this format: the config digest is docker's image ID.
    digest = f"sha256:{hashlib.sha256(cfg_bytes).hexdigest()}"
    config, created, diff_ids = parse_config(cfg_bytes, f"config {config_name!r}")
    if len(diff_ids) != len(layer_paths):
        raise ImageError(f"manifest.json: {len(layer_paths)} layers but {len(diff_ids)} diff_ids")
    layers = []
    for path, diff_id in zip(layer_paths, diff_ids, strict=True):
        member = arc.member(path)
        layers.append(LayerBlob(diff_id, path, member, _digest_in_name(path), member.size))
    name, tag = tags[0] if tags else (None, None)
    return ParsedImage(name, tag, digest, config, created, layers)


def _docker_entry(e: Any) -> tuple[str, list[str], list[tuple[str, str | None]]]:
    if not isinstance(e, dict):
        raise ImageError("manifest.json: entry is not an object")
    config, layers, repo_tags = e.get("Config"), e.get("Layers"), e.get("RepoTags") or []
    if not isinstance(config, str):
        raise ImageError("manifest.json: entry has no Config")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ImageError("manifest.json: entry has no Layers list")
    if not isinstance(repo_tags, list):
        raise ImageError("manifest.json: RepoTags is not a list")
    tags: list[tuple[str, str | None]] = []
    for t in repo_tags:
        try:
            tags.append(parse_reference(str(t)))
        except InvalidRequest:
            raise ImageError(f"manifest.json: bad RepoTag {t!r}") from None
    return config, layers, tags


def _digest_in_name(path: str) -> str | None:
    # Docker 25+ names blobs by digest; older saves name the config "<sha256>.json".
    p = _norm(path)
    if m := _BLOB_PATH_RE.fullmatch(p):
        return f"{m.group(1)}:{m.group(2)}"
    if m := _LEGACY_CONFIG_RE.fullmatch(p):
        return f"sha256:{m.group(1)}"
    return None
