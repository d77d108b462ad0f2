"""File endpoints of a running container: upload, download, list, delete, mkdir."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from urllib.parse import quote, unquote

from aiohttp import BodyPartReader, web

from rexecd.api.auth import principal
from rexecd.api.containers import REF_ERRORS, ref
from rexecd.api.endpoint import Endpoint, Query
from rexecd.api.keys import SERVICE
from rexecd.api.multipart import open_form, read_chunk
from rexecd.api.ratelimit import in_flight
from rexecd.api.wire import parse_model, read_json, respond, respond_json
from rexecd.errors import InvalidRequest, PayloadTooLarge
from rexecd.models import FileInfo, FileList, FilePathBody

UPLOAD_MAX_BYTES = 100 * 1024 * 1024
# Boundaries and part headers around the file, so a file of exactly the cap still fits.
_MULTIPART_SLACK = 64 * 1024
_PATH_FIELD_MAX = 4096
CHUNK_BYTES = 64 * 1024
# Where uploads go, and what is listed, when no path is given: the user's home volume.
HOME_DIR = "/home/user"
MSG_NO_PATH = 'path is required: give ?path= or a JSON body {"path": ...}'
MSG_TOO_LARGE = f"file too large: the limit is {UPLOAD_MAX_BYTES // (1024 * 1024)} MB"
MSG_NOT_MULTIPART = "expected a multipart/form-data body with a 'file' field"
MSG_NO_FILE = "multipart field 'file' is required"

PATH_QUERY = Query("path", "path inside the container")


async def request_path(request: web.Request, default: str | None = None) -> str:
    """``?path=``, else ``{"path"}`` from a JSON body, else ``default``."""
    path = request.query.get("path")
    if path:
        return path
    if request.body_exists and not request.content_type.startswith("multipart/"):
        data = await read_json(request)
        if data is not None:
            return parse_model(FilePathBody, data).path
    if default is None:
        raise InvalidRequest(MSG_NO_PATH)
    return default


def _file_body(message: str, info: FileInfo) -> web.Response:
    return respond_json({"message": message, **info.model_dump(mode="json", by_alias=True)})


def _content_disposition(name: str) -> str:
    # RFC 6266: a plain ASCII fallback for old clients, the exact name in filename*.
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _upload_name(raw: str | None) -> str:
    # Browsers percent-encode '"' and newlines in the name, and some clients (aiohttp's
    # own) percent-encode everything: decoded, both give the name the user picked.
    decoded = unquote(raw or "")
    # Some clients send the client-side path; only its last part is a name.
    name = PurePosixPath(decoded.replace("\\", "/")).name
    if name in ("", ".", ".."):
        raise InvalidRequest("the 'file' part needs a file name", filename=raw)
    return name


async def _read_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await read_chunk(part, CHUNK_BYTES):
        data += chunk
        if len(data) > _PATH_FIELD_MAX:
            raise InvalidRequest(f"multipart field {part.name!r} is too long")
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise InvalidRequest(f"multipart field {part.name!r} is not UTF-8") from None


async def _chunks(part: BodyPartReader, limit: int) -> AsyncIterator[bytes]:
    total = 0
    while chunk := await read_chunk(part, CHUNK_BYTES):
        total += len(chunk)
        # Counted here as well as by the service: a client that sends no
        # Content-Length is stopped as soon as it passes the cap.
        if total > limit:
            raise PayloadTooLarge(MSG_TOO_LARGE, limit=limit)
        yield chunk


async def upload_file(request: web.Request) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequest(MSG_NOT_MULTIPART)
    length = request.content_length
    if length is not None and length > UPLOAD_MAX_BYTES + _MULTIPART_SLACK:
        raise PayloadTooLarge(MSG_TOO_LARGE, limit=UPLOAD_MAX_BYTES)
    p = principal(request)
    directory = request.query.get("path") or None
    form = await open_form(request)
    while (part := await form.next()) is not None:
        if part.name == "path" and directory is None:
            directory = await _read_field(part) or None
        elif part.name == "file":
            info = await request.app[SERVICE].upload_file(
                p,
                ref(request),
                directory or HOME_DIR,
                _upload_name(part.filename),
                _chunks(part, UPLOAD_MAX_BYTES),
                UPLOAD_MAX_BYTES,
            )
            return _file_body("file uploaded", info)
    raise InvalidRequest(MSG_NO_FILE)


async def download_file(request: web.Request) -> web.StreamResponse:
    path = await request_path(request)
    download = await request.app[SERVICE].open_file(principal(request), ref(request), path)
    fileobj = download.fileobj
    try:
        info = download.info
        response = web.StreamResponse(
            headers={
                "Content-Disposition": _content_disposition(info.name),
                "X-File-Size": str(info.size),
                "X-File-Mode": info.mode,
            }
        )
        response.content_type = "application/octet-stream"
        # Chunked rather than Content-Length: the file may change size while it is read,
        # and a short body under a length would leave the client waiting.
        response.enable_chunked_encoding()
        await response.prepare(request)
        while chunk := await asyncio.to_thread(fileobj.read, CHUNK_BYTES):
            await response.write(chunk)
        return response
    finally:
        await asyncio.to_thread(fileobj.close)


async def list_files(request: web.Request) -> web.Response:
    path = await request_path(request, default=HOME_DIR)
    listing = await request.app[SERVICE].list_files(principal(request), ref(request), path)
    return respond(listing)


async def delete_file(request: web.Request) -> web.Response:
    path = await request_path(request)
    await request.app[SERVICE].delete_file(principal(request), ref(request), path)
    return respond_json({"message": "file deleted", "path": path})


async def make_dir(request: web.Request) -> web.Response:
    path = await request_path(request)
    info = await request.app[SERVICE].make_dir(principal(request), ref(request), path)
    return _file_body("directory created", info)


_F = "/api/containers/{id}/files"
_FILE_ERRORS = (400, *REF_ERRORS, 409)

# A file endpoint is an operation whatever its method: a download moves as much data
# as an upload.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        _F,
        in_flight("files", upload_file),
        f"Upload a file (multipart field `file`, at most {UPLOAD_MAX_BYTES} bytes) into a "
        f"directory (default {HOME_DIR})",
        "files",
        body="multipart/form-data",
        response=FileInfo,
        errors=(*_FILE_ERRORS, 413),
        query=(Query("path", "directory to upload into"),),
        rate="ops",
    ),
    Endpoint(
        "GET",
        _F,
        in_flight("files", download_file),
        "Download a file's raw bytes (X-File-Size, X-File-Mode headers)",
        "files",
        response="application/octet-stream",
        errors=_FILE_ERRORS,
        query=(PATH_QUERY,),
        rate="ops",
    ),
    Endpoint(
        "GET",
        f"{_F}/list",
        in_flight("files", list_files),
        f"List a directory (default {HOME_DIR})",
        "files",
        response=FileList,
        errors=_FILE_ERRORS,
        query=(Query("path", "directory to list"),),
        rate="ops",
    ),
    Endpoint(
        "DELETE",
        _F,
        in_flight("files", delete_file),
        "Delete a file or directory",
        "files",
        errors=_FILE_ERRORS,
        query=(PATH_QUERY,),
        rate="ops",
    ),
    Endpoint(
        "POST",
        f"{_F}/mkdir",
        in_flight("files", make_dir),
        "Create a directory",
        "files",
        response=FileInfo,
        errors=_FILE_ERRORS,
        query=(PATH_QUERY,),
        rate="ops",
    ),
)
