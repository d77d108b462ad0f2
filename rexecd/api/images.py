"""Image catalogue, roles, imports (an admin streams a tarball in), pulls and the local
store (list, remove, prune)."""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from rexecd.api.containers import COMMON_ERRORS
from rexecd.api.endpoint import Endpoint, Query
from rexecd.api.keys import CONFIG, SERVICE
from rexecd.api.multipart import open_form, read_chunk
from rexecd.api.wire import read_model, respond
from rexecd.errors import InvalidRequest
from rexecd.models import (
    ImageList,
    ImageRemoved,
    ImportResult,
    LocalImageList,
    PruneOut,
    PullOut,
    PullRequest,
    RoleList,
)

CHUNK_BYTES = 256 * 1024
# Received chunks are gathered to this size before one write in a worker thread:
# a thread hop per 64 KiB chunk of a multi-GB image would dominate the upload.
_WRITE_BATCH = 4 * 1024 * 1024
MSG_EMPTY_IMPORT = "request body is empty: send an OCI-layout or docker-archive tarball"


async def list_images(request: web.Request) -> web.Response:
    images = await request.app[SERVICE].list_images()
    return respond(ImageList(images=images, count=len(images)))


async def list_roles(request: web.Request) -> web.Response:
    return respond(RoleList(roles=request.app[SERVICE].roles()))


def _spool_file(tmp: Path) -> BinaryIO:
    # The state dir is 0700 already; the tmp dir matches so an archive is never
    # readable by another local user while it waits.
    tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Unlinked at once: a crash or a dropped upload leaves nothing behind.
    return tempfile.TemporaryFile(dir=tmp)


async def _body_reader(request: web.Request) -> Callable[[int], Awaitable[bytes]]:
    """Reads of the tarball: the raw body, or the ``file`` part of a form (curl -F)."""
    if not request.content_type.startswith("multipart/"):
        return request.content.read
    form = await open_form(request)
    while (part := await form.next()) is not None:
        if part.name == "file" or part.filename:
            return functools.partial(read_chunk, part)
    raise InvalidRequest("multipart field 'file' is required")


async def _spool(read: Callable[[int], Awaitable[bytes]], dest: BinaryIO) -> int:
    total = 0
    batch = bytearray()
    while chunk := await read(CHUNK_BYTES):
        batch += chunk
        total += len(chunk)
        if len(batch) >= _WRITE_BATCH:
            await asyncio.to_thread(dest.write, bytes(batch))
            batch.clear()
    if batch:
        await asyncio.to_thread(dest.write, bytes(batch))
    return total


def _flag(request: web.Request, key: str) -> bool:
    value = request.query.get(key, "").lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise InvalidRequest(f"{key} must be true or false")
    return value in ("1", "true", "yes")


async def import_image(request: web.Request) -> web.Response:
    name = request.query.get("name") or None
    rootfs = _flag(request, "rootfs")
    read = await _body_reader(request)
    spool = await asyncio.to_thread(_spool_file, request.app[CONFIG].state_dir / "tmp")
    try:
        if await _spool(read, spool) == 0:
            raise InvalidRequest(MSG_EMPTY_IMPORT)
        await asyncio.to_thread(spool.seek, 0, os.SEEK_SET)
        result = await request.app[SERVICE].import_image(spool, name, rootfs)
    finally:
        await asyncio.to_thread(spool.close)
    return respond(result, status=201)


async def pull_image(request: web.Request) -> web.Response:
    body = await read_model(request, PullRequest)
    result = await request.app[SERVICE].pull_image(body.reference, body.name)
    return respond(result, status=201)


async def list_local(request: web.Request) -> web.Response:
    images = await request.app[SERVICE].list_local_images()
    return respond(LocalImageList(images=images, count=len(images)))


async def remove_image(request: web.Request) -> web.Response:
    return respond(await request.app[SERVICE].remove_image(request.match_info["ref"]))


async def prune_images(request: web.Request) -> web.Response:
    return respond(await request.app[SERVICE].prune_images(_flag(request, "all")))


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/api/images",
        list_images,
        "The image catalogue",
        "images",
        response=ImageList,
        errors=COMMON_ERRORS,
    ),
    Endpoint(
        "GET",
        "/api/roles",
        list_roles,
        "Roles (package sets) a container can take",
        "images",
        response=RoleList,
        errors=COMMON_ERRORS,
    ),
    Endpoint(
        "POST",
        "/api/images/import",
        import_image,
        "Import an OCI-layout or docker-archive tarball (admin scope)",
        "images",
        body="application/x-tar",
        response=ImportResult,
        status=201,
        errors=(400, *COMMON_ERRORS),
        query=(
            Query("name", "NAME:TAG to tag the image with"),
            Query(
                "rootfs",
                "true: the body is a plain root file system tarball (gzip, zstd, xz, bzip2 "
                "or none), made a one-layer image; needs name",
                "boolean",
            ),
        ),
        scope="admin",
    ),
    Endpoint(
        "POST",
        "/api/images/pull",
        pull_image,
        "Pull an image from its registry or a configured mirror (admin scope)",
        "images",
        body=PullRequest,
        response=PullOut,
        status=201,
        errors=(400, *COMMON_ERRORS, 404, 502),
        scope="admin",
    ),
    Endpoint(
        "GET",
        "/api/images/local",
        list_local,
        "Images in the local store, with how many containers were made from each",
        "images",
        response=LocalImageList,
        errors=COMMON_ERRORS,
    ),
    Endpoint(
        "DELETE",
        "/api/images/local/{ref:.+}",
        remove_image,
        "Remove a local image and the layers nothing else uses (admin scope; 409 while a "
        "container made from it exists)",
        "images",
        response=ImageRemoved,
        errors=(*COMMON_ERRORS, 404, 409),
        scope="admin",
    ),
    Endpoint(
        "POST",
        "/api/images/prune",
        prune_images,
        "Remove unreferenced layers; with all=true also every image no container uses "
        "(admin scope)",
        "images",
        response=PruneOut,
        errors=COMMON_ERRORS,
        query=(Query("all", "also remove images no container was made from", "boolean"),),
        scope="admin",
    ),
)
