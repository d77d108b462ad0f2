"""Layer blob streams: compression sniffed by magic bytes, digests checked as bytes flow."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import zstandard

from rexecd.errors import ImageError, UnsupportedImage

from .limits import Budget, RatioGuard

# Large reads keep the per-call Python overhead small next to hashing and inflating.
CHUNK = 1 << 20

# Compressed bytes handed to zlib at a time (see _GzipReader).
_IN_PIECE = 64 * 1024

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_XZ = b"\xfd7zXZ\x00"
_BZIP2 = b"BZh"


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class CountingReader:
    """Passes bytes through unchanged while counting them."""

    def __init__(self, raw: Reader) -> None:
        self._raw = raw
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._raw.read(n)
        self.count += len(data)
        return data


class HashingReader:
    """Passes bytes through unchanged while hashing and counting them."""

    def __init__(self, raw: Reader, algo: str = "sha256") -> None:
        self._raw = raw
        self.algo = algo
        self._hash = hashlib.new(algo)
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        # The digest covers every byte, including what a tar or gzip reader stops short
        # of (end-of-archive padding, trailing data): read the stream to its end.
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return f"{self.algo}:{self._hash.hexdigest()}"


class _Prefixed:
    """A reader that first replays bytes already taken to sniff the format."""

    def __init__(self, head: bytes, raw: Reader) -> None:
        self._head = head
        self._pos = 0
        self._raw = raw

    def read(self, n: int = -1, /) -> bytes:
        if self._pos < len(self._head):
            end = len(self._head) if n < 0 else self._pos + n
            data = self._head[self._pos : end]
            self._pos += len(data)
            return data
        return self._raw.read(n)


class _GzipReader:
    """Inflates a gzip stream, including several concatenated members (pigz, appends).

    Compressed input goes in small pieces and output is served from a buffer by
    offset: zlib's ``unconsumed_tail`` and bytes slicing copy what remains, so large
    pieces on either side would make the copying quadratic.
    """

    def __init__(self, raw: Reader, label: str) -> None:
        self._raw = raw
        self._label = label
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in = b""
        self._out = b""
        self._pos = 0
        self._done = False

    def _fill(self) -> bool:
        more = self._raw.read(_IN_PIECE)
        self._in += more
        return bool(more)

    def read(self, n: int = -1, /) -> bytes:
        while self._pos >= len(self._out):
            if self._done:
                return b""
            self._out, self._pos = self._inflate(), 0
        end = len(self._out) if n < 0 else self._pos + n
        data = self._out[self._pos : end]
        self._pos += len(data)
        return data

    def _inflate(self) -> bytes:
        if not self._in and not self._fill():
            if not self._d.eof:
                raise ImageError(f"{self._label}: truncated gzip stream")
            self._done = True
            return b""
        if self._d.eof:
            # Between members: another member follows only if it starts with the magic.
            if len(self._in) < 2 and self._fill():
                return b""
            if self._in[:2] != _GZIP:
                self._done = True  # trailing bytes: still hashed, never inflated
                return b""
            self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = self._d.decompress(self._in, CHUNK)
        except zlib.error as e:
            raise ImageError(f"{self._label}: corrupt gzip stream: {e}") from None
        self._in = self._d.unconsumed_tail or self._d.unused_data
        return out


class _ZstdReader:
    def __init__(self, raw: Any, label: str) -> None:
        self._label = label
        self._r: Any = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=CHUNK, read_across_frames=True, closefd=False
        )

    def read(self, n: int = -1, /) -> bytes:
        try:
            data: bytes = self._r.read(CHUNK if n < 0 else n)
        except zstandard.ZstdError as e:
            raise ImageError(f"{self._label}: corrupt zstd stream: {e}") from None
        return data


class _OneShotReader:
    """Inflates an xz or bzip2 stream (plain rootfs tarballs come so; image layers never
    do) through a decompressor object with ``max_length``, like the gzip reader."""

    def __init__(self, raw: Reader, label: str, kind: str) -> None:
        self._raw = raw
        self._label = label
        self._kind = kind
        self._d: lzma.LZMADecompressor | bz2.BZ2Decompressor = (
            lzma.LZMADecompressor() if kind == "xz" else bz2.BZ2Decompressor()
        )

    def read(self, n: int = -1, /) -> bytes:
        limit = CHUNK if n < 0 else n
        while not self._d.eof:
            data = b"" if not self._d.needs_input else self._raw.read(_IN_PIECE)
            if self._d.needs_input and not data:
                raise ImageError(f"{self._label}: truncated {self._kind} stream")
            try:
                out = self._d.decompress(data, limit)
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise ImageError(f"{self._label}: corrupt {self._kind} stream: {e}") from None
            if out:
                return out
        return b""


def compression_of(head: bytes) -> str:
    """Name the compression from a blob's first bytes: "gzip", "zstd" or "tar" (none)."""
    if head.startswith(_GZIP):
        return "gzip"
    if head.startswith(_ZSTD):
        return "zstd"
    if head.startswith(_XZ):
        return "xz"
    if head.startswith(_BZIP2):
        return "bzip2"
    return "tar"


def decompress(raw: Reader, label: str, allow_any: bool = False) -> tuple[str, Reader]:
    """Sniff ``raw`` and return its compression name and a reader of the plain bytes.

    Image blobs are gzip, zstd or plain; ``allow_any`` also takes xz and bzip2, which
    plain rootfs tarballs (mmdebstrap, debootstrap) often come in."""
    head = raw.read(CHUNK)
    # A pipe may hand over fewer bytes than the longest magic on the first read.
    while 0 < len(head) < len(_XZ) and (more := raw.read(CHUNK)):
        head += more
    kind = compression_of(head)
    src = _Prefixed(head, raw)
    if kind == "gzip":
        return kind, _GzipReader(src, label)
    if kind == "zstd":
        return kind, _ZstdReader(src, label)
    if kind == "tar":
        return kind, src
    if kind in ("xz", "bzip2") and allow_any:
        return kind, _OneShotReader(src, label, kind)
    raise UnsupportedImage(f"{label}: {kind} compression is not supported (gzip, zstd or none)")


def check_digest(got: str, want: str, what: str) -> None:
    if got != want:
        raise ImageError(f"{what}: digest mismatch: archive says {want}, content is {got}")


class LayerStream:
    """The uncompressed tar of a layer blob as it is read; once the ``open_layer`` block
    has ended, ``diff_id``, ``blob_digest`` and ``size`` (of the blob) are what was read."""

    def __init__(self, stream: Reader) -> None:
        self._stream = stream
        self.diff_id = ""
        self.blob_digest = ""
        self.size = 0  # bytes of the blob as read
        self.diff_size = 0  # bytes of the uncompressed tar

    def read(self, n: int = -1, /) -> bytes:
        return self._stream.read(n)


@contextmanager
def open_layer(
    raw: Reader,
    *,
    label: str,
    diff_id: str | None,
    blob_digest: str | None,
    blob_size: int | None,
    budget: Budget,
    any_compression: bool = False,
) -> Iterator[LayerStream]:
    """Yield the uncompressed tar stream of a layer blob.

    On a clean exit the rest of the blob is read and its size, digest (when the archive
    names one) and diff_id (when known: a plain rootfs import learns it here) are
    checked; a mismatch is an ImageError naming ``label``. Bytes already consumed before
    a mismatch was found are only ever written into a temporary directory that the
    caller discards. Every decompressed byte, including what the check reads past the
    end of the tar, is charged to ``budget`` as it is read (see limits.py).
    """
    algo = blob_digest.partition(":")[0] if blob_digest else "sha256"
    if algo not in ("sha256", "sha512"):
        raise UnsupportedImage(f"{label}: unsupported digest algorithm {algo!r}")
    outer = HashingReader(raw, algo)
    kind, plain = decompress(outer, label, any_compression)
    stream = RatioGuard(plain, outer, budget, label, ratio=kind != "tar")
    # An uncompressed blob is its own diff: hash it once, not twice.
    inner = HashingReader(stream) if kind != "tar" or algo != "sha256" else None
    layer = LayerStream(inner if inner is not None else stream)
    yield layer
    if inner is not None:
        inner.drain()
    outer.drain()
    if blob_size is not None and outer.count != blob_size:
        raise ImageError(f"{label}: size mismatch: archive says {blob_size}, read {outer.count}")
    if blob_digest is not None:
        check_digest(outer.digest, blob_digest, label)
    got = inner.digest if inner is not None else outer.digest
    if diff_id is not None:
        check_digest(got, diff_id, f"{label} diff_id")
    layer.diff_id, layer.blob_digest, layer.size = got, outer.digest, outer.count
    layer.diff_size = inner.count if inner is not None else outer.count
