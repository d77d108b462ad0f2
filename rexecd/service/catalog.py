"""The image catalogue: what a create's ``image`` (and ``custom_image``) resolves to.

A request names a catalogue image by its name (``debian:bookworm``) or one of its
aliases (``debian``, Rexec's short keys), ``custom`` with ``custom_image``, or any image
that is already local. The answer is the local name the image is (or will be) stored
under, and the reference to pull when it is not local and pulling is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from rexecd.config import CatalogueImage, Config
from rexecd.errors import InvalidRequest, UnsupportedImage
from rexecd.runtime.images.models import parse_reference, parse_remote

CUSTOM = "custom"


@dataclass(frozen=True)
class Resolved:
    local: str  # the store's name for it ("debian:bookworm")
    pull: str | None  # the reference to pull when not local; None: local only
    entry: CatalogueImage | None


def find(cfg: Config, name: str) -> CatalogueImage | None:
    for entry in cfg.images.catalogue:
        if name == entry.name or name in entry.aliases:
            return entry
    return None


def normalise(ref: str) -> str:
    """``ref`` as the store names it (``busybox`` -> ``busybox:latest``)."""
    name, tag = parse_reference(ref)
    return f"{name}:{tag or 'latest'}"


def resolve(cfg: Config, image: str, custom_image: str | None) -> Resolved:
    """Raises InvalidRequest for a custom request without ``custom_image`` or a name
    that is no image name at all."""
    if image == CUSTOM:
        if not custom_image:
            raise InvalidRequest("custom_image is required when image is 'custom'")
        entry = find(cfg, CUSTOM)
        may_pull = entry is not None and entry.pull and cfg.registries.pull
        if may_pull and entry is not None:
            may_pull = parse_remote(custom_image).registry in entry.registries
        return Resolved(normalise(custom_image), custom_image if may_pull else None, entry)
    entry = find(cfg, image)
    if entry is not None:
        ref = entry.reference if entry.pull and cfg.registries.pull else None
        return Resolved(normalise(entry.name), ref, entry)
    try:
        return Resolved(normalise(image), None, None)
    except InvalidRequest:
        raise unsupported(cfg, image) from None


def unsupported(cfg: Config, image: str, local: list[str] | None = None) -> UnsupportedImage:
    """The 400 for an image that is neither local nor pullable, saying how to get it."""
    entry = find(cfg, image)
    supported = sorted({*(e.name for e in cfg.images.catalogue), *(local or [])})
    if entry is not None and entry.reference is not None:
        how = (
            f"image {image!r} is not available here yet: an admin can pull it with "
            f"`rexecd image pull {entry.reference} --name {entry.name}` "
            "(or POST /api/images/pull)"
        )
        if not cfg.registries.pull:
            how += "; pulling on create is off (registries.pull)"
        return UnsupportedImage(how, image=image, supported_images=supported)
    return UnsupportedImage(
        "unsupported image type",
        image=image,
        supported_images=supported,
        hint="name an image of the catalogue (GET /api/images), or have an admin pull "
        "(`rexecd image pull REF`) or import (`rexecd image import`) it",
    )
