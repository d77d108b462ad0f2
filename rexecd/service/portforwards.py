"""Port forwards of running containers: tier limit, host port choice, record and nft in step."""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from collections.abc import Iterator
from typing import cast

from rexecd.config import Config
from rexecd.errors import (
    Conflict,
    ContainerNotRunning,
    InvalidRequest,
    NoNetwork,
    PortForwardNotFound,
    QuotaExceeded,
    RexecError,
    RuntimeUnavailable,
)
from rexecd.models import ContainerRecord, PortForwardCreate, PortForwardOut, PortProtocol, utcnow
from rexecd.service import quotas, states
from rexecd.service.optional import Forwarder
from rexecd.service.states import State
from rexecd.service.store import PortForwardRecord, Store

log = logging.getLogger(__name__)

# Forwards listen on the host's IPv4 loopback only (see runtime PortForwarder).
HOST = "127.0.0.1"
# Ports of the range an automatic choice tries before giving up: each try that finds
# the port bound by a host process costs an nft listing, so a crowded range must not
# hold a request (and the container's lock) for long.
MAX_TRIES = 128


class PortForwards:
    """The daemon's port forwards: 127.0.0.1:host_port -> a running container's port.

    The SQLite row is what the API reports and what survives a restart; the element
    in the nft map (``PortForwarder``) is what makes traffic flow. One lock covers
    both, so the two never disagree while the daemon runs: on add the nft element
    goes in first and the row follows (a crash in between leaves an element without
    a row, which ``reconcile`` removes, rather than a row promising a forward that
    does not exist); removal goes the other way round.

    A forward belongs to one run of its container: stopping the container (by the
    API, by its init exiting, by session expiry) removes its forwards, since the
    next run may get a different address and the client asked for this one.

    Blocking (nft, SQLite): the manager calls these methods in worker threads, with
    the container's lock held, so a stop never races an add.
    """

    def __init__(self, cfg: Config, store: Store, forwarder: Forwarder) -> None:
        self.cfg = cfg
        self.store = store
        self.forwarder = forwarder
        self._mutex = threading.Lock()

    # -- API operations ----------------------------------------------------------------

    def add(self, rec: ContainerRecord, tier: str, req: PortForwardCreate) -> PortForwardOut:
        """Forward a host port (``req.host_port``, or a free one of the range) to ``rec``."""
        if not self.cfg.network.enabled:
            # First, as ever: with networking off no container has an address either.
            raise RuntimeUnavailable("port forwarding needs container networking, which is off")
        if states.of(rec) is not State.RUNNING or rec.pid is None:
            raise ContainerNotRunning("container is not running", status=rec.status)
        if rec.ip_address is None:
            raise NoNetwork("container has no network (network_mode none): nothing to forward to")
        lo, hi = self.cfg.network.port_forward_min, self.cfg.network.port_forward_max
        # 0 is "not given", as for the sizes of a create.
        wanted = req.host_port or None
        if wanted is not None and not lo <= wanted <= hi:
            raise InvalidRequest(
                f"host_port {wanted} is outside the allowed range {lo}-{hi}",
                host_port=wanted,
                allowed_range=[lo, hi],
            )
        limit = quotas.tier_limits(self.cfg, tier).port_forwards
        proto = req.protocol
        with self._mutex:
            mine = self.store.list_port_forwards(rec.db_id)
            if len(mine) >= limit:
                raise QuotaExceeded(
                    "port forward limit reached", current=len(mine), limit=limit, tier=tier
                )
            taken = {f.host_port for f in self.store.list_port_forwards() if f.protocol == proto}
            if wanted is not None and wanted in taken:
                raise self._taken(wanted, proto)
            candidates = [wanted] if wanted is not None else self._free_ports(lo, hi, taken)
            for port in candidates:
                try:
                    self.forwarder.add(port, rec.ip_address, req.container_port, proto)
                except Conflict:
                    # Bound by a host process (or a stale nft element): the runtime's
                    # message may name another tenant's address, so it is not passed on.
                    if wanted is not None:
                        raise self._taken(port, proto) from None
                    continue
                row = PortForwardRecord(
                    id=str(uuid.uuid4()),
                    container_db_id=rec.db_id,
                    protocol=proto,
                    host_port=port,
                    container_port=req.container_port,
                    created_at=utcnow(),
                )
                try:
                    self.store.insert_port_forward(row)
                except BaseException:
                    self._remove_element(port, proto)
                    raise
                log.info(
                    "port forward %s:%d/%s -> %s (%s):%d",
                    HOST,
                    port,
                    proto,
                    rec.name,
                    rec.ip_address,
                    req.container_port,
                )
                return _out(rec, row)
        raise RuntimeUnavailable(
            f"no free host port for {proto} in {lo}-{hi}", allowed_range=[lo, hi]
        )

    def for_container(self, rec: ContainerRecord) -> list[PortForwardOut]:
        return [_out(rec, row) for row in self.store.list_port_forwards(rec.db_id)]

    def remove(self, rec: ContainerRecord, forward_id: str) -> PortForwardOut:
        """Remove one of ``rec``'s forwards; another container's id is a 404 like an unknown one."""
        with self._mutex:
            row = self.store.get_port_forward(forward_id)
            if row is None or row.container_db_id != rec.db_id:
                raise PortForwardNotFound("port forward not found")
            self.forwarder.remove(row.host_port, row.protocol)
            self.store.delete_port_forward(row.id)
        return _out(rec, row)

    # -- container lifecycle -----------------------------------------------------------

    def release(self, rec: ContainerRecord) -> None:
        """Remove every forward of ``rec`` (it stopped or is being deleted). Never raises
        for the nft side: the container's release must go on, and start-up reconcile
        (and the network's own detach) clear what is left."""
        with self._mutex:
            rows = self.store.list_port_forwards(rec.db_id)
            for row in rows:
                self._remove_element(row.host_port, row.protocol)
                self.store.delete_port_forward(row.id)

    def reconcile(self, live: set[str]) -> list[str]:
        """At start-up: keep the forwards of running containers (their host ports held
        again, their nft elements re-installed if missing), drop the rows of any other,
        and remove nft elements no row explains. ``live`` holds the runtime ids of the
        re-adopted containers. Returns what changed, for the log."""
        changed: list[str] = []
        with self._mutex:
            by_db_id = {r.db_id: r for r in self.store.list_containers()}
            wanted: dict[tuple[str, int], tuple[str, int, PortForwardRecord]] = {}
            for row in self.store.list_port_forwards():
                c = by_db_id.get(row.container_db_id)
                if (
                    c is None
                    or c.id not in live
                    or states.of(c) is not State.RUNNING
                    or not c.ip_address
                ):
                    self.store.delete_port_forward(row.id)
                    changed.append(f"dropped record {row.host_port}/{row.protocol}")
                    continue
                wanted[(row.protocol, row.host_port)] = (c.ip_address, row.container_port, row)
            have: dict[tuple[str, int], tuple[str, int]] = {
                (f.proto, f.host_port): (f.container_ip, f.container_port)
                for f in self.forwarder.list()
            }
            for (nft_proto, nft_port), target in have.items():
                entry = wanted.get((nft_proto, nft_port))
                if entry is None or entry[:2] != target:
                    self.forwarder.remove(nft_port, nft_proto)
                    changed.append(f"removed nft {nft_port}/{nft_proto}")
            for (proto, port), (ip, cport, row) in wanted.items():
                # Every kept forward is added again, element present or not: that
                # takes its host port back, which the last daemon held until it died.
                try:
                    self.forwarder.add(port, ip, cport, proto)
                    if have.get((proto, port)) != (ip, cport):
                        changed.append(f"restored nft {port}/{proto}")
                except RexecError as exc:
                    # The port was taken on the host while the daemon was down: the
                    # forward cannot be kept (the host service owns the port now), so
                    # its element and record go.
                    log.warning("port forward %d/%s not restored: %s", port, proto, exc.message)
                    self._remove_element(port, proto)
                    self.store.delete_port_forward(row.id)
                    changed.append(f"dropped record {port}/{proto}")
        return changed

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _taken(port: int, proto: str) -> Conflict:
        return Conflict(
            f"host port {port}/{proto} is already in use", host_port=port, protocol=proto
        )

    @staticmethod
    def _free_ports(lo: int, hi: int, taken: set[int]) -> Iterator[int]:
        """Up to MAX_TRIES ports of [lo, hi] not recorded, from a random start.

        Random rather than lowest-first: several daemons on one host share 127.0.0.1
        but not each other's records, and a random start keeps them from all reaching
        for the same port first."""
        span = hi - lo + 1
        start = secrets.randbelow(span)
        tries = 0
        for i in range(span):
            port = lo + (start + i) % span
            if port in taken:
                continue
            yield port
            tries += 1
            if tries >= MAX_TRIES:
                return

    def _remove_element(self, port: int, proto: str) -> None:
        try:
            self.forwarder.remove(port, proto)
        except RexecError as exc:
            log.warning("removing port forward %d/%s: %s", port, proto, exc.message)


def _out(rec: ContainerRecord, row: PortForwardRecord) -> PortForwardOut:
    return PortForwardOut(
        id=row.id,
        container_id=rec.id,
        container_port=row.container_port,
        host_port=row.host_port,
        # The table's CHECK constraint allows only these two.
        protocol=cast(PortProtocol, row.protocol),
        host=HOST,
        created_at=row.created_at,
    )
