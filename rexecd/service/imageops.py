"""The manager's image side: the catalogue as users see it, roles, imports, pulls (also on
create, reported as the ``pulling`` stage) and management of the local store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import BinaryIO

from rexecd.config import Config
from rexecd.errors import InvalidRequest, NotFound
from rexecd.models import (
    ContainerCreate,
    ContainerRecord,
    ImageInfo,
    ImageRemoved,
    ImportResult,
    LocalImage,
    PruneOut,
    PullOut,
    Role,
)
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.service import catalog
from rexecd.service.cancel import CancelToken
from rexecd.service.progress import Reporter
from rexecd.service.publisher import Publisher
from rexecd.service.registry import Puller, PullProgress

log = logging.getLogger(__name__)

MB = 1_000_000
# The share of a create's progress (0-100) that its pull takes.
PULL_FROM, PULL_TO = 6, 35


@dataclass
class ImageOps:
    cfg: Config
    images: ImageStore
    puller: Puller
    publisher: Publisher

    async def list_images(self) -> list[ImageInfo]:
        local = await asyncio.to_thread(self.images.list)
        have = {r.ref for r in local}
        can_pull = self.cfg.registries.pull
        out = []
        for c in self.cfg.images.catalogue:
            if c.name == catalog.CUSTOM:
                is_local = False
                available = bool(local) or (c.pull and can_pull)
            else:
                is_local = catalog.normalise(c.name) in have
                available = is_local or (c.reference is not None and c.pull and can_pull)
            out.append(
                ImageInfo(
                    name=c.name,
                    display_name=c.display_name,
                    description=c.description,
                    category=c.category,
                    tags=list(c.tags),
                    popular=c.popular,
                    available=available,
                    aliases=list(c.aliases),
                    reference=c.reference,
                    local=is_local,
                )
            )
        listed = {
            catalog.normalise(c.name) for c in self.cfg.images.catalogue if c.name != "custom"
        }
        for r in local:
            if r.ref in listed:
                continue
            listed.add(r.ref)
            out.append(
                ImageInfo(
                    name=r.name if r.tag == "latest" else r.ref,
                    display_name=r.ref,
                    description=f"local image {r.ref}",
                    category="custom",
                    tags=[r.tag],
                    popular=False,
                    available=True,
                    local=True,
                )
            )
        return out

    def roles(self) -> list[Role]:
        return [
            Role(id=r.id, name=r.name, description=r.description, packages=list(r.packages))
            for r in self.cfg.roles
        ]

    async def import_image(
        self, src: BinaryIO, name: str | None, rootfs: bool = False
    ) -> ImportResult:
        if rootfs:
            if not name:
                raise InvalidRequest("a rootfs import needs a name (?name=NAME:TAG)")
            rec = await asyncio.to_thread(self.images.import_rootfs, src, name)
        else:
            rec = await asyncio.to_thread(self.images.import_archive, src, name)
        return ImportResult(name=rec.ref, digest=rec.digest, size=rec.size, layers=len(rec.layers))

    async def pull_image(self, reference: str, name: str | None) -> PullOut:
        res = await self.puller.pull(reference, name)
        rec = res.record
        return PullOut(
            name=rec.ref,
            digest=rec.digest,
            size=rec.size,
            layers=len(rec.layers),
            source=res.source,
            downloaded=res.downloaded,
            layers_fetched=res.layers_fetched,
            layers_present=res.layers_present,
            seconds=round(res.seconds, 3),
        )

    async def list_local_images(self) -> list[LocalImage]:
        def collect() -> list[LocalImage]:
            uses = self.images.use_counts()
            return [
                LocalImage(
                    name=r.ref,
                    digest=r.digest,
                    size=r.size,
                    layers=list(r.layers),
                    created=r.created,
                    imported=r.imported,
                    containers=uses[(r.ref, r.digest)],
                )
                for r in self.images.list()
            ]

        return await asyncio.to_thread(collect)

    async def remove_image(self, ref: str) -> ImageRemoved:
        """Remove a local image and the layers nothing else uses; 409 while a container
        made from it exists."""

        def remove() -> tuple[ImageRecord, list[str]]:
            rec = self.images.remove(ref)
            return rec, self.images.gc()

        rec, layers = await asyncio.to_thread(remove)
        return ImageRemoved(
            message="image removed", name=rec.ref, digest=rec.digest, layers_removed=len(layers)
        )

    async def prune_images(self, all_unused: bool) -> PruneOut:
        res = await asyncio.to_thread(self.images.prune, all_unused)
        return PruneOut(
            images_removed=res.images, layers_removed=len(res.layers), bytes_freed=res.bytes
        )

    # ------------------------------------------------------------ pull on create

    async def pull_for(
        self,
        rec: ContainerRecord,
        resolved: catalog.Resolved,
        report: Reporter,
        token: CancelToken | None = None,
    ) -> ImageRecord:
        """Pull the image a create needs, reporting progress to the stream and as
        ``progress`` events; concurrent creates of one image share one pull. A
        cancelled ``token`` stops this create's wait at once (CreateCancelled); the
        pull itself goes on for the others (and into the store)."""
        assert resolved.pull is not None
        latest: list[PullProgress] = []
        wake = asyncio.Event()
        done = False

        def on_progress(p: PullProgress) -> None:
            latest[:] = [p]
            wake.set()

        async def pump() -> None:
            # One sender, so frames reach the stream in order and a slow client only
            # ever gets the newest figure, never a backlog.
            while not done:
                await wake.wait()
                wake.clear()
                if latest:
                    await self._pull_progress(rec, report, latest[0])

        await self._progress(rec, report, f"pulling {resolved.pull}", PULL_FROM)
        pumping = asyncio.ensure_future(pump())
        try:
            pulling = self.puller.pull(resolved.pull, resolved.local, on_progress)
            # The puller shields the shared pull: giving up the wait leaves it running.
            res = await (token.race(pulling) if token is not None else pulling)
        finally:
            done = True
            wake.set()
            with contextlib.suppress(Exception):
                await pumping
        await self._progress(rec, report, f"pulled {res.record.ref} from {res.source}", PULL_TO)
        return res.record

    async def _pull_progress(self, rec: ContainerRecord, report: Reporter, p: PullProgress) -> None:
        pct = PULL_FROM + p.percent * (PULL_TO - PULL_FROM) // 100
        message = (
            f"pulling {p.reference}: {p.done / MB:.1f} of {p.total / MB:.1f} MB, "
            f"{p.layers_done} of {p.layers_total} layers"
        )
        await self._progress(rec, report, message, pct)

    async def _progress(
        self, rec: ContainerRecord, report: Reporter, message: str, pct: int
    ) -> None:
        await self.publisher.stage(rec, report, "pulling", message, pct)

    # ------------------------------------------------------------ which image

    def resolve(self, req: ContainerCreate) -> tuple[catalog.Resolved, ImageRecord | None]:
        """What the request's image is, and its record when it is local (blocking).
        Raises UnsupportedImage (400, saying how to get it) when it is neither local
        nor pullable."""
        resolved = catalog.resolve(self.cfg, req.image, req.custom_image)
        try:
            return resolved, self.images.get(resolved.local)
        except NotFound:
            if resolved.pull is None:
                asked = resolved.local if req.image == catalog.CUSTOM else req.image
                raise catalog.unsupported(self.cfg, asked, self._supported()) from None
            return resolved, None

    def image_of(self, rec: ContainerRecord) -> ImageRecord:
        """The image ``rec`` was made from: its lease, which a re-pull of the name does
        not move (blocking). A container made before leases existed is pinned to what
        its name means now."""
        pinned = self.images.pinned(rec.id)
        if pinned is not None:
            return pinned
        try:
            image = self.images.get(catalog.resolve(self.cfg, rec.image, None).local)
        except (NotFound, InvalidRequest):
            raise catalog.unsupported(self.cfg, rec.image, self._supported()) from None
        self.images.pin(rec.id, image)
        return image

    def _supported(self) -> list[str]:
        names = []
        for rec in self.images.list():
            names.append(rec.name if rec.tag == "latest" else rec.ref)
        return sorted(set(names))
