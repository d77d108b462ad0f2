"""Volume endpoints: the caller's /home/user volumes, and removal of kept ones."""

from __future__ import annotations

from aiohttp import web

from rexecd.api.auth import principal
from rexecd.api.containers import COMMON_ERRORS
from rexecd.api.endpoint import Endpoint
from rexecd.api.keys import SERVICE
from rexecd.api.wire import respond
from rexecd.models import VolumeDeleted, VolumeList


async def list_volumes(request: web.Request) -> web.Response:
    return respond(await request.app[SERVICE].list_volumes(principal(request)))


async def delete_volume(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[SERVICE].delete_volume(principal(request), name)
    return respond(VolumeDeleted(message="volume deleted", name=name))


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/api/volumes",
        list_volumes,
        "List the caller's /home/user volumes: in use by a container of their name, or "
        "kept after its delete (with the tier's caps on kept ones)",
        "volumes",
        response=VolumeList,
        errors=COMMON_ERRORS,
    ),
    Endpoint(
        "DELETE",
        "/api/volumes/{name}",
        delete_volume,
        "Delete a kept volume with its data",
        "volumes",
        response=VolumeDeleted,
        # 404: the caller has no volume of this name; 409: a container of this name
        # exists (delete it with ?volumes=true instead).
        errors=(*COMMON_ERRORS, 404, 409),
    ),
)
