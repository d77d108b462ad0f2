"""``rexecd serve``: wires config, state, runtime, network and the HTTP app, and runs them
until SIGTERM. Containers outlive the daemon; a new daemon re-adopts them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from pathlib import Path

from aiohttp import web

from rexecd import __version__
from rexecd.config import TIER_NAMES, Config, ConfigError, TcpListen, UnixListen
from rexecd.runtime.cgroups import open_driver_or_none
from rexecd.runtime.container import Runtime
from rexecd.runtime.images import ImageStore
from rexecd.runtime.seccomp import SeccompFilters
from rexecd.runtime.spawner import Spawner
from rexecd.runtime.storage import choose_storage
from rexecd.service.events import EventBus
from rexecd.service.manager import ContainerManager
from rexecd.service.ratelimit import RateLimiter
from rexecd.service.store import Store

log = logging.getLogger(__name__)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _network(cfg: Config) -> tuple[object | None, object | None]:
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
    )
    return Network(net), PortForwarder(net)


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


async def _listen(runner: web.AppRunner, cfg: Config) -> list[str]:
    where = []
    for addr in cfg.listen_addresses():
        if isinstance(addr, UnixListen):
            path = Path(addr.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()  # stale socket of a previous daemon
            site: web.BaseSite = web.UnixSite(runner, str(path))
            await site.start()
            os.chmod(path, 0o660)
            where.append(f"unix:{path}")
        else:
            assert isinstance(addr, TcpListen)
            site = web.TCPSite(runner, addr.host, addr.port)
            await site.start()
            where.append(f"tcp:{addr.host}:{addr.port}")
    return where


async def serve(cfg: Config, ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT; containers are left running on exit."""
    import prctl

    from rexecd.api.app import make_app
    from rexecd.api.terminal import add_terminal_routes

    # Containers re-parent to us if the spawner dies, so we can still reap them.
    prctl.set_child_subreaper(True)
    _private_dir(cfg.state_dir)
    _private_dir(cfg.run_dir)
    (cfg.state_dir / "tmp").mkdir(mode=0o700, exist_ok=True)
    # First: a storage method that cannot work here stops start-up before anything
    # (the spawner process, the database) exists that would need undoing.
    storage = choose_storage(cfg.state_dir, cfg.run_dir, cfg.storage.method)
    seccomp = _seccomp(cfg)
    store = Store(cfg.state_dir)
    spawner = Spawner()
    runtime = Runtime(
        cfg.state_dir, cfg.run_dir, open_driver_or_none(cfg.cgroup.parent), spawner, seccomp
    )
    images = ImageStore(cfg.state_dir / "images")
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
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    try:
        await manager.start_up()
        app = make_app(
            manager,
            store,
            cfg,
            RateLimiter(cfg.rate_limits),
            version=__version__,
            build="dev",
            extra_routes=lambda a: add_terminal_routes(a, manager, cfg),
        )
        runner = web.AppRunner(app, shutdown_timeout=5.0)
        await runner.setup()
        where = await _listen(runner, cfg)
        print(f"rexecd {__version__} listening on {', '.join(where)}", file=sys.stderr, flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: containers keep running")
    finally:
        if runner is not None:
            await runner.cleanup()
        await manager.shut_down()
        spawner.close()
        store.close()
