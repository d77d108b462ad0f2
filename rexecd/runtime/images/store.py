"""The content-addressed image store: layers unpacked once, image records as JSON.

Layout (every directory 0700: unpacked layers hold the images' setuid binaries, which
no host user may reach)::

    ROOT/lock                  flock: imports hold it shared, gc() exclusive
    ROOT/layers/<hex>/         one unpacked layer, named by its diff_id; read-only by use
    ROOT/images/<ref>.json     ImageRecord, "/" in the name spelled %2F
    ROOT/tmp/                  layers being unpacked; swept when no import is running

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
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from pydantic import ValidationError

from rexecd import _native
from rexecd.errors import ImageError, InvalidRequest, NotFound, RexecError
from rexecd.runtime.durable import fsync_dir

from .archive import LayerBlob, OuterArchive, open_archive, read_image
from .blobs import open_layer
from .models import DEFAULT_TAG, DIGEST_RE, ImageRecord, parse_reference
from .unpack import unpack_layer

log = logging.getLogger(__name__)


class ImageStore:
    """Imports image archives and hands out layer directories for overlay mounts.

    Synchronous and thread-safe; several processes may share one root. ``durable``
    (default) syncs unpacked layers to disk before they become visible; tests on a
    throwaway root may turn it off.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.images_dir = root / "images"
        self.tmp_dir = root / "tmp"
        self._durable = durable
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.layers_dir, self.images_dir, self.tmp_dir):
            d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)

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
        with self._import_lock(), open_archive(src, self.tmp_dir) as arc:
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
            self._unpack(arc, sorted(todo.values(), key=lambda b: b.member.offset_data))
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

    def _unpack(self, arc: OuterArchive, layers: list[LayerBlob]) -> None:
        staged: list[tuple[str, Path]] = []
        try:
            for blob in layers:
                tmp = Path(tempfile.mkdtemp(prefix=_hex(blob.diff_id)[:12] + ".", dir=self.tmp_dir))
                staged.append((blob.diff_id, tmp))
                label = f"layer blob {blob.path!r}"
                with (
                    arc.open(blob.member) as raw,
                    open_layer(
                        raw,
                        label=label,
                        diff_id=blob.diff_id,
                        blob_digest=blob.digest,
                        blob_size=blob.size,
                    ) as stream,
                ):
                    stats = unpack_layer(stream, tmp, label)
                log.debug("%s: %d entries, %d bytes", label, stats.entries, stats.file_bytes)
            if staged and self._durable:
                # One syncfs of the store's file system instead of an fsync per file:
                # the renames below make layers visible, so what is under them must be
                # on disk first.
                _native.syncfs(str(self.root))
            for diff_id, tmp in staged:
                self._commit(tmp, self._layer_dir(diff_id))
            if staged and self._durable:
                fsync_dir(self.layers_dir)
        finally:
            for _, tmp in staged:
                if tmp.exists():
                    _rmtree(tmp)

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

    def _lock_fd(self) -> int:
        return os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _sweep_tmp(self) -> None:
        for entry in os.scandir(self.tmp_dir):
            log.info("removing leftover %s", entry.path)
            if entry.is_dir(follow_symlinks=False):
                _rmtree(Path(entry.path))
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

    def remove(self, ref: str) -> None:
        """Forget the image ``ref``; its layers stay until gc(). Raises NotFound."""
        path = self._record_path(ref)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"image {ref!r} not found") from None
        fsync_dir(self.images_dir)

    def gc(self, keep: Collection[str] = ()) -> builtins.list[str]:
        """Delete layers that no image record uses (nor any diff_id in ``keep``, e.g.
        layers under running containers whose image was removed). Returns the removed
        diff_ids. Waits for running imports to finish."""
        fd = self._lock_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            used = {_hex(d) for rec in self.list() for d in rec.layers} | {_hex(d) for d in keep}
            removed = []
            for entry in os.scandir(self.layers_dir):
                if entry.name not in used:
                    _rmtree(Path(entry.path))
                    removed.append(f"sha256:{entry.name}")
            self._sweep_tmp()
            return removed
        finally:
            os.close(fd)

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
        try:
            return ImageRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError as e:
            log.error("ignoring unreadable image record %s: %s", path, e)
            return None

    def _write_record(self, rec: ImageRecord) -> None:
        path = self._record_path(rec.ref)
        fd, tmp = tempfile.mkstemp(dir=self.images_dir, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(rec.model_dump_json(indent=2).encode())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fsync_dir(self.images_dir)

    def _layer_dir(self, diff_id: str) -> Path:
        return self.layers_dir / _hex(diff_id)


def _hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not DIGEST_RE.fullmatch(digest):
        raise ImageError(f"invalid layer digest {digest!r}")
    return hexd




def _rmtree(path: Path) -> None:
    def retry(func: Any, p: str, _exc: Any) -> None:
        # Unprivileged runs meet the images' read-only directories: open them up.
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=retry)
