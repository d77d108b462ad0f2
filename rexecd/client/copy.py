"""``rexec cp``: files and directory trees between this host and a container, as tar
streams through the exec stream (the container's own ``tar`` packs and unpacks).

A tar that comes out of a container is the tenant's to shape, so it is unpacked
here as hostile input: no absolute names, no ``..``, no link (symbolic or hard)
that points outside the destination, no write through a symlink, no device node
or FIFO, no setuid or setgid bit; names are renamed onto the destination only
after those checks. Permission bits (and the sticky bit) and contents arrive as
they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rexecd.client.interactive import read_chunks
from rexecd.client.sdk import ApiError, AsyncClient, ExecStream
from rexecd.client.terminal import write_all

# Permission bits and the sticky bit; setuid and setgid from a container are dropped.
_KEPT_MODE = 0o1777


class CopyError(Exception):
    """A copy that cannot go ahead (bad arguments, nothing at the source)."""


@dataclass(frozen=True)
class Endpoint:
    """One side of ``rexec cp``: a local path, or ``container:path``."""

    container: str | None
    path: str


def parse_endpoint(arg: str) -> Endpoint:
    """``NAME:PATH`` names a container's path; anything else (``./a:b``, ``/x``) is local.

    As with ``docker cp``, a local path with a colon is given with a ``/`` or ``./``
    in front of it.
    """
    name, sep, path = arg.partition(":")
    if sep and name and "/" not in name:
        return Endpoint(name, path or ".")
    return Endpoint(None, arg)


def _rename(name: str, first: str | None) -> str:
    if first is None:
        return name
    _head, sep, rest = name.partition("/")
    return first + sep + rest


def _safe_member(
    dest: str, first: str | None
) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise tarfile.SpecialFileError(member)
        name = _rename(posixpath.normpath(member.name), first)
        renamed = member.replace(name=name, deep=False)
        if member.islnk():
            renamed = renamed.replace(linkname=_rename(member.linkname, first), deep=False)
        # The standard library's "data" filter: absolute names, "..", links leading out
        # of ``dest`` (also through symlinks already on disk) are refused.
        checked = tarfile.data_filter(renamed, path)
        if checked is None:
            return None
        # Ownership is not applied (the caller's user owns what it unpacks); the mode
        # is, except setuid/setgid, which data_filter would also strip group/other
        # write from, losing byte-for-byte fidelity of permissions.
        if checked.issym():
            return checked
        return checked.replace(mode=member.mode & _KEPT_MODE, deep=False)

    return check


def _unpack(fd: int, dest: str, first: str | None) -> None:
    with os.fdopen(fd, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        tar.extractall(dest, filter=_safe_member(dest, first))


def _pack(fd: int, src: Path, arcname: str, warn: list[str]) -> None:
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            warn.append(f"skipped {info.name}: not a file, directory or link")
            return None
        # The container's root owns what arrives, as with docker cp.
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        tar.add(str(src), arcname=arcname, filter=keep)


async def _is_dir(c: AsyncClient, container: str, path: str) -> bool:
    try:
        await c.list_files(container, path)
    except ApiError as e:
        if e.status in (401, 403):
            raise
        return False
    return True


async def _drain_errors(stream: ExecStream, stderr: bytearray) -> int:
    async for kind, value in stream:
        if kind == "stderr":
            stderr += value
        elif kind == "exit":
            code: int = value
            return code
        elif kind == "error":
            error: ApiError = value
            raise error
    raise ApiError(502, {"error": "the exec stream closed without an exit status"})


async def copy_to(c: AsyncClient, src: str, dst: Endpoint) -> int:
    """Local ``src`` into the container; returns 0 or the container tar's status."""
    assert dst.container is not None
    local = Path(src)
    if not local.exists() and not local.is_symlink():
        raise CopyError(f"{src}: no such file or directory")
    target = dst.path if dst.path.startswith("/") else "/home/user/" + dst.path
    if target.endswith("/") or await _is_dir(c, dst.container, target):
        directory, arcname = target, local.resolve().name or "root"
    else:
        directory, arcname = posixpath.dirname(target) or "/", posixpath.basename(target)
    r, w = os.pipe()
    warn: list[str] = []
    packer = asyncio.ensure_future(asyncio.to_thread(_pack, w, local, arcname, warn))
    stderr = bytearray()
    argv = ["tar", "-x", "-p", "-f", "-", "-C", directory]
    try:
        async with c.exec_stream(dst.container, argv) as stream:

            async def send() -> None:
                async for chunk in read_chunks(r):
                    await stream.send_stdin(chunk)
                await stream.close_stdin()

            sender = asyncio.ensure_future(send())
            try:
                code = await _drain_errors(stream, stderr)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
    finally:
        os.close(r)
        with contextlib.suppress(Exception):
            await packer
    for line in warn:
        sys.stderr.write(f"rexec: {line}\n")
    sys.stderr.write(stderr.decode(errors="replace"))
    return code


async def copy_from(c: AsyncClient, src: Endpoint, dst: str) -> int:
    """The container's ``src`` to local ``dst``; returns 0 or the container tar's status."""
    assert src.container is not None
    path = src.path if src.path.startswith("/") else "/home/user/" + src.path
    path = posixpath.normpath(path)
    parent, base = posixpath.dirname(path), posixpath.basename(path)
    if not base:
        raise CopyError("copy a named file or directory, not /")
    local = Path(dst)
    if local.is_dir():
        dest, first = str(local), None
    elif local.parent.is_dir():
        dest, first = str(local.parent), local.name
    else:
        raise CopyError(f"{dst}: no such directory")
    r, w = os.pipe()
    unpacker = asyncio.ensure_future(asyncio.to_thread(_unpack, r, dest, first))
    stderr = bytearray()
    code: int | None = None
    try:
        argv = ["tar", "-c", "-f", "-", "-C", parent or "/", base]
        async with c.exec_stream(src.container, argv) as stream:
            async for kind, value in stream:
                if kind == "stdout":
                    try:
                        await asyncio.to_thread(write_all, w, value)
                    except BrokenPipeError:
                        break  # the unpacker refused the archive: its error says why
                elif kind == "stderr":
                    stderr += value
                elif kind == "exit":
                    code = value
                    break
                elif kind == "error":
                    raise value
    finally:
        os.close(w)
        refused: BaseException | None = None
        try:
            await unpacker
        except (tarfile.TarError, OSError) as e:
            refused = e
    sys.stderr.write(stderr.decode(errors="replace"))
    if code:
        return code  # the container's tar failed (no such file...): it said why
    if refused is not None:
        raise CopyError(f"refused the archive from the container: {refused}")
    return 0 if code == 0 else 1


def check_pair(src: Endpoint, dst: Endpoint) -> None:
    if (src.container is None) == (dst.container is None):
        raise CopyError("one side of rexec cp must be NAME:PATH and the other a local path")
