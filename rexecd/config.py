"""The daemon's configuration: its schema, the embedded default file, loading and CLI overrides."""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from ipaddress import IPv4Network, IPv6Address
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from rexecd.errors import ConfigError as ConfigError  # raised here; part of errors.py's tree

log = logging.getLogger(__name__)

DEFAULT_CONFIG_RESOURCE = "default.yaml"
TIER_NAMES: tuple[str, ...] = ("guest", "free", "pro", "enterprise")

# sun_path is 108 bytes including the terminating NUL.
_UNIX_PATH_MAX = 107
# IFNAMSIZ is 16 including the NUL; the kernel also refuses '/', ':' and whitespace.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
_CGROUP_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._:-]*\Z")
_IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]*(?::[\w][\w.-]{0,127})?\Z")
_REFERENCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*(?:@sha256:[0-9a-f]{64})?\Z")
_REGISTRY_RE = re.compile(r"^(?:https?://)?[A-Za-z0-9.-]+(?::[0-9]+)?(?:/[A-Za-z0-9._/-]*)?\Z")


# --- the embedded default file ------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def default_config_text() -> str:
    """The embedded default config file, as shipped in the package."""
    return resources.files("rexecd").joinpath(DEFAULT_CONFIG_RESOURCE).read_text("utf-8")


@functools.cache
def _embedded() -> dict[str, Any]:
    data: dict[str, Any] = yaml.load(default_config_text(), Loader=_StrictLoader)
    return data


# The catalogue and the roles live in the source tree's images/ folder, shipped in the
# package as rexecd/catalog (a symlink to ../images).
CATALOG_RESOURCE = "catalog"


@functools.cache
def _catalog() -> dict[str, Any]:
    base = resources.files("rexecd").joinpath(CATALOG_RESOURCE)
    data: dict[str, Any] = yaml.load(
        base.joinpath("catalog.yaml").read_text("utf-8"), Loader=_StrictLoader
    )
    data["role_docs"] = [
        yaml.load(base.joinpath("roles", f"{rid}.yaml").read_text("utf-8"), Loader=_StrictLoader)
        for rid in data.get("roles", [])
    ]
    return data


# --- listen addresses ------------------------------------------------------------------


@dataclass(frozen=True)
class UnixListen:
    path: Path


@dataclass(frozen=True)
class TcpListen:
    host: str
    port: int


def parse_listen(value: str) -> UnixListen | TcpListen:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (IPv6 hosts in brackets); raise ValueError."""
    kind, sep, rest = value.partition(":")
    if sep and kind == "unix":
        if not rest:
            raise ValueError(f"listen address {value!r} has an empty socket path")
        if len(rest.encode()) > _UNIX_PATH_MAX:
            raise ValueError(
                f"listen address {value!r}: socket path longer than {_UNIX_PATH_MAX} bytes"
            )
        return UnixListen(Path(rest))
    if sep and kind == "tcp":
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host or not port_text.isdigit():
            raise ValueError(f"listen address {value!r} must be tcp:HOST:PORT")
        port = int(port_text)
        # Port 0 is allowed so tests can ask the kernel for a free port.
        if port > 65535:
            raise ValueError(f"listen address {value!r}: port out of range")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if not isinstance(ipaddress.ip_address(host), IPv6Address):
                raise ValueError(f"listen address {value!r}: brackets are only for IPv6")
        return TcpListen(host, port)
    raise ValueError(f"listen address {value!r} must be unix:PATH or tcp:HOST:PORT")


# --- sections --------------------------------------------------------------------------


class _Section(BaseModel):
    # validate_assignment: tests that tweak a loaded config still get validated values.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NetworkConfig(_Section):
    # false: containers get a network namespace with loopback only, and the daemon
    # creates no bridge, veth or nft table (hosts or tests without networking).
    enabled: bool = True
    bridge: str = "rexec0"
    # rexecd's own nftables table; distinct per daemon when several share a host.
    nft_table: str = Field(default="rexecd", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
    subnet: IPv4Network = IPv4Network("10.88.0.0/16")
    mode_default: Literal["default", "none"] = "default"
    dns: list[IPvAnyAddress] = Field(
        default_factory=lambda: [ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("8.8.8.8")]
    )
    # Host ports containers may reach on the gateway address; every other host port is
    # dropped. Empty by default: a service the host happens to run (a resolver, sshd)
    # must not become reachable from containers by accident.
    gateway_tcp_ports: list[int] = Field(default_factory=list)
    gateway_udp_ports: list[int] = Field(default_factory=list)
    # Host ports (on 127.0.0.1) the daemon hands out for port forwards. A range of its
    # own keeps forwards clear of the ephemeral ports (32768+) and of well-known ones.
    port_forward_min: int = Field(default=20000, ge=1, le=65535)
    port_forward_max: int = Field(default=29999, ge=1, le=65535)
    # Connections (conntrack entries) one container may hold open through the host at
    # once; new ones past it are dropped. The host's table is one for everyone (262144
    # entries by default), and an unanswered UDP packet holds an entry for 30 s.
    max_flows_per_container: int = Field(default=4096, ge=16)

    @field_validator("gateway_tcp_ports", "gateway_udp_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for port in v:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is out of range (1-65535)")
        return v

    @model_validator(mode="after")
    def _forward_range(self) -> NetworkConfig:
        if self.port_forward_min > self.port_forward_max:
            raise ValueError(
                f"port_forward_min ({self.port_forward_min}) is above "
                f"port_forward_max ({self.port_forward_max})"
            )
        return self

    @field_validator("bridge")
    @classmethod
    def _bridge_name(cls, v: str) -> str:
        if not _IFNAME_RE.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a valid interface name (1-15 of [A-Za-z0-9_.-], "
                "starting with a letter or digit)"
            )
        return v

    @field_validator("subnet", mode="before")
    @classmethod
    def _parse_subnet(cls, v: Any) -> Any:
        # ipaddress says *why* a network is bad (host bits set, bad prefix); pydantic
        # alone only says "not a valid IPv4 network".
        if isinstance(v, str):
            try:
                return IPv4Network(v)
            except ValueError as exc:
                raise ValueError(f"{v!r}: {exc}") from None
        return v

    @field_validator("subnet")
    @classmethod
    def _room_for_hosts(cls, v: IPv4Network) -> IPv4Network:
        # The gateway takes the first host address; a container needs at least one more.
        if v.prefixlen > 30:
            raise ValueError(f"{v} is too small: a /30 or larger is needed")
        return v


class CgroupConfig(_Section):
    parent: str = "rexecd"
    # Where the cgroup hierarchy is mounted (v2, or the v1 controller hierarchies).
    root: Path = Path("/sys/fs/cgroup")
    # With no usable hierarchy at root, containers would run without any limit: the
    # daemon refuses to start them (503) unless this says that is acceptable.
    allow_unlimited: bool = False

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"{str(v)!r} must be an absolute path")
        return v

    @field_validator("parent")
    @classmethod
    def _relative_path(cls, v: str) -> str:
        # Relative: below the daemon's own cgroup. Absolute ("/rexecd"): from the
        # hierarchy's root, outside the daemon's (the systemd unit uses that: see README).
        segments = (v[1:] if v.startswith("/") else v).split("/")
        if not all(_CGROUP_SEGMENT_RE.fullmatch(s) and s not in (".", "..") for s in segments):
            raise ValueError(
                f"{v!r} must be a cgroup path of [A-Za-z0-9_.-] segments (no '..', not the root)"
            )
        return v


class StorageConfig(_Section):
    # loop: one sparse ext4 image per container on a loop device, a hard limit.
    # auto: project quota where the state dir's file system enforces it (ext4 with
    # prjquota, xfs with pquota), else loop. Forcing "project" where it cannot work
    # stops start-up saying why. The default is loop: project quota holds against a
    # container only while its seccomp profile refuses FS_IOC_FSSETXATTR (the default
    # profile does; "unconfined" does not), else a file's owner can move its files
    # out of their project.
    method: Literal["auto", "loop", "project"] = "loop"


class UsernsConfig(_Section):
    # auto: each container in a user namespace of its own where the kernel can idmap
    # overlay layers (probed at start-up; the log says which and why), else as off.
    # on: the same, and start-up fails where it cannot. off: container root is host root.
    enabled: Literal["auto", "on", "off"] = "auto"
    # Host ids base + k*size .. base + (k+1)*size - 1 are the k-th range, leased in the
    # state database. container: a range per container, held until it is deleted.
    # user: one range shared by all containers of a user (a volume moved between them
    # keeps its owners), held while the user has any container. Never two users' either
    # way; a change applies to containers that get a range afterwards.
    mode: Literal["container", "user"] = "container"
    base: int = Field(default=1_000_000, ge=65536)
    size: int = Field(default=65536, ge=1024, le=1 << 24)
    # How many ranges (containers, or users with containers) there may be at once.
    count: PositiveInt = 4096

    @model_validator(mode="after")
    def _fits(self) -> UsernsConfig:
        if self.base + self.size * self.count > 1 << 32:
            raise ValueError("userns: base + size * count must stay below 2**32")
        return self


class TierLimits(_Section):
    # Every field is required: a half-written tier in a config file is an error,
    # never silently completed from another tier's numbers.
    cpu_millicores: PositiveInt
    memory_mb: PositiveInt
    disk_mb: PositiveInt
    containers: NonNegativeInt
    session_hours: float | None = Field(gt=0)
    network_mbps: PositiveInt
    # The two disk throttles are the exception to "every field is required": a tier
    # written before they existed keeps the behaviour it had then (no throttle).
    # Both apply to reads and writes alike; None = unlimited.
    disk_mbps: PositiveInt | None = None
    disk_iops: PositiveInt | None = None
    # Port forwards per container; like the throttles, optional in a tier written
    # before it existed (such a tier gets the free tier's number).
    port_forwards: NonNegativeInt = 5
    # Kept /home/user volumes (no container of their name any more) per user: how many
    # and their total size in MB. Past either, deleting a container removes the user's
    # least recently used kept volumes. Optional like the above (the free tier's numbers).
    kept_volumes: NonNegativeInt = 5
    kept_volumes_mb: NonNegativeInt = 51200

    # The seccomp profile of the tier's containers (and of every exec and terminal in
    # them): "default", "unconfined", or the absolute path of a JSON/YAML profile.
    # Optional like the ones above; the daemon compiles each profile at start-up.
    seccomp: str = "default"

    @field_validator("seccomp")
    @classmethod
    def _seccomp_ref(cls, v: str) -> str:
        if v not in ("default", "unconfined") and not v.startswith("/"):
            raise ValueError(f"{v!r} must be default, unconfined or an absolute path")
        return v


def _tier(name: str) -> TierLimits:
    # The tier table is data, spelled out once, in default.yaml (with its reasons).
    return TierLimits.model_validate(_embedded()["tiers"][name])


class TiersConfig(_Section):
    guest: TierLimits = Field(default_factory=lambda: _tier("guest"))
    free: TierLimits = Field(default_factory=lambda: _tier("free"))
    pro: TierLimits = Field(default_factory=lambda: _tier("pro"))
    enterprise: TierLimits = Field(default_factory=lambda: _tier("enterprise"))

    def get(self, tier: str) -> TierLimits:
        if tier not in TIER_NAMES:
            raise KeyError(f"unknown tier {tier!r}")
        limits: TierLimits = getattr(self, tier)
        return limits


class MinimumsConfig(_Section):
    memory_mb: PositiveInt = 256
    cpu_millicores: PositiveInt = 250
    disk_mb: PositiveInt = 1024


class DefaultsConfig(_Section):
    """What a new container gets when the request leaves a resource out (then clamped)."""

    memory_mb: PositiveInt = 512
    cpu_millicores: PositiveInt = 1000
    disk_mb: PositiveInt = 4096


class LimitsConfig(_Section):
    """Per-container limits that are the same for every tier."""

    # Processes and threads together: the cap that turns a fork bomb into a failed
    # fork() inside one container instead of an exhausted host pid space. init, a
    # shell and an exec need a handful, so a lower cap would only break containers.
    pids_max: int = Field(default=512, ge=16)


RateScope = Literal["read", "write", "admin"]


class RateNumbers(_Section):
    """Per-minute limits that replace the defaults for a tier or a scope; unset keeps them."""

    create_per_min: PositiveInt | None = None
    exec_per_min: PositiveInt | None = None
    ops_per_min: PositiveInt | None = None
    read_per_min: PositiveInt | None = None


class RateLimitsConfig(_Section):
    """Requests per user per minute, by class (API.md), with overrides by tier and scope."""

    create_per_min: PositiveInt = 10
    # Exec's own window. Unset, an exec counts against create_per_min, as it always has.
    exec_per_min: PositiveInt | None = None
    ops_per_min: PositiveInt = 60
    read_per_min: PositiveInt = 120
    # A token holding one of these scopes is never rate-limited (and its answers carry
    # no X-RateLimit headers). [] limits admins like everyone else.
    exempt_scopes: list[RateScope] = Field(default_factory=lambda: list[RateScope](["admin"]))
    # By the user's tier, then by the token's broadest scope (which wins where both set
    # a number): {tier or scope: {create_per_min, exec_per_min, ops_per_min, read_per_min}}.
    tiers: dict[str, RateNumbers] = Field(default_factory=dict)
    scopes: dict[RateScope, RateNumbers] = Field(default_factory=dict)

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, v: dict[str, RateNumbers]) -> dict[str, RateNumbers]:
        unknown = sorted(set(v) - set(TIER_NAMES))
        if unknown:
            raise ValueError(f"unknown tiers {unknown}; tiers are {list(TIER_NAMES)}")
        return v


class ConcurrencyConfig(_Section):
    """Requests one user may have in flight at once (429 past it): bounds what a single
    tenant can have the daemon doing, whatever its request rate."""

    exec_per_user: PositiveInt = 16
    # Every file endpoint, a download counted until its last byte is sent.
    file_ops_per_user: PositiveInt = 4
    # Open GET /api/containers/events sockets: each is a subscriber every event of the
    # user is queued for (up to 1024), held in the daemon for as long as it is open.
    event_streams_per_user: PositiveInt = 16


class CatalogueImage(_Section):
    """One entry of images/catalog.yaml (its header says what each key means)."""

    name: str
    aliases: list[str] = Field(default_factory=list)
    display_name: str
    description: str
    category: str
    tags: list[str] = Field(default_factory=list)
    popular: bool = False
    # What is pulled when the image is not local; None: local only (import or pull it).
    reference: str | None = None
    pull: bool = True
    # For `custom` only: the registries a custom_image may be pulled from. Any other
    # registry (a loopback or internal host above all) is local-only, so a tenant
    # cannot make the daemon fetch from wherever it names.
    registries: list[str] = Field(default_factory=lambda: ["docker.io"])

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _IMAGE_NAME_RE.fullmatch(v):
            raise ValueError(f"{v!r} must be a lower-case image name (NAME:TAG)")
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        for a in v:
            if not _SLUG_RE.fullmatch(a):
                raise ValueError(f"alias {a!r} must be lower-case [a-z0-9._:-]")
        return v

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        if v is not None and not _REFERENCE_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not an image reference (HOST/NAME:TAG)")
        return v


class UnpackLimits(_Section):
    """What one import or pull may add to the image store (see runtime/images/limits.py):
    bounds on a hostile layer that a few KB of gzip or zstd would blow up into a full
    disk, millions of inodes or unbounded time. Enforced while the layers stream in."""

    # Uncompressed tar bytes of the layers one import or pull unpacks (layers already
    # in the store cost nothing); also bounds a compressed outer archive's spool.
    max_image_mb: PositiveInt = 32768
    # Uncompressed bytes per compressed byte of one layer blob, counted from the start
    # of the blob, beyond a first ratio_slack_mb that is always allowed.
    max_layer_ratio: PositiveInt = 250
    ratio_slack_mb: NonNegativeInt = 128
    # Inodes one import or pull creates: members plus the parent directories they imply.
    max_entries: PositiveInt = 2_000_000
    max_path_depth: int = Field(default=256, ge=1, le=2048)
    # Bytes of a member name (and of a hardlink's target); PATH_MAX less the NUL at most.
    max_path_bytes: int = Field(default=4095, ge=1, le=4095)


class ImagesConfig(_Section):
    unpack: UnpackLimits = Field(default_factory=UnpackLimits)
    # The catalogue and the roles are data, spelled out once, in images/catalog.yaml.
    catalogue: list[CatalogueImage] = Field(
        default_factory=lambda: [CatalogueImage.model_validate(i) for i in _catalog()["images"]]
    )

    @field_validator("catalogue")
    @classmethod
    def _unique(cls, v: list[CatalogueImage]) -> list[CatalogueImage]:
        # A name or alias that meant two images would make a create ambiguous.
        _check_unique([n for i in v for n in (i.name, *i.aliases)], "image name or alias")
        return v


PackageManager = Literal["apt", "apk", "pacman", "dnf", "yum", "zypper"]


class RoleConfig(_Section):
    id: str
    name: str
    description: str
    # The names GET /api/roles shows; `install` has each package manager's own names.
    packages: list[str] = Field(default_factory=list)
    install: dict[PackageManager, list[str]] = Field(default_factory=dict)
    # Shell steps run after the packages are installed.
    setup: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG_RE.fullmatch(v):
            raise ValueError(f"{v!r} must be lower-case [a-z0-9._:-]")
        return v


class RegistryCredential(_Section):
    username: str
    # One of the two: the password itself, or a file holding it (kept out of the config).
    password: str | None = Field(default=None, repr=False)
    password_file: Path | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> RegistryCredential:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("give exactly one of password and password_file")
        return self

    def secret(self) -> str:
        if self.password is not None:
            return self.password
        assert self.password_file is not None
        return self.password_file.read_text("utf-8").strip()


class RegistriesConfig(_Section):
    """How images are pulled from OCI registries (the distribution API)."""

    # false: never contact a registry; only local images are used.
    pull: bool = True
    # Registry host -> mirrors tried first, in order ("host[:port]" or a URL).
    mirrors: dict[str, list[str]] = Field(default_factory=dict)
    # true: a registry that has mirrors is reached only through them.
    mirrors_only: bool = False
    # Hosts ("host[:port]") reached over plain HTTP, or HTTPS without verification, as
    # Docker's insecure-registries. Loopback addresses always are.
    insecure: list[str] = Field(default_factory=list)
    # Registry host -> basic-auth credentials (also sent to its token service).
    credentials: dict[str, RegistryCredential] = Field(default_factory=dict)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Longest silence on a connection before it is dropped (and the blob resumed).
    read_timeout_s: float = Field(default=30.0, gt=0)
    # Attempts per request after the first (connection lost, 5xx), with backoff.
    retries: NonNegativeInt = 5
    max_concurrent_downloads: int = Field(default=3, ge=1, le=16)

    @field_validator("mirrors")
    @classmethod
    def _mirror_urls(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for host, urls in v.items():
            for u in (host, *urls):
                if not _REGISTRY_RE.fullmatch(u):
                    raise ValueError(f"{u!r} is not a registry (host[:port] or http(s)://host)")
        return v


MirrorManager = Literal["apt", "apk", "dnf", "pacman"]


class PackagesConfig(_Section):
    """How a role's packages are installed (see service/roles.py)."""

    # Package manager -> the lines of its sources file used instead of the image's own
    # while a role installs: apt a sources.list ("deb http://... bookworm main"), apk an
    # /etc/apk/repositories, dnf (and yum) a .repo file, pacman a mirrorlist
    # ("Server = ..."). Install time only: the image's own sources stay in the layer.
    mirrors: dict[MirrorManager, list[str]] = Field(default_factory=dict)
    # A role install that has not finished by then is killed and the create fails.
    install_timeout_s: PositiveInt = 1800
    # Bytes of install output kept in the container's log (<state_dir>/logs/<id>.log).
    log_max_bytes: int = Field(default=8 << 20, ge=4096)

    @field_validator("mirrors")
    @classmethod
    def _lines(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for manager, lines in v.items():
            for line in lines:
                if not line.strip() or any(c in line for c in "\r\n\0"):
                    raise ValueError(f"{manager}: a mirror line must be one non-empty line")
        return v


class TerminalConfig(_Section):
    idle_timeout_s: PositiveInt = 600
    # API.md promises at least 64 KiB of scrollback on reconnect.
    scrollback_bytes: int = Field(default=262144, ge=65536)
    # Live sessions per container: each holds a PTY master, a pidfd and its scrollback
    # in the daemon, whose memory no container cgroup pays for.
    max_sessions: int = Field(default=16, ge=1)


class HttpConfig(_Section):
    """How long a client connection may take, and how many one address may hold, before
    it has shown itself: slow or silent clients are closed, not kept."""

    header_timeout_s: float = Field(default=10, gt=0)
    keepalive_timeout_s: float = Field(default=60, gt=0)
    body_timeout_s: float = Field(default=30, gt=0)
    # TCP connections per client address that have not made an authenticated request
    # yet; 0 = no cap. Unix socket clients are not counted (the socket is 0660).
    unauthenticated_per_ip: NonNegativeInt = 64
    # TLS for every TCP listener (PEM files, read at start-up); both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("http.tls_cert and http.tls_key go together: give both or neither")
        return self


class RetentionConfig(_Section):
    """How long what the daemon records outlives its use; the housekeeping pass applies
    it every ``sweep_interval_s`` (and the event log's row cap on insert as well)."""

    events_max_rows: PositiveInt = 10000
    events_max_days: PositiveInt = 30
    # A kept volume unused this long is removed; null keeps them until the tier's cap.
    kept_volume_days: PositiveInt | None = 30
    # Expired tokens stay listed this long; revoked ones go at the next pass.
    expired_token_days: NonNegativeInt = 7
    sweep_interval_s: PositiveInt = 300


class ExecConfig(_Section):
    # A default above the max is not refused: the max wins (see quotas.exec_timeout).
    default_timeout_s: PositiveInt = 60
    max_timeout_s: PositiveInt = 300
    output_cap_bytes: PositiveInt = 1048576


class LogsConfig(_Section):
    # Each container's log (<state_dir>/logs/<id>.log) keeps at most this many bytes:
    # its tail. Output past what the writer can take at once is dropped, not queued.
    max_bytes: PositiveInt = 1048576


class LxcfsConfig(_Section):
    # lxcfs's /proc files bound into containers (free, top, uptime see the limits):
    # "auto" uses them when lxcfs is mounted at ``dir``, "off" never does.
    mode: Literal["auto", "off"] = "auto"
    dir: Path = Path("/var/lib/lxcfs")


class AuthConfig(_Section):
    # API.md: ``?token=`` on a WebSocket upgrade is a legacy fallback the config must
    # switch on; a URL is copied into proxy logs and browser histories.
    ws_query_token: bool = False


# --- the whole document ----------------------------------------------------------------


class Config(_Section):
    """The daemon's configuration; ``Config()`` equals the embedded default.yaml."""

    listen: list[str] = Field(default_factory=lambda: ["unix:/run/rexecd/rexecd.sock"])
    http: HttpConfig = Field(default_factory=HttpConfig)
    state_dir: Path = Path("/var/lib/rexecd")
    run_dir: Path = Path("/run/rexecd")
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    cgroup: CgroupConfig = Field(default_factory=CgroupConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    userns: UsernsConfig = Field(default_factory=UsernsConfig)
    tiers: TiersConfig = Field(default_factory=TiersConfig)
    minimums: MinimumsConfig = Field(default_factory=MinimumsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    roles: list[RoleConfig] = Field(
        default_factory=lambda: [RoleConfig.model_validate(r) for r in _catalog()["role_docs"]]
    )
    registries: RegistriesConfig = Field(default_factory=RegistriesConfig)
    packages: PackagesConfig = Field(default_factory=PackagesConfig)
    terminal: TerminalConfig = Field(default_factory=TerminalConfig)
    exec: ExecConfig = Field(default_factory=ExecConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)
    lxcfs: LxcfsConfig = Field(default_factory=LxcfsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    stop_timeout_s: NonNegativeInt = 10
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one listen address is needed")
        for item in v:
            parse_listen(item)
        _check_unique(v, "listen address")
        return v

    @field_validator("state_dir", "run_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # The daemon's cwd is not meaningful; a relative path would move with it.
        if not v.is_absolute():
            raise ValueError(f"{str(v)!r} must be an absolute path")
        return v

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, v: list[RoleConfig]) -> list[RoleConfig]:
        _check_unique([r.id for r in v], "role id")
        return v

    @model_validator(mode="after")
    def _tiers_above_minimums(self) -> Config:
        pairs = (
            ("memory_mb", "memory_mb"),
            ("cpu_millicores", "cpu_millicores"),
            ("disk_mb", "disk_mb"),
        )
        for tier in TIER_NAMES:
            limits = self.tiers.get(tier)
            for tier_key, min_key in pairs:
                have, floor = getattr(limits, tier_key), getattr(self.minimums, min_key)
                if have < floor:
                    raise ValueError(
                        f"tiers.{tier}.{tier_key} ({have}) is below minimums.{min_key} ({floor})"
                    )
        return self

    def listen_addresses(self) -> list[UnixListen | TcpListen]:
        return [parse_listen(v) for v in self.listen]


def _check_unique(values: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"duplicate {what} {v!r}")
        seen.add(v)


# --- loading ---------------------------------------------------------------------------


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _validate(data: Any) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def _parse(text: str, origin: str) -> Config:
    try:
        # _StrictLoader is a SafeLoader: no arbitrary object construction.
        data = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    return _validate(data)


def load_config(path: Path | None, *, announce: bool = True) -> Config:
    """Load ``path``; without a path, the embedded default. A missing file is an error.

    A key absent from the file takes the built-in default of that key (the same
    value default.yaml spells out); a tier, being one unit, must be given whole.
    Which file was used is logged (``announce``), so a mistyped ``--config`` does not go
    unnoticed by a daemon; a one-shot tool whose output is its answer passes False.
    """
    say = log.info if announce else log.debug
    if path is None:
        say("config: no file given, using the embedded default")
        return _parse(default_config_text(), "embedded default.yaml")
    if not path.exists():
        # A mistyped --config must not start a daemon on defaults it was not meant to use.
        raise ConfigError(f"{path}: config file does not exist")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    say("config: using %s", path)
    return _parse(text, str(path))


def apply_overrides(
    cfg: Config,
    *,
    state_dir: Path | str | None = None,
    run_dir: Path | str | None = None,
    listen: Sequence[str] | None = None,
    subnet: str | None = None,
    bridge: str | None = None,
    nft_table: str | None = None,
    cgroup_parent: str | None = None,
) -> Config:
    """Return a new config with the command-line values put in; None (or empty) keeps a key.

    Relative directories from the command line are taken relative to the cwd of
    the command, which is what a user typing them means.
    """
    data = cfg.model_dump()
    if state_dir is not None:
        data["state_dir"] = Path(state_dir).absolute()
    if run_dir is not None:
        data["run_dir"] = Path(run_dir).absolute()
    if listen:
        data["listen"] = list(listen)
    if subnet is not None:
        data["network"]["subnet"] = subnet
    if bridge is not None:
        data["network"]["bridge"] = bridge
    if nft_table is not None:
        data["network"]["nft_table"] = nft_table
    if cgroup_parent is not None:
        data["cgroup"]["parent"] = cgroup_parent
    return _validate(data)
