"""Image pulls: resolve a reference to this host's manifest, then stream its layers in.

One pull of an image at a time: concurrent pulls of the same reference share one, and
concurrent pulls of different images share the download of a layer they have in
common. Layers are downloaded ``max_concurrent_downloads`` at a time, each streamed
as it arrives into the store's unpacker (blob digest, size and diff_id checked on the
way; a layer becomes visible only once all three match). A connection lost mid-blob is
resumed with a Range request from the byte where it stopped, up to ``retries`` times
in a row; layers already complete stay in the store, so a pull that still fails is
cheaper to repeat.

The store's ``images.unpack`` limits hold for a pull as a whole (one budget for all
its layers, see runtime/images/limits.py): a manifest whose new layers already
declare more bytes than ``max_image_mb`` is refused before any download, and a layer
that expands past a limit stops its download and fails the pull with
ImageTooLarge (400 ``image_too_large``; on create the container ends ``error``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from rexecd.config import RegistriesConfig
from rexecd.errors import (
    ImageError,
    ImageTooLarge,
    InvalidRequest,
    NotFound,
    RegistryError,
    RexecError,
)
from rexecd.runtime.images import ImageRecord, ImageStore, parse_reference
from rexecd.runtime.images.manifest import (
    MANIFEST_TYPES,
    descriptors,
    image_entries,
    is_index,
    load_json,
    parse_config,
    parse_manifest,
    pick_platform,
)
from rexecd.runtime.images.models import DEFAULT_TAG, RemoteRef, parse_remote
from rexecd.runtime.images.store import ImportSession

from .bridge import BridgeClosed, ByteBridge, run_in_thread
from .client import MANIFEST_ACCEPT, Endpoint, RegistryClient, _backoff, _describe

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
PROGRESS_EVERY_S = 0.25


@dataclass(frozen=True)
class PullProgress:
    reference: str
    done: int  # bytes of layer blobs received
    total: int  # bytes of the layer blobs to download (not those already present)
    layers_done: int
    layers_total: int

    @property
    def percent(self) -> int:
        return 100 if self.total == 0 else min(100, self.done * 100 // self.total)


ProgressListener = Callable[[PullProgress], None]


@dataclass
class _Transfer:
    """What the downloads of one pull did."""

    downloaded: int = 0  # layer bytes received (resumed bytes once)
    resumed: list[tuple[str, int]] = field(default_factory=list)  # (digest, offset)


@dataclass
class PullResult:
    record: ImageRecord
    source: str  # the endpoint that served it
    downloaded: int
    layers_fetched: int
    layers_present: int
    resumed: list[tuple[str, int]]
    seconds: float = 0.0


class _Tracker:
    """Progress of one pull, told to every caller waiting on it."""

    def __init__(self, reference: str) -> None:
        self.reference = reference
        self.listeners: list[ProgressListener] = []
        self.done = self.total = self.layers_done = self.layers_total = 0
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self.emit()

    def emit(self) -> None:
        p = PullProgress(self.reference, self.done, self.total, self.layers_done, self.layers_total)
        for fn in list(self.listeners):
            try:
                fn(p)
            except Exception:  # a listener's failure is its own; the pull goes on
                log.debug("pull progress listener failed", exc_info=True)


@dataclass
class _LayerJob:
    task: asyncio.Task[None]
    trackers: list[_Tracker]


@dataclass(frozen=True)
class _Source:
    """Where one pull fetches its layers from and puts them."""

    client: RegistryClient
    ep: Endpoint
    remote: RemoteRef
    session: ImportSession
    transfer: _Transfer


class Puller:
    """Pulls into one ImageStore; one per daemon (or per ``rexecd image pull``)."""

    def __init__(self, cfg: RegistriesConfig, store: ImageStore) -> None:
        self.cfg = cfg
        self.store = store
        self._session: aiohttp.ClientSession | None = None
        self._client: RegistryClient | None = None
        self._pulls: dict[tuple[str, str], tuple[asyncio.Task[PullResult], _Tracker]] = {}
        self._layers: dict[str, _LayerJob] = {}
        self._sem: asyncio.Semaphore | None = None

    def _registry(self) -> RegistryClient:
        if self._client is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32), trust_env=False
            )
            self._client = RegistryClient(self.cfg, self._session)
            self._sem = asyncio.Semaphore(self.cfg.max_concurrent_downloads)
        return self._client

    async def close(self) -> None:
        for task, _ in list(self._pulls.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = self._client = None

    async def pull(
        self, reference: str, name: str | None = None, progress: ProgressListener | None = None
    ) -> PullResult:
        """Pull ``reference`` into the store as ``name`` (default: the reference's own
        short name). Raises InvalidRequest (bad reference), NotFound (no such image),
        RegistryError (registry unusable) or ImageError (bad content)."""
        if not self.cfg.pull:
            raise InvalidRequest("pulling images is disabled (registries.pull is false)")
        remote = parse_remote(reference)
        local_name, tag = parse_reference(name) if name else (remote.local_name, remote.tag)
        local = f"{local_name}:{tag or DEFAULT_TAG}"
        key = (str(remote), local)
        entry = self._pulls.get(key)
        if entry is None:
            tracker = _Tracker(str(remote))
            task = asyncio.ensure_future(self._pull(remote, local, tracker))
            self._pulls[key] = entry = (task, tracker)
            task.add_done_callback(lambda _t: self._pulls.pop(key, None))
        task, tracker = entry
        if progress is not None:
            tracker.listeners.append(progress)
        try:
            # Shielded: one caller giving up does not cancel the pull the others wait on.
            return await asyncio.shield(task)
        finally:
            if progress is not None and progress in tracker.listeners:
                tracker.listeners.remove(progress)

    async def _pull(self, remote: RemoteRef, local: str, tracker: _Tracker) -> PullResult:
        started = time.monotonic()
        client = self._registry()
        errors: list[str] = []
        for ep in client.endpoints(remote.registry):
            try:
                resolved = await self._resolve(client, ep, remote)
            except (RegistryError, NotFound) as e:
                # A mirror that is down or lacks the image: the next endpoint may have it.
                errors.append(e.message)
                log.info("pull %s: %s", remote, e.message)
                continue
            result = await self._fetch(client, ep, remote, local, resolved, tracker)
            result.seconds = time.monotonic() - started
            log.info(
                "pulled %s as %s from %s: %d layers fetched (%d bytes), %d present, "
                "%d resumes, %.2fs",
                remote,
                result.record.ref,
                result.source,
                result.layers_fetched,
                result.downloaded,
                result.layers_present,
                len(result.resumed),
                result.seconds,
            )
            return result
        if errors and all("not found" in e for e in errors):
            raise NotFound(f"image {remote} not found ({'; '.join(errors)})")
        raise RegistryError(f"cannot pull {remote}: {'; '.join(errors) or 'no registry'}")

    async def _resolve(
        self, client: RegistryClient, ep: Endpoint, remote: RemoteRef
    ) -> tuple[str, dict[str, Any], bytes]:
        """The platform manifest of ``remote`` at ``ep``: (digest, manifest, config blob)."""
        repo = remote.repository
        ref = remote.reference
        for _ in range(3):  # an index, maybe (rarely) nested
            raw, ctype = await client.fetch_small(
                ep, f"{repo}/manifests/{ref}", repo=repo, accept=MANIFEST_ACCEPT
            )
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            if ref.startswith("sha256:") and digest != ref:
                raise RegistryError(f"{ep.label}: manifest {ref} does not match its digest")
            doc = load_json(raw, f"manifest {digest}")
            if not is_index(ctype if ctype not in (None, "application/json") else None, doc):
                where = f"manifest {digest}"
                manifest = parse_manifest(doc, where, ctype if ctype in MANIFEST_TYPES else None)
                cfg = await client.fetch_blob(ep, repo, manifest.config["digest"])
                return digest, doc, cfg
            where = f"index {digest}"
            ref = pick_platform(image_entries(descriptors(doc, where)), where)["digest"]
        raise ImageError(f"{remote}: image indexes nested too deeply")

    async def _fetch(
        self,
        client: RegistryClient,
        ep: Endpoint,
        remote: RemoteRef,
        local: str,
        resolved: tuple[str, dict[str, Any], bytes],
        tracker: _Tracker,
    ) -> PullResult:
        digest, doc, cfg_bytes = resolved
        manifest = parse_manifest(doc, f"manifest {digest}")
        config, created, diff_ids = parse_config(cfg_bytes, f"config of {remote}")
        if len(diff_ids) != len(manifest.layers):
            raise ImageError(
                f"{remote}: {len(manifest.layers)} layers but {len(diff_ids)} diff_ids"
            )
        name, _, tag = local.rpartition(":")
        cm = self.store.session()
        session = await asyncio.to_thread(cm.__enter__)
        transfer = _Transfer()
        present = 0
        try:
            todo: dict[str, dict[str, Any]] = {}
            for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
                if session.has_layer(diff_id) and diff_id not in self._layers:
                    present += 1
                else:
                    todo.setdefault(diff_id, desc)
            tracker.layers_total = len(todo)
            tracker.total = sum(d["size"] for d in todo.values())
            self._check_declared(remote, tracker.total)
            tracker.emit()
            src = _Source(client, ep, remote, session, transfer)
            jobs = [self._layer(src, diff_id, desc, tracker) for diff_id, desc in todo.items()]
            outcomes = await asyncio.gather(*(j.task for j in jobs), return_exceptions=True)
            for j in jobs:
                if tracker in j.trackers:
                    j.trackers.remove(tracker)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                raise failed[0]
            now = datetime.now(UTC)
            rec = ImageRecord(
                name=name,
                tag=tag,
                digest=digest,
                size=sum(d["size"] for d in manifest.layers),
                layers=diff_ids,
                config=config,
                created=created or now,
                imported=now,
            )
            await asyncio.to_thread(session.commit, rec)
        finally:
            await asyncio.to_thread(cm.__exit__, None, None, None)
        tracker.emit()
        return PullResult(rec, ep.label, transfer.downloaded, len(todo), present, transfer.resumed)

    def _check_declared(self, remote: RemoteRef, total: int) -> None:
        # Layer blobs are compressed, so more declared bytes than the image may unpack
        # to is a refusal now rather than after downloading the first max_image_mb.
        limit = self.store.limits.max_image_mb
        if total > limit << 20:
            raise ImageTooLarge(
                f"{remote}: its layers declare {total} bytes, more than "
                f"images.unpack.max_image_mb ({limit} MiB)",
                limit="max_image_mb",
            )

    def _layer(
        self, src: _Source, diff_id: str, desc: dict[str, Any], tracker: _Tracker
    ) -> _LayerJob:
        """The download of one layer: a running one (another pull's) or a new one."""
        job = self._layers.get(diff_id)
        if job is not None:
            job.trackers.append(tracker)
            return job
        trackers = [tracker]
        job = _LayerJob(
            asyncio.ensure_future(self._download(src, diff_id, desc, trackers)), trackers
        )
        self._layers[diff_id] = job
        job.task.add_done_callback(lambda _t: self._layers.pop(diff_id, None))
        return job

    async def _download(
        self, src: _Source, diff_id: str, desc: dict[str, Any], trackers: list[_Tracker]
    ) -> None:
        assert self._sem is not None
        async with self._sem:
            digest, size = desc["digest"], desc["size"]
            label = f"layer {digest[:19]} of {src.remote}"
            bridge = ByteBridge()

            def unpack() -> None:
                try:
                    src.session.unpack(
                        bridge, label=label, diff_id=diff_id, blob_digest=digest, blob_size=size
                    )
                finally:
                    bridge.abort()

            unpacking = run_in_thread(unpack, name=f"unpack-{digest[7:19]}")
            try:
                await self._stream(src, digest, size, bridge, trackers)
            except BridgeClosed:
                pass  # the unpacker stopped early: its error, awaited below, says why
            except BaseException as e:
                bridge.fail(e.message if isinstance(e, RexecError) else _describe(e))
                try:
                    await unpacking
                except Exception:
                    pass  # the download's own error is the one to report
                raise
            else:
                bridge.close()
            await unpacking
            for t in trackers:
                t.layers_done += 1
                t.emit()

    async def _stream(
        self, src: _Source, digest: str, size: int, bridge: ByteBridge, trackers: list[_Tracker]
    ) -> None:
        client, ep, repo, transfer = src.client, src.ep, src.remote.repository, src.transfer
        offset = 0
        failures = 0
        path = f"{repo}/blobs/{digest}"
        while True:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                async with client.get(ep, path, repo=repo, headers=headers, retry=False) as resp:
                    # A server that ignores Range sends it all again: skip what we have.
                    skip = offset if resp.status == 200 else 0
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        if offset + len(chunk) > size:
                            raise ImageError(f"blob {digest} is longer than its {size} bytes")
                        await bridge.put(chunk)
                        offset += len(chunk)
                        transfer.downloaded += len(chunk)
                        failures = 0
                        for t in trackers:
                            t.advance(len(chunk))
                if offset == size:
                    return
                raise aiohttp.ClientPayloadError(f"connection closed at {offset} of {size}")
            except (aiohttp.ClientError, TimeoutError, OSError, RegistryError) as e:
                failures += 1
                why = e.message if isinstance(e, RegistryError) else _describe(e)
                if failures > self.cfg.retries:
                    raise RegistryError(
                        f"{ep.label}: blob {digest} failed at byte {offset} of {size}: {why}"
                    ) from None
                log.info(
                    "%s: blob %s interrupted at byte %d of %d (%s); resuming",
                    ep.label,
                    digest[:19],
                    offset,
                    size,
                    why,
                )
                transfer.resumed.append((digest, offset))
                await asyncio.sleep(_backoff(failures))
