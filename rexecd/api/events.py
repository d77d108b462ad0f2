"""``GET /containers/events``: a WebSocket of the caller's container events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from rexecd.api.auth import WS_PROTOCOLS, principal
from rexecd.api.containers import COMMON_ERRORS
from rexecd.api.endpoint import Endpoint
from rexecd.api.keys import IN_FLIGHT, SERVICE, track_websocket
from rexecd.api.wire import decode_json, respond
from rexecd.errors import InvalidJson
from rexecd.models import Event
from rexecd.service.auth import Principal

log = logging.getLogger("rexecd.api")

# WebSocket-level pings find clients that vanished without a close (laptop lid shut),
# so their subscriptions do not pile up.
HEARTBEAT_S = 30.0
EVENTS_PATH = "/api/containers/events"

Send = Callable[[Event], Awaitable[None]]


async def _pump(events: AsyncIterator[Event], send: Send, listed: asyncio.Event) -> None:
    try:
        async for event in events:
            await listed.wait()
            await send(event)
    except Exception as exc:
        # The client went away mid-send, or the service's stream broke: either way
        # this socket is done.
        log.debug("event stream ended: %r", exc)


async def _answer_pings(ws: web.WebSocketResponse, send: Send) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.TEXT and _is_ping(msg.data):
            await send(Event(type="pong"))


async def _close_iterator(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def _is_ping(data: str) -> bool:
    # Every other frame, JSON or not, however deep or large, is ignored.
    try:
        frame = decode_json(data)
    except InvalidJson:
        return False
    return isinstance(frame, dict) and frame.get("type") == "ping"


async def container_events(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    service = request.app[SERVICE]
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, heartbeat=HEARTBEAT_S)
    if not ws.can_prepare(request):
        # Not an upgrade: a plain GET of the container that happens to be named "events".
        return respond(await service.get_container(p, "events"))
    # A 429 before the upgrade past the cap; the slot is held while the socket is open.
    with request.app[IN_FLIGHT].hold(p.user_id, "events"):
        return await _stream(request, p, ws)


async def _stream(
    request: web.Request, p: Principal, ws: web.WebSocketResponse
) -> web.StreamResponse:
    """The list frame, then ``p``'s events until the client or the service ends it."""
    service = request.app[SERVICE]
    # The pump and the ping answers share the socket; one frame at a time.
    lock = asyncio.Lock()

    async def send(event: Event) -> None:
        async with lock:
            await ws.send_str(event.model_dump_json(by_alias=True))

    # Subscribed before the listing is taken, so no change falls between the two. The
    # pump starts reading at once because an async generator subscribes only when
    # first iterated; what it reads waits for the list frame to go out first.
    listed = asyncio.Event()
    events = service.subscribe(p)
    tasks = {asyncio.create_task(_pump(events, send, listed))}
    try:
        await asyncio.sleep(0)
        containers = await service.list_containers(p)
        await ws.prepare(request)
        track_websocket(request, ws)
        await send(Event(type="list", containers=containers))
        listed.set()
        tasks.add(asyncio.create_task(_answer_pings(ws, send)))
        # Whichever ends first (client gone, or the service's stream over) ends both.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_iterator(events)
        if ws.prepared:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"event stream ended")
    return ws


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        EVENTS_PATH,
        container_events,
        'WebSocket: a {"type": "list"} frame, then one frame per container event; '
        'send {"type": "ping"} to get {"type": "pong"}',
        "events",
        response=Event,
        status=101,
        errors=(*COMMON_ERRORS,),
        websocket=True,
    ),
)
