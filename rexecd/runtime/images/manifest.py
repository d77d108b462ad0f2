"""OCI and Docker manifest documents: descriptors, indexes, platform choice, image configs.

Shared by the archive reader (OCI layout, docker-archive) and the registry puller: both
meet the same JSON documents, only fetched from different places.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rexecd.errors import ImageError, UnsupportedImage

from .models import DIGEST_RE, ImageConfig

BLOB_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


@dataclass(frozen=True)
class Manifest:
    """A platform image manifest: its config descriptor and layer descriptors."""

    config: dict[str, Any]
    layers: list[dict[str, Any]]


def load_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{where}: not valid JSON: {e}") from None


def digest_of(data: bytes, like: str) -> str:
    """The digest of ``data`` in the algorithm of the digest ``like``."""
    algo = like.partition(":")[0]
    if algo not in ("sha256", "sha512"):
        raise UnsupportedImage(f"unsupported digest algorithm {algo!r}")
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def descriptor(d: Any, where: str) -> dict[str, Any]:
    """``d`` checked as a content descriptor (a valid digest and a size)."""
    if not isinstance(d, dict):
        raise ImageError(f"{where}: descriptor is not an object")
    digest, size = d.get("digest"), d.get("size")
    if not isinstance(digest, str) or not BLOB_DIGEST_RE.fullmatch(digest):
        raise ImageError(f"{where}: invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{where}: invalid size for {digest}")
    return d


def descriptors(doc: Any, where: str) -> list[dict[str, Any]]:
    """The ``manifests`` of an index document."""
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ImageError(f"{where}: no manifests list")
    return [descriptor(d, where) for d in doc["manifests"]]


def is_index(media_type: str | None, doc: Any) -> bool:
    """Whether ``doc`` (announced as ``media_type``, if known) is an image index."""
    mt = media_type or (doc.get("mediaType") if isinstance(doc, dict) else None)
    if mt in INDEX_TYPES:
        return True
    return mt is None and isinstance(doc, dict) and "manifests" in doc


def image_entries(descs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Index entries that are images (BuildKit adds attestation manifests, platform
    unknown/unknown, next to them)."""
    out = []
    for d in descs:
        ann = d.get("annotations") or {}
        plat = d.get("platform") or {}
        if ann.get("vnd.docker.reference.type") == "attestation-manifest":
            continue
        if plat.get("os") == "unknown":
            continue
        out.append(d)
    return out


def host_arch() -> str:
    m = platform.machine()
    return _ARCH.get(m, m)


def pick_platform(descs: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The entry for linux on this host's architecture (a lone entry is taken as is)."""
    if not descs:
        raise ImageError(f"{where}: no image manifests")
    if len(descs) == 1:
        return descs[0]
    arch = host_arch()
    for d in descs:
        plat = d.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return d
    raise UnsupportedImage(f"{where}: no image for linux/{arch}")


def parse_manifest(doc: Any, where: str, media_type: str | None = None) -> Manifest:
    """Check an image manifest and return its descriptors (not yet their content)."""
    if not isinstance(doc, dict) or doc.get("mediaType", media_type) not in (
        MANIFEST_TYPES | {None}
    ):
        raise UnsupportedImage(f"{where}: not an image manifest")
    cfg = descriptor(doc.get("config"), f"{where} config")
    if cfg.get("mediaType", next(iter(CONFIG_TYPES))) not in CONFIG_TYPES:
        mt = cfg.get("mediaType")
        raise UnsupportedImage(f"{where}: config type {mt!r} is not an image config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{where}: no layers list")
    layers = []
    for i, raw in enumerate(raw_layers):
        d = descriptor(raw, f"{where} layer {i}")
        mt = str(d.get("mediaType", ""))
        if "encrypted" in mt:
            raise UnsupportedImage(f"{where}: encrypted layers are not supported")
        if "foreign" in mt or "nondistributable" in mt:
            raise UnsupportedImage(f"{where}: foreign (non-distributable) layers are not supported")
        layers.append(d)
    return Manifest(cfg, layers)


def parse_config(raw: bytes, where: str) -> tuple[ImageConfig, datetime | None, list[str]]:
    """An image config blob: its runtime defaults, creation time and layer diff_ids."""
    cfg = load_json(raw, where)
    if not isinstance(cfg, dict):
        raise ImageError(f"{where}: not an object")
    if cfg.get("os", "linux") != "linux":
        raise UnsupportedImage(f"{where}: image is for {cfg.get('os')!r}, not linux")
    rootfs = cfg.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError(f"{where}: rootfs.type is not 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and DIGEST_RE.fullmatch(d) for d in diff_ids
    ):
        raise ImageError(f"{where}: rootfs.diff_ids must be sha256 digests")
    try:
        config = ImageConfig.from_oci(cfg.get("config"))
    except ValueError as e:
        raise ImageError(f"{where}: {e}") from None
    created = None
    if isinstance(cfg.get("created"), str):
        try:
            created = datetime.fromisoformat(cfg["created"])
        except ValueError:
            created = None  # a malformed date is not worth refusing an image over
    return config, created, list(diff_ids)
