"""The content-addressed image store: layers unpacked once, image records as JSON.

Layout (every directory 0700: unpacked layers hold the images' setuid binaries, which
no host user may reach)::

    ROOT/lock                  flock: imports, pulls and pins hold it shared, gc() exclusive
    ROOT/layers/<hex>/         one unpacked layer, named by its diff_id; read-only by use
    ROOT/images/<ref>.json     ImageRecord, "/" in the name spelled %2F
    ROOT/leases/<owner>.json   the ImageRecord a container was made from (see leases.py)
    ROOT/roles/<key>.json      an image with a role installed: its base's record plus the
                               role's layer, cached under the (base digest, role) key
    ROOT/tmp/                  layers being unpacked; swept when no import is running

Each import, pull and role layer unpacks under one ``Budget`` of the ``images.unpack``
limits (limits.py): a layer past one is refused while it streams and discarded like
any failed unpack.

A layer is referenced by every image record, role record and lease that lists it; gc()
removes only layers with no reference, and an image a lease names cannot be removed.

A layer directory appears only by an atomic rename of a complete unpack (after one
sync of the filesystem), so its presence means it is whole: a crash leaves at most a
directory under ``tmp/``. Two imports of one layer race only on that rename; the loser
discards its copy.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import quote

from rexecd import _native
from rexecd.config import UnpackLimits
from rexecd.errors import Conflict, ImageError, InvalidRequest, NotFound, RexecError
from rexecd.runtime.durable import fsync_dir, write_atomic

from .archive import LayerBlob, OuterArchive, open_archive, read_image
from .blobs import LayerStream, Reader, open_layer
from .files import read_record, rmtree, tree_size
from .leases import Leases
from .limits import Budget
from .manifest import OCI_MANIFEST, host_arch
from .models import DEFAULT_TAG, DIGEST_RE, ImageConfig, ImageRecord, parse_reference
from .unpack import unpack_layer

ROOTFS_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KEY_RE = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass
class PruneResult:
    images: list[str] = field(default_factory=list)  # references removed
    layers: list[str] = field(default_factory=list)  # diff_ids removed
    bytes: int = 0  # disk space given back


log = logging.getLogger(__name__)


class ImageStore:
    """Imports image archives and hands out layer directories for overlay mounts.

    Synchronous and thread-safe; several processes may share one root. ``durable``
    (default) syncs unpacked layers to disk before they become visible; tests on a
    throwaway root may turn it off. ``limits`` bound what one import or pull unpacks.
    """

    def __init__(
        self, root: Path, *, durable: bool = True, limits: UnpackLimits | None = None
    ) -> None:
        self.root = root
        self.limits = limits if limits is not None else UnpackLimits()
        self.layers_dir = root / "layers"
        self.images_dir = root / "images"
        self.tmp_dir = root / "tmp"
        self.roles_dir = root / "roles"
        self._durable = durable
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.layers_dir, self.images_dir, self.tmp_dir, self.roles_dir):
            d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        self.leases = Leases(root / "leases")

    # --- import ---------------------------------------------------------------------

    def import_archive(self, src: Path | BinaryIO, name: str | None = None) -> ImageRecord:
        """Import a docker-archive or OCI image-layout tarball (plain, gzip or zstd).

        ``name`` ("busybox" or "busybox:1.36") names the image instead of the archive's
        own tag (tag "latest" when it gives none), and picks the image when the archive
        holds several. Raises ImageError (bad archive, digest mismatch, unsafe member),
        UnsupportedImage or InvalidRequest (bad name).
        """
        want = parse_reference(name) if name is not None else None
        started = time.monotonic()
        budget = Budget(self.limits)
        with self._import_lock(), open_archive(src, self.tmp_dir, budget) as arc:
            img = read_image(arc, want)
            if want is not None:
                ref_name, tag = want[0], want[1] or DEFAULT_TAG
            elif img.name is not None:
                ref_name, tag = img.name, img.tag or DEFAULT_TAG
            else:
                raise ImageError("the archive does not name its image: give a name to import it")
            parse_reference(f"{ref_name}:{tag}")  # an archive's tag must be valid too
            todo: dict[str, LayerBlob] = {}
            for layer in img.layers:
                if layer.diff_id not in todo and not self._layer_dir(layer.diff_id).exists():
                    todo[layer.diff_id] = layer
            # Layers are independent directories: read them in archive order, so a
            # spooled or slow archive is only ever read forwards.
            self._unpack(
                arc, sorted(todo.values(), key=lambda b: b.member.offset_data), Budget(self.limits)
            )
            now = datetime.now(UTC)
            rec = ImageRecord(
                name=ref_name,
                tag=tag,
                digest=img.digest,
                size=sum(b.size for b in img.layers),
                layers=[b.diff_id for b in img.layers],
                config=img.config,
                created=img.created or now,
                imported=now,
            )
            # Still under the import lock: a gc() must see the record before it could
            # judge these layers unused.
            self._write_record(rec)
        log.info(
            "imported %s (%s): %d layers, %d unpacked, %.2fs",
            rec.ref,
            rec.digest,
            len(rec.layers),
            len(todo),
            time.monotonic() - started,
        )
        return rec

    def _unpack(self, arc: OuterArchive, layers: list[LayerBlob], budget: Budget) -> None:
        staged: list[tuple[str, Path]] = []
        try:
            for blob in layers:
                with arc.open(blob.member) as raw:
                    tmp, _ = self._stage(
                        raw,
                        label=f"layer blob {blob.path!r}",
                        diff_id=blob.diff_id,
                        blob_digest=blob.digest,
                        blob_size=blob.size,
                        budget=budget,
                    )
                staged.append((blob.diff_id, tmp))
            self._publish(staged)
        finally:
            for _, tmp in staged:
                if tmp.exists():
                    rmtree(tmp)

    def _stage(
        self,
        raw: Reader,
        *,
        label: str,
        diff_id: str | None,
        blob_digest: str | None,
        blob_size: int | None,
        budget: Budget,
        any_compression: bool = False,
    ) -> tuple[Path, LayerStream]:
        """Unpack and verify one layer blob into a new directory under ``tmp/``; return it
        with what was read (diff_id, sizes). On failure nothing of it is left."""
        prefix = _hex(diff_id)[:12] + "." if diff_id is not None else "rootfs."
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
        try:
            with open_layer(
                raw,
                label=label,
                diff_id=diff_id,
                blob_digest=blob_digest,
                blob_size=blob_size,
                budget=budget,
                any_compression=any_compression,
            ) as stream:
                stats = unpack_layer(stream, tmp, label, budget)
        except BaseException:
            rmtree(tmp)
            raise
        log.debug("%s: %d entries, %d bytes", label, stats.entries, stats.file_bytes)
        return tmp, stream

    def _add_layer(
        self,
        raw: Reader,
        label: str,
        *,
        any_compression: bool = False,
        done: Callable[[], None] | None = None,
    ) -> LayerStream:
        """Unpack a layer whose diff_id is learnt by reading it and make it visible (an
        identical layer already there is kept instead). ``done`` runs once the stream
        has been read, before anything is published: raising there discards it."""
        tmp: Path | None = None
        try:
            try:
                tmp, layer = self._stage(
                    raw,
                    label=label,
                    diff_id=None,
                    blob_digest=None,
                    blob_size=None,
                    budget=Budget(self.limits),
                    any_compression=any_compression,
                )
            finally:
                if done is not None:
                    done()
            if not self._layer_dir(layer.diff_id).exists():
                self._publish([(layer.diff_id, tmp)])
            return layer
        finally:
            if tmp is not None and tmp.exists():
                rmtree(tmp)

    def _publish(self, staged: list[tuple[str, Path]]) -> None:
        """Make staged layers visible under ``layers/`` (each complete on disk first)."""
        if staged and self._durable:
            # One syncfs of the store's file system instead of an fsync per file:
            # the renames below make layers visible, so what is under them must be
            # on disk first.
            _native.syncfs(str(self.root))
        for diff_id, tmp in staged:
            self._commit(tmp, self._layer_dir(diff_id))
        if staged and self._durable:
            fsync_dir(self.layers_dir)
        for _, tmp in staged:
            if tmp.exists():  # lost a race to a concurrent import of the same layer
                rmtree(tmp)

    def _commit(self, tmp: Path, final: Path) -> None:
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # A concurrent import of the same layer won the race: its copy is as good.
            log.debug("layer %s already present; discarding this copy", final.name)

    @contextmanager
    def _import_lock(self) -> Iterator[None]:
        fd = self._lock_fd()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # other imports (or gc) running: their tmp dirs are live
            else:
                self._sweep_tmp()
            # Downgrading is not atomic, which is fine: a gc slipping in between sees
            # no import in progress, and this one waits for it.
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def session(self) -> Iterator[ImportSession]:
        """Hold the store for a pull: layers unpacked and the record written through the
        session cannot be collected by a gc() before the record names them."""
        with self._import_lock():
            yield ImportSession(self)

    def import_rootfs(self, src: Path | BinaryIO, name: str) -> ImageRecord:
        """Import a plain root file system tarball (mmdebstrap, debootstrap, a ``tar``
        of a directory), uncompressed or gzip, zstd, xz or bzip2, as a one-layer image.

        Its config is a minimal one (a PATH, ``/bin/sh``); its digest is that of the
        OCI manifest such an image would have, so the same tarball always gives the
        same digest.
        """
        ref_name, tag = parse_reference(name)
        tag = tag or DEFAULT_TAG
        with self._import_lock():
            with src.open("rb") if isinstance(src, Path) else _no_close(src) as raw:
                layer = self._add_layer(raw, f"rootfs {name!r}", any_compression=True)
            diff_id = layer.diff_id
            now = datetime.now(UTC)
            config = ImageConfig(env=[ROOTFS_ENV], cmd=["/bin/sh"])
            rec = ImageRecord(
                name=ref_name,
                tag=tag,
                digest=_rootfs_digest(diff_id, layer.diff_size, config),
                size=layer.size,
                layers=[diff_id],
                config=config,
                created=now,
                imported=now,
            )
            self._write_record(rec)
        log.info("imported rootfs %s (%s), %d bytes", rec.ref, diff_id, layer.size)
        return rec

    def _lock_fd(self) -> int:
        return os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _sweep_tmp(self) -> None:
        for entry in os.scandir(self.tmp_dir):
            log.info("removing leftover %s", entry.path)
            if entry.is_dir(follow_symlinks=False):
                rmtree(Path(entry.path))
            else:
                os.unlink(entry.path)

    # --- records --------------------------------------------------------------------

    def get(self, ref: str) -> ImageRecord:
        """The image named ``ref`` ("busybox" means "busybox:latest"), or by digest
        ("sha256:..."). Raises NotFound."""
        if DIGEST_RE.fullmatch(ref):
            for rec in self.list():
                if rec.digest == ref:
                    return rec
            raise NotFound(f"no image with digest {ref}")
        found = self._read_record(self._record_path(ref))
        if found is None:
            raise NotFound(f"image {ref!r} not found")
        return found

    def list(self) -> builtins.list[ImageRecord]:
        """Every image, sorted by reference."""
        out = []
        for path in self.images_dir.glob("*.json"):
            rec = self._read_record(path)
            if rec is not None:
                out.append(rec)
        return sorted(out, key=lambda r: r.ref)

    def layer_paths(self, rec: ImageRecord) -> builtins.list[Path]:
        """The layer directories of ``rec``, lowest first (overlayfs wants the reverse)."""
        paths = [self._layer_dir(d) for d in rec.layers]
        for d, p in zip(rec.layers, paths, strict=True):
            if not p.is_dir():
                raise RexecError(f"layer {d} of {rec.ref} is missing from the store")
        return paths

    def remove(self, ref: str) -> ImageRecord:
        """Forget the image ``ref``; its layers stay until gc(). Raises NotFound, and
        Conflict while a container made from it exists (a lease names it)."""
        rec = self.get(ref)
        with self._import_lock():
            users = self.users_of(rec)
            if users:
                raise Conflict(
                    f"image {rec.ref} is in use by {len(users)} container(s): delete them first",
                    containers=users,
                )
            try:
                self._record_path(rec.ref).unlink()
            except FileNotFoundError:
                raise NotFound(f"image {ref!r} not found") from None
            fsync_dir(self.images_dir)
            # Role builds on this content are worth keeping while another name has it.
            named = {r.digest for r in self.list()}
            self._drop_roles(lambda r: r.digest in named)
        return rec

    def tag(self, src: str, dst: str) -> ImageRecord:
        """Give the image ``src`` the further name ``dst`` (replacing what ``dst`` named)."""
        name, tag = parse_reference(dst)
        with self._import_lock():
            rec = self.get(src)
            new = rec.model_copy(update={"name": name, "tag": tag or DEFAULT_TAG})
            self._write_record(new)
        return new

    def users_of(self, rec: ImageRecord) -> builtins.list[str]:
        """The owners (container ids) of the leases made from ``rec`` under its name."""
        return [o for o, r in self.leases.items() if r.ref == rec.ref and r.digest == rec.digest]

    def use_counts(self) -> Counter[tuple[str, str]]:
        """How many containers were made from each (reference, digest)."""
        return Counter((r.ref, r.digest) for _, r in self.leases.items())

    def layer_refs(self) -> Counter[str]:
        """How many image records and leases name each layer (its reference count)."""
        refs: Counter[str] = Counter()
        for rec in [*self.list(), *self._role_records(), *(r for _, r in self.leases.items())]:
            refs.update(set(rec.layers))
        return refs

    # --- role layers ----------------------------------------------------------------

    def role_image(self, key: str) -> ImageRecord | None:
        """The cached image of role build ``key`` (see service/roles.py), or None when
        there is none or one of its layers went missing (then it is built again)."""
        rec = read_record(self._role_path(key))
        if rec is None:
            return None
        try:
            self.layer_paths(rec)
        except RexecError:
            return None
        return rec

    def add_role_layer(
        self, key: str, base: ImageRecord, write: Callable[[IO[bytes]], object]
    ) -> ImageRecord:
        """Unpack the layer tar that ``write`` produces (called in a thread of its own,
        writing to a pipe) through the safe unpacker, as any pulled layer, and cache
        ``base`` plus that layer under ``key``. The layer is named by its diff_id, so an
        identical result shares one directory. Raises ImageError; nothing of a failed
        layer is left."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        failed: list[BaseException] = []

        def produce() -> None:
            try:
                with os.fdopen(wfd, "wb") as w:
                    write(w)
            except BaseException as e:  # handed to the caller below
                failed.append(e)

        writer = threading.Thread(target=produce, name="role-layer", daemon=True)

        def finish(r: IO[bytes]) -> None:
            r.close()  # a writer still going gets EPIPE, not a hang
            writer.join()
            if failed:
                raise ImageError(f"role layer {key[:12]}: {failed[0]}") from failed[0]

        with self._import_lock():
            with os.fdopen(rfd, "rb") as r:
                writer.start()
                layer = self._add_layer(r, f"role layer {key[:12]}", done=lambda: finish(r))
            rec = base.model_copy(
                update={
                    "layers": [*base.layers, layer.diff_id],
                    "size": base.size + layer.size,
                    "imported": datetime.now(UTC),
                }
            )
            write_atomic(self._role_path(key), rec.model_dump_json(indent=2).encode())
        log.info("role layer %s on %s: %s, %d bytes", key[:12], base.ref, layer.diff_id, layer.size)
        return rec

    def _role_path(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise InvalidRequest(f"invalid role cache key {key!r}")
        return self.roles_dir / f"{key}.json"

    def _role_records(self) -> Iterator[ImageRecord]:
        for path in sorted(self.roles_dir.glob("*.json")):
            rec = read_record(path)
            if rec is not None:
                yield rec

    def _drop_roles(self, keep: Callable[[ImageRecord], bool]) -> builtins.list[str]:
        """Remove role records ``keep`` refuses (their layers go at the next gc)."""
        gone = []
        for path in sorted(self.roles_dir.glob("*.json")):
            rec = read_record(path)
            if rec is None or not keep(rec):
                path.unlink(missing_ok=True)
                gone.append(path.stem)
        return gone

    # --- leases ---------------------------------------------------------------------

    def pin(self, owner: str, rec: ImageRecord) -> None:
        """Record that ``owner`` (a container) is made from ``rec``: its layers stay in the
        store, and its name cannot be removed, until unpin(). Raises RexecError when a
        layer went missing meanwhile."""
        with self._import_lock():
            self.layer_paths(rec)
            self.leases.put(owner, rec)

    def pinned(self, owner: str) -> ImageRecord | None:
        return self.leases.get(owner)

    def unpin(self, owner: str) -> bool:
        return self.leases.drop(owner)

    def drop_leases(self, keep: Collection[str]) -> builtins.list[str]:
        """Remove the leases of owners not in ``keep`` (containers that no longer exist)."""
        gone = [o for o, _ in self.leases.items() if o not in keep]
        for owner in gone:
            self.leases.drop(owner)
        return gone

    # --- collection -----------------------------------------------------------------

    def gc(self, keep: Collection[str] = ()) -> builtins.list[str]:
        """Delete layers that no image record nor lease uses (nor any diff_id in ``keep``).
        Returns the removed diff_ids. Waits for running imports to finish."""
        return [d for d, _ in self._collect(keep)]

    def _collect(self, keep: Collection[str] = ()) -> builtins.list[tuple[str, int]]:
        fd = self._lock_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            used = {_hex(d) for d in self.layer_refs()} | {_hex(d) for d in keep}
            removed = []
            for entry in os.scandir(self.layers_dir):
                if entry.name not in used:
                    size = tree_size(Path(entry.path))
                    rmtree(Path(entry.path))
                    removed.append((f"sha256:{entry.name}", size))
            self._sweep_tmp()
            return removed
        finally:
            os.close(fd)

    def prune(self, all_unused: bool = False) -> PruneResult:
        """Remove unreferenced layers; with ``all_unused`` first every image no container
        was made from (images some container uses stay)."""
        out = PruneResult()
        if all_unused:
            for rec in self.list():
                try:
                    self.remove(rec.ref)
                except Conflict:
                    continue
                except NotFound:
                    continue  # removed meanwhile
                out.images.append(rec.ref)
            # Role builds no container uses go too (built again on the next create).
            leased = {tuple(r.layers) for _, r in self.leases.items()}
            with self._import_lock():
                self._drop_roles(lambda r: tuple(r.layers) in leased)
        for diff_id, size in self._collect():
            out.layers.append(diff_id)
            out.bytes += size
        return out

    def _record_path(self, ref: str) -> Path:
        try:
            name, tag = parse_reference(ref)
        except InvalidRequest:
            # Looking up a name that could never have been imported: simply not there.
            raise NotFound(f"image {ref!r} not found (not a valid image name)") from None
        full = f"{name}:{tag or DEFAULT_TAG}"
        fname = quote(full, safe=":")
        if len(fname) > 200:  # quoting can push a long name past NAME_MAX
            fname = "sha256-" + hashlib.sha256(full.encode()).hexdigest()
        return self.images_dir / (fname + ".json")

    def _read_record(self, path: Path) -> ImageRecord | None:
        return read_record(path)

    def _write_record(self, rec: ImageRecord) -> None:
        write_atomic(self._record_path(rec.ref), rec.model_dump_json(indent=2).encode())

    def _layer_dir(self, diff_id: str) -> Path:
        return self.layers_dir / _hex(diff_id)


def _hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not DIGEST_RE.fullmatch(digest):
        raise ImageError(f"invalid layer digest {digest!r}")
    return hexd


class ImportSession:
    """A pull in progress (see ImageStore.session): layers go in one by one, possibly
    from several threads at once, then the record that names them."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        # Per pull: the layers of one image share the limits, whichever thread unpacks.
        self.budget = Budget(store.limits)

    def has_layer(self, diff_id: str) -> bool:
        return self._store._layer_dir(diff_id).is_dir()

    def unpack(
        self, raw: Reader, *, label: str, diff_id: str, blob_digest: str, blob_size: int
    ) -> None:
        """Unpack one layer blob read from ``raw`` (blocking reads, e.g. a network stream
        handed over chunk by chunk), verifying its size, digest and diff_id before it
        becomes visible. Raises ImageError; nothing of a failed layer is left."""
        tmp, _ = self._store._stage(
            raw,
            label=label,
            diff_id=diff_id,
            blob_digest=blob_digest,
            blob_size=blob_size,
            budget=self.budget,
        )
        try:
            self._store._publish([(diff_id, tmp)])
        finally:
            if tmp.exists():
                rmtree(tmp)

    def commit(self, rec: ImageRecord) -> None:
        """Write the record of an image whose layers are all in the store."""
        self._store.layer_paths(rec)
        self._store._write_record(rec)


@contextmanager
def _no_close(f: BinaryIO) -> Iterator[BinaryIO]:
    yield f


def _rootfs_digest(diff_id: str, size: int, config: ImageConfig) -> str:
    """The digest of the OCI manifest of a one-layer image of this tarball, stored as an
    uncompressed layer (so its blob digest is its diff_id and ``size`` its length)."""
    cfg = json.dumps(
        {
            "architecture": host_arch(),
            "os": "linux",
            "config": {"Env": config.env, "Cmd": config.cmd},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{hashlib.sha256(cfg).hexdigest()}",
                "size": len(cfg),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": diff_id,
                    "size": size,
                }
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return f"sha256:{hashlib.sha256(manifest).hexdigest()}"
