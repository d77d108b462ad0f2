"""``rexecd serve``: wires config, state, runtime, network and the HTTP app, and runs them
until SIGTERM. Containers outlive the daemon; a new daemon re-adopts them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from rexecd import __version__, owner, systemd
from rexecd.api.guard import ConnectionGuard, GuardedSite, GuardLimits
from rexecd.config import TIER_NAMES, Config, ConfigError, TcpListen, UnixListen
from rexecd.errors import RuntimeFailure, RuntimeUnavailable
from rexecd.logs import REQUEST_ID
from rexecd.runtime.cgroups import choose_driver
from rexecd.runtime.container import Runtime
from rexecd.runtime.images import ImageStore
from rexecd.runtime.seccomp import SeccompFilters
from rexecd.runtime.spawner import Spawner
from rexecd.runtime.storage import choose_storage
from rexecd.runtime.userns import IdRanges
from rexecd.service.events import EventBus
from rexecd.service.manager import ContainerManager
from rexecd.service.optional import ContainerNetwork, Forwarder
from rexecd.service.ratelimit import RateLimiter
from rexecd.service.store import Store

log = logging.getLogger(__name__)

BACKLOG = 128


def _private_dir(path: Path, mode: int = 0o700) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


def _network(cfg: Config) -> tuple[ContainerNetwork | None, Forwarder | None]:
    """The container network and its port forwarder (both None without networking)."""
    if not cfg.network.enabled:
        return None, None
    from rexecd.runtime.network import Network, NetworkConfig, PortForwarder

    net = NetworkConfig(
        bridge=cfg.network.bridge,
        subnet=str(cfg.network.subnet),
        nft_table=cfg.network.nft_table,
        gateway_tcp_ports=tuple(cfg.network.gateway_tcp_ports),
        gateway_udp_ports=tuple(cfg.network.gateway_udp_ports),
        max_flows=cfg.network.max_flows_per_container,
    )
    return Network(net), PortForwarder(net)


def _userns(cfg: Config) -> IdRanges | None:
    """The id ranges containers' user namespaces get, or None (container root is host
    root): ``userns.enabled`` off, or auto where the kernel cannot idmap overlay layers
    on the state dir's file system (probed once, in a process of its own since the
    probe forks and mounts; the log says what failed)."""
    u = cfg.userns
    if u.enabled == "off":
        log.info("user namespaces: off (userns.enabled)")
        return None
    probe = subprocess.run(
        [sys.executable, "-m", "rexecd.runtime.userns", str(cfg.state_dir / "tmp")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    answer = probe.stdout.strip() or probe.stderr.strip()[-500:] or f"exit {probe.returncode}"
    if probe.returncode == 0 and answer == "ok":
        log.info("user namespaces: on (container root is host ids %d + k*%d)", u.base, u.size)
        return IdRanges(u.base, u.size, u.count)
    if u.enabled == "on":
        raise RuntimeFailure("user namespaces", f"userns.enabled is on, but {answer}")
    log.warning("user namespaces: off, the kernel cannot run them here: %s", answer)
    return None


def _project_quota_safe(cfg: Config, userns_on: bool) -> bool:
    """Whether no container can move its files out of their quota project: in a user
    namespace the kernel refuses any change of project id, and the default seccomp
    profile refuses FS_IOC_FSSETXATTR itself."""
    return userns_on or all(cfg.tiers.get(t).seccomp == "default" for t in TIER_NAMES)


def _seccomp(cfg: Config) -> SeccompFilters:
    """Every tier's seccomp profile, compiled now: a bad profile stops start-up."""
    filters = SeccompFilters()
    for tier in TIER_NAMES:
        ref = cfg.tiers.get(tier).seccomp
        try:
            compiled = filters.compiled(ref)
        except ConfigError as exc:
            raise ConfigError(f"tiers.{tier}.seccomp: {exc}") from None
        if compiled.unknown:
            log.info(
                "seccomp profile %s: this libseccomp does not know %s (they get the "
                "default action)",
                ref,
                ", ".join(compiled.unknown),
            )
    return filters


@dataclass
class Listener:
    """A bound, listening socket for one ``listen`` address."""

    where: str
    sock: socket.socket
    # A unix socket's path, and the directories made for it: undone if start-up fails.
    path: Path | None = None
    made_dirs: list[Path] = field(default_factory=list)
    serving: bool = False

    @property
    def tcp(self) -> bool:
        return self.sock.family in (socket.AF_INET, socket.AF_INET6)

    def close(self, unlink: bool) -> None:
        self.sock.close()
        # A socket passed by systemd (path None) is the .socket unit's: never unlinked.
        if unlink and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            for d in reversed(self.made_dirs):
                with contextlib.suppress(OSError):
                    d.rmdir()


def bind_listeners(cfg: Config) -> list[Listener]:
    """Bind every listen address. Done first, before the daemon makes any host state
    (bridge, nft tables, cgroups, state dir): a busy address then stops start-up with
    nothing to undo. Raises ``RuntimeUnavailable`` naming the address."""
    bound: list[Listener] = []
    try:
        for addr in cfg.listen_addresses():
            bound.extend(_bind(addr))
    except BaseException:
        for lst in bound:
            lst.close(unlink=True)
        raise
    return bound


def _bind(addr: UnixListen | TcpListen) -> list[Listener]:
    if isinstance(addr, UnixListen):
        where = f"unix:{addr.path}"
        made = _make_parents(addr.path)
        try:
            return [Listener(where, _bind_unix(addr.path), addr.path, made)]
        except OSError as exc:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise _cannot_listen(where, exc) from None
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    where = f"tcp:{host}:{addr.port}"
    socks: list[socket.socket] = []
    try:
        # A name may stand for several addresses (localhost: 127.0.0.1 and ::1).
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _name, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise _cannot_listen(where, exc) from None
    return [Listener(f"tcp:{host}:{s.getsockname()[1]}", s) for s in socks]


def _cannot_listen(where: str, exc: OSError) -> RuntimeUnavailable:
    return RuntimeUnavailable(f"cannot listen on {where}: {exc.strerror or exc}")


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of ``path``; returns the ones made, outermost first."""
    missing = [d for d in path.parents if not d.exists()]
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return list(reversed(missing))


def _bind_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            if _unix_socket_in_use(path):
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            path.unlink()  # stale socket of a previous daemon
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _unix_socket_in_use(path: Path) -> bool:
    """Whether a process listens on ``path``: only a dead daemon's socket is replaced."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True  # a full backlog: someone is there
    finally:
        probe.close()
    return True


def inherited_listeners() -> list[Listener]:
    """The sockets of socket activation (``LISTEN_FDS``), when systemd passed any.

    They replace the ``listen`` setting: the .socket unit says where to listen.
    """
    try:
        return [Listener(f"{s.where} (systemd fd {s.name})", s.sock) for s in systemd.listen_fds()]
    except systemd.ActivationError as exc:
        raise RuntimeUnavailable(str(exc)) from None


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The server TLS context for TCP listeners, or None without ``http.tls_cert``."""
    h = cfg.http
    if h.tls_cert is None or h.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(h.tls_cert, h.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeUnavailable(
            f"cannot load TLS certificate {h.tls_cert} / key {h.tls_key}: {exc}"
        ) from None
    return ctx


def _warn_plain_tcp(listeners: list[Listener], tls: ssl.SSLContext | None) -> None:
    """Tokens cross a plain TCP listener in clear text: say so unless only loopback hears."""
    if tls is not None:
        return
    for lst in listeners:
        if not lst.tcp:
            continue
        host = lst.sock.getsockname()[0]
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            log.warning(
                "plain HTTP on %s, which is not a loopback address: API tokens cross the "
                "network unencrypted (set http.tls_cert and http.tls_key)",
                lst.where,
            )


async def _serve_on(
    runner: web.AppRunner,
    listeners: list[Listener],
    guard: ConnectionGuard,
    tls: ssl.SSLContext | None,
) -> None:
    for lst in listeners:
        await GuardedSite(runner, lst.sock, guard, ssl_context=tls if lst.tcp else None).start()
        lst.serving = True


async def serve(cfg: Config, ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT; containers are left running on exit."""
    tls = tls_context(cfg)
    listeners = inherited_listeners() or bind_listeners(cfg)
    try:
        await _run(cfg, ready, listeners, tls)
    except BaseException:
        for lst in listeners:
            lst.close(unlink=not lst.serving)
        raise


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give each request an id that its log lines (and the access line) carry."""
    rid = uuid.uuid4().hex[:16]
    request["request_id"] = rid
    REQUEST_ID.set(rid)
    return await handler(request)


def _host_resources(cfg: Config, cgroups: Any) -> tuple[list[owner.Resource], ...]:
    """The marked host resources: (made before start-up, existing after start-up)."""
    before: list[owner.Resource] = []
    after: list[owner.Resource] = []
    if cgroups is not None:
        dirs = getattr(cgroups, "parent_dirs", None)
        paths = set(dirs.values()) if isinstance(dirs, dict) else {cgroups.parent_dir}
        after.extend(owner.cgroup_resource(Path(p)) for p in sorted(paths))
    if cfg.network.enabled:
        before.extend(owner.nft_resource(f, cfg.network.nft_table) for f in ("inet", "bridge"))
        after.append(owner.bridge_resource(cfg.network.bridge))
    return before, after


async def _report(manager: ContainerManager, interval: float | None, stop: asyncio.Event) -> None:
    """STATUS= with the container counts, and WATCHDOG=1 pings while the loop is alive."""
    period = min(interval, 10.0) if interval else 10.0
    while not stop.is_set():
        try:
            health = await manager.health()
            status = (
                f"STATUS={health.containers_running} running, "
                f"{health.containers_total} containers in all"
            )
        except Exception:  # the watchdog ping must not die with one bad read
            status = "STATUS=serving"
        systemd.notify(status, *(["WATCHDOG=1"] if interval else []))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period)


async def _run(
    cfg: Config,
    ready: asyncio.Event | None,
    listeners: list[Listener],
    tls: ssl.SSLContext | None,
) -> None:
    import prctl

    from rexecd.api.accesslog import scrub_log_handlers

    scrub_log_handlers()
    # Containers re-parent to us if the spawner dies, so we can still reap them.
    prctl.set_child_subreaper(True)
    _private_dir(cfg.state_dir)
    # One daemon per state dir: before anything in it or on the host is touched.
    lock = owner.StateDirLock(cfg.state_dir)
    try:
        await _run_locked(cfg, ready, listeners, tls)
    finally:
        lock.release()


async def _run_locked(
    cfg: Config,
    ready: asyncio.Event | None,
    listeners: list[Listener],
    tls: ssl.SSLContext | None,
) -> None:
    from rexecd.api.accesslog import AccessLogger
    from rexecd.api.app import make_app

    started = time.monotonic()
    cgroups = choose_driver(cfg.cgroup.parent, cfg.cgroup.root)
    # Another live daemon's cgroup parent, nft tables or bridge: refuse, touching nothing
    # (its containers would look like orphans to reconcile away).
    me = owner.state_owner(cfg.state_dir)
    made_first, made_later = _host_resources(cfg, cgroups.driver)
    await asyncio.to_thread(owner.check, made_first + made_later, me)
    # Search-only for others: the socket group must reach the API socket inside; what
    # the daemon keeps here is in 0700 directories below.
    _private_dir(cfg.run_dir, 0o711)
    (cfg.state_dir / "tmp").mkdir(mode=0o700, exist_ok=True)
    # First: a storage method that cannot work here stops start-up before anything
    # (the spawner process, the database) exists that would need undoing.
    ranges = _userns(cfg)
    storage = choose_storage(
        cfg.state_dir,
        cfg.run_dir,
        cfg.storage.method,
        project_safe=_project_quota_safe(cfg, ranges is not None),
    )
    seccomp = _seccomp(cfg)
    store = Store(cfg.state_dir)
    spawner = Spawner()
    runtime = Runtime(cfg.state_dir, cfg.run_dir, cgroups.driver, spawner, seccomp, ranges)
    images = ImageStore(cfg.state_dir / "images", limits=cfg.images.unpack)
    network, forwarder = _network(cfg)
    manager = ContainerManager(
        cfg,
        store,
        runtime,
        images,
        EventBus(),
        network,
        storage,
        forwarder=forwarder,
        no_cgroups_reason=cgroups.reason,
    )
    if (degraded := manager.degraded()) is not None:
        log.warning("degraded: %s", degraded)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    reporter: asyncio.Future[None] | None = None
    try:
        await asyncio.to_thread(owner.claim, made_first, me)
        systemd.notify("STATUS=starting: reconciling containers with the host")
        await manager.start_up()
        await asyncio.to_thread(owner.claim, made_later, me)
        app = make_app(
            manager,
            store,
            cfg,
            RateLimiter(cfg.rate_limits),
            version=__version__,
            build="dev",
        )
        h = cfg.http
        guard = ConnectionGuard(
            GuardLimits(h.header_timeout_s, h.body_timeout_s, h.unauthenticated_per_ip)
        )
        guard.install(app)
        app.middlewares.insert(0, request_id_middleware)
        # Requests still running at SIGTERM get stop_timeout_s in all, then are cancelled
        # (an exec's command is killed with its request). aiohttp spends the timeout
        # twice over: waiting for handlers to end, then for cancelled ones to unwind,
        # and it cancels only at the end of the second wait.
        runner = web.AppRunner(
            app,
            shutdown_timeout=cfg.stop_timeout_s / 2,
            access_log_class=AccessLogger,
            keepalive_timeout=h.keepalive_timeout_s,
        )
        await runner.setup()
        _warn_plain_tcp(listeners, tls)
        await _serve_on(runner, listeners, guard, tls)
        where = ", ".join(f"{lst.where}{' (tls)' if tls and lst.tcp else ''}" for lst in listeners)
        print(f"rexecd {__version__} listening on {where}", file=sys.stderr, flush=True)
        log.info("ready in %.1fs: serving on %s, reconcile done", time.monotonic() - started, where)
        # READY only now: the API answers and the containers are reconciled.
        systemd.notify("READY=1", f"MAINPID={os.getpid()}")
        reporter = asyncio.ensure_future(_report(manager, systemd.watchdog_interval(), stop))
        if ready is not None:
            ready.set()
        await stop.wait()
        systemd.notify("STOPPING=1", "STATUS=shutting down: containers keep running")
        log.info("shutting down: containers keep running")
        await reporter
    finally:
        if reporter is not None and not reporter.done():
            reporter.cancel()
        if runner is not None:
            await runner.cleanup()
        await manager.shut_down()
        spawner.close()
        store.close()
