"""``POST /containers/stream``: container creation reported as Server-Sent Events."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from rexecd.api.auth import principal
from rexecd.api.containers import COMMON_ERRORS
from rexecd.api.endpoint import Endpoint
from rexecd.api.errors import MSG_INTERNAL
from rexecd.api.keys import SERVICE
from rexecd.api.wire import read_model
from rexecd.errors import RexecError
from rexecd.models import ContainerCreate, ContainerOut, StreamProgress

log = logging.getLogger("rexecd.api")

# Creation may unpack a large image on a slow disk; the stream stays open that long.
READY_TIMEOUT_S = 900.0
MSG_READY = "container is ready"
MSG_READY_TIMEOUT = "timed out waiting for the container to become ready"


class SseProgress:
    """The progress callback handed to the service, writing one ``data:`` frame each.

    The response is prepared lazily, on the first frame: an error raised before any
    frame (quota, name taken, unknown image) is then still a plain JSON answer with
    its real status code, which is what clients check first.
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response: web.StreamResponse | None = None
        # Frames come both from the service's background task and from the handler.
        self._lock = asyncio.Lock()
        self._closed = False
        self.last: StreamProgress | None = None
        self.finished = False

    @property
    def started(self) -> bool:
        return self._response is not None

    @property
    def response(self) -> web.StreamResponse:
        assert self._response is not None
        return self._response

    async def start(self) -> None:
        async with self._lock:
            await self._start()

    async def _start(self) -> web.StreamResponse:
        if self._response is None:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    # Tell a buffering reverse proxy (nginx) to pass frames through as they come.
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(self._request)
            self._response = response
        return self._response

    async def __call__(self, frame: StreamProgress) -> None:
        async with self._lock:
            if self._closed or self.finished:
                return
            self.last = frame
            self.finished = frame.complete or frame.error is not None
            data = frame.model_dump_json(by_alias=True).encode()
            try:
                response = await self._start()
                await response.write(b"data: " + data + b"\n\n")
            except Exception as exc:
                # This runs inside the service's creation task: a client that went
                # away must not abort the creation, so nothing is raised from here.
                log.debug("progress stream closed: %s", exc)
                self._closed = True

    async def fail(self, message: str, container: ContainerOut | None = None) -> None:
        last = self.last
        await self(
            StreamProgress(
                stage=last.stage if last else "validating",
                message=message,
                progress=last.progress if last else 0,
                container_id=container.id if container else (last.container_id if last else None),
                container=container,
                error=message,
            )
        )

    def close(self) -> None:
        """Later frames from the service (after the handler returned) are dropped."""
        self._closed = True


async def create_stream(request: web.Request) -> web.StreamResponse:
    body = await read_model(request, ContainerCreate)
    p = principal(request)
    service = request.app[SERVICE]
    sse = SseProgress(request)
    try:
        created = await service.create_container(p, body, sse)
        await sse.start()
        final = await service.wait_ready(p, created.id, READY_TIMEOUT_S)
        if final.status == "running":
            ready = StreamProgress(
                stage="ready",
                message=MSG_READY,
                progress=100,
                complete=True,
                container_id=final.id,
                container=final,
            )
            await sse(ready)
        elif final.status in ("creating", "configuring"):
            # wait_ready gave up waiting: the build goes on, this stream does not.
            await sse.fail(MSG_READY_TIMEOUT, final)
        else:
            await sse.fail(final.error_message or f"container is {final.status}", final)
    except Exception as exc:
        if not sse.started:
            raise
        if isinstance(exc, RexecError):
            message = exc.message
        elif isinstance(exc, TimeoutError):
            message = MSG_READY_TIMEOUT
        else:
            log.exception("container stream failed")
            message = MSG_INTERNAL
        await sse.fail(message)
    finally:
        sse.close()
    return sse.response


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/api/containers/stream",
        create_stream,
        "Create a container and follow its progress as Server-Sent Events "
        "(one `data: StreamProgress` frame per stage)",
        "containers",
        body=ContainerCreate,
        response="text/event-stream",
        errors=(400, *COMMON_ERRORS, 409),
        rate="create",
    ),
)
