"""Container lifecycle endpoints: list, create, get, start/stop/restart, delete, settings, stats."""

from __future__ import annotations

from aiohttp import web

from rexecd.api.auth import principal
from rexecd.api.endpoint import Endpoint, Query
from rexecd.api.keys import CONFIG, SERVICE
from rexecd.api.wire import query_bool, query_seconds, read_model, respond
from rexecd.models import (
    ActionResult,
    ContainerCreate,
    ContainerList,
    ContainerOut,
    DeleteResult,
    SettingsPatch,
    SettingsResult,
    Stats,
    clamped_sizes,
)

# Longer than any sensible grace period, short enough that a typo does not hold a
# request (and the container's lock) for hours.
MAX_STOP_TIMEOUT_S = 300.0
# Errors every authenticated endpoint can answer, for the OpenAPI document.
COMMON_ERRORS = (401, 403, 429)
REF_ERRORS = (*COMMON_ERRORS, 404)


def ref(request: web.Request) -> str:
    """The ``{id}`` of the path: runtime id, db id or name; the service resolves it."""
    return request.match_info["id"]


def _action(message: str, c: ContainerOut) -> web.Response:
    return respond(ActionResult(message=message, id=c.id, name=c.name, status=c.status))


async def list_containers(request: web.Request) -> web.Response:
    p = principal(request)
    service = request.app[SERVICE]
    items = await service.list_containers(p)
    return respond(
        ContainerList(containers=items, count=len(items), limit=service.container_limit(p))
    )


async def create_container(request: web.Request) -> web.Response:
    body = await read_model(request, ContainerCreate)
    c = await request.app[SERVICE].create_container(principal(request), body)
    # 202: the record exists, the container is still being built in the background.
    clamped = clamped_sizes(body, c.resources)
    return respond(c.model_copy(update={"async_": True, "clamped": clamped}), status=202)


async def get_container(request: web.Request) -> web.Response:
    return respond(await request.app[SERVICE].get_container(principal(request), ref(request)))


async def start_container(request: web.Request) -> web.Response:
    c = await request.app[SERVICE].start_container(principal(request), ref(request))
    return _action("container started", c)


async def stop_container(request: web.Request) -> web.Response:
    timeout = query_seconds(
        request, "timeout", float(request.app[CONFIG].stop_timeout_s), MAX_STOP_TIMEOUT_S
    )
    c = await request.app[SERVICE].stop_container(principal(request), ref(request), timeout)
    return _action("container stopped", c)


async def restart_container(request: web.Request) -> web.Response:
    c = await request.app[SERVICE].restart_container(principal(request), ref(request))
    return _action("container restarted", c)


async def delete_container(request: web.Request) -> web.Response:
    volumes = query_bool(request, "volumes")
    c = await request.app[SERVICE].delete_container(principal(request), ref(request), volumes)
    return respond(DeleteResult(message="container deleted", id=c.id, db_id=c.db_id, name=c.name))


async def update_settings(request: web.Request) -> web.Response:
    patch = await read_model(request, SettingsPatch)
    c, restarted = await request.app[SERVICE].update_settings(
        principal(request), ref(request), patch
    )
    c = c.model_copy(update={"clamped": clamped_sizes(patch, c.resources)})
    return respond(SettingsResult(message="settings updated", restarted=restarted, container=c))


async def container_stats(request: web.Request) -> web.Response:
    stats: Stats = await request.app[SERVICE].stats(principal(request), ref(request))
    return respond(stats)


_C = "/api/containers"
_ID = "/api/containers/{id}"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        _C,
        list_containers,
        "List the caller's containers, newest first",
        "containers",
        response=ContainerList,
        errors=COMMON_ERRORS,
    ),
    Endpoint(
        "POST",
        _C,
        create_container,
        "Create a container (continues in the background)",
        "containers",
        body=ContainerCreate,
        response=ContainerOut,
        status=202,
        errors=(400, *COMMON_ERRORS, 409),
        rate="create",
    ),
    Endpoint(
        "GET",
        _ID,
        get_container,
        "Get one container by id, db id or name",
        "containers",
        response=ContainerOut,
        errors=REF_ERRORS,
    ),
    Endpoint(
        "POST",
        f"{_ID}/start",
        start_container,
        "Start a stopped container",
        "containers",
        response=ActionResult,
        errors=(*REF_ERRORS, 409),
    ),
    Endpoint(
        "POST",
        f"{_ID}/stop",
        stop_container,
        "Stop a container: SIGTERM to init, SIGKILL to its cgroup after the timeout",
        "containers",
        response=ActionResult,
        errors=(400, *REF_ERRORS, 409),
        query=(Query("timeout", "seconds before SIGKILL (default from the config)", "number"),),
    ),
    Endpoint(
        "POST",
        f"{_ID}/restart",
        restart_container,
        "Restart a container",
        "containers",
        response=ActionResult,
        errors=(*REF_ERRORS, 409),
    ),
    Endpoint(
        "DELETE",
        _ID,
        delete_container,
        "Delete a container",
        "containers",
        response=DeleteResult,
        errors=(400, *REF_ERRORS, 409),
        query=(Query("volumes", "also delete its /home/user volume", "boolean"),),
    ),
    Endpoint(
        "PATCH",
        f"{_ID}/settings",
        update_settings,
        "Rename or resize a container",
        "containers",
        body=SettingsPatch,
        response=SettingsResult,
        errors=(400, *REF_ERRORS, 409),
    ),
    Endpoint(
        "GET",
        f"{_ID}/stats",
        container_stats,
        "Resource usage of a container",
        "containers",
        response=Stats,
        errors=(*REF_ERRORS, 409),
    ),
)
