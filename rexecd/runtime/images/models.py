"""Image records and references: what the store keeps about an image; name:tag parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rexecd.errors import InvalidRequest

DEFAULT_TAG = "latest"

# The reference grammar of the distribution spec, minus digests: an optional registry
# host (with port) followed by lower-case path components. Validating here also keeps
# names safe to turn into record file names.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]+)?"
_NAME_RE = re.compile(rf"^(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}\Z")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")

# Docker Hub spellings that mean the same image as the short name.
_HUB_PREFIXES = ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/")


def parse_reference(ref: str) -> tuple[str, str | None]:
    """Split ``name[:tag]`` into a normalised name and the tag (None when absent).

    Raises InvalidRequest for a reference that is not a valid image name.
    """
    name, tag = ref, None
    # A colon after the last slash separates the tag; one before it is a registry port.
    colon = ref.rfind(":")
    if colon > ref.rfind("/"):
        name, tag = ref[:colon], ref[colon + 1 :]
    for prefix in _HUB_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if len(ref) > 255 or not _NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid image name {ref!r}")
    if tag is not None and not _TAG_RE.fullmatch(tag):
        raise InvalidRequest(f"invalid image tag in {ref!r}")
    return name, tag


DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class RemoteRef:
    """A reference to an image in a registry, as the distribution API addresses it."""

    registry: str  # "docker.io", "quay.io", "127.0.0.1:5000"
    repository: str  # "library/debian"
    tag: str | None
    digest: str | None  # "sha256:..." when pinned

    @property
    def reference(self) -> str:
        """What a manifest is fetched by: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def local_name(self) -> str:
        """The store's name for it: Docker Hub's official images by their short name."""
        if self.registry == DOCKER_HUB:
            return self.repository.removeprefix("library/")
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        tail = f":{self.tag}" if self.tag else ""
        pin = f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{tail}{pin}"


def parse_remote(ref: str) -> RemoteRef:
    """Split ``[registry/]repository[:tag][@sha256:...]`` as Docker does: the first
    component names a registry when it has a '.' or ':' or is ``localhost``; otherwise
    the image is on Docker Hub, where a one-component name is an official image
    (``library/``). Raises InvalidRequest."""
    rest, _, digest = ref.partition("@")
    if digest and not DIGEST_RE.fullmatch(digest):
        raise InvalidRequest(f"invalid digest in {ref!r}")
    name, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1 :]
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, repo = first, remainder
    else:
        registry, repo = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    if len(ref) > 255 or not re.fullmatch(_HOST, registry) or not _NAME_RE.fullmatch(repo):
        raise InvalidRequest(f"invalid image reference {ref!r}")
    if tag is not None and not _TAG_RE.fullmatch(tag):
        raise InvalidRequest(f"invalid image tag in {ref!r}")
    return RemoteRef(registry, repo, tag if tag or digest else DEFAULT_TAG, digest or None)


def _string_list(v: Any, field: str) -> list[str] | None:
    # Docker accepts a bare string where a list is expected (its "strslice" type).
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise ValueError(f"{field} must be a list of strings")


class ImageConfig(BaseModel):
    """The runtime defaults an image carries (the ``config`` object of its config blob)."""

    model_config = ConfigDict(frozen=True)

    env: list[str] = Field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    working_dir: str = "/"
    # "" means the image names no user: the container runs as root.
    user: str = ""

    @classmethod
    def from_oci(cls, cfg: Any) -> ImageConfig:
        """Build from the ``config`` object of an OCI/docker image config (may be null)."""
        if cfg is None:
            return cls()
        if not isinstance(cfg, dict):
            raise ValueError("config must be an object")
        env = cfg.get("Env") or []
        if not isinstance(env, list) or not all(isinstance(x, str) for x in env):
            raise ValueError("Env must be a list of strings")
        wd = cfg.get("WorkingDir") or "/"
        user = cfg.get("User") or ""
        if not isinstance(wd, str) or not isinstance(user, str):
            raise ValueError("WorkingDir and User must be strings")
        return cls(
            env=env,
            entrypoint=_string_list(cfg.get("Entrypoint"), "Entrypoint"),
            cmd=_string_list(cfg.get("Cmd"), "Cmd"),
            working_dir=wd,
            user=user,
        )


class ImageRecord(BaseModel):
    """One imported image, as stored (JSON) under the store's ``images/`` directory."""

    model_config = ConfigDict(frozen=True)

    name: str
    tag: str
    # The OCI manifest digest (the platform manifest, not an index); for a legacy
    # docker-archive, which has no manifest, the config digest (docker's image ID).
    digest: str
    # Bytes of the layer blobs as they were in the archive (compressed where the
    # archive compressed them): cheap to know exactly even when layers are reused.
    size: int
    # diff_ids ("sha256:<hex>" of each uncompressed layer tar), lowest layer first.
    layers: list[str]
    config: ImageConfig
    # When the image was built (its config's "created"), else when it was imported.
    created: datetime
    imported: datetime

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        if not DIGEST_RE.fullmatch(v):
            raise ValueError(f"invalid digest {v!r}")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[str]) -> list[str]:
        for d in v:
            if not DIGEST_RE.fullmatch(d):
                raise ValueError(f"invalid diff_id {d!r}")
        return v

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"
