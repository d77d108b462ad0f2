"""Blocking wrapper of the async client, for scripts and REPLs.

Design: each :class:`Client` owns one event loop running in a daemon thread, and every
method submits the matching :class:`AsyncClient` coroutine to it and waits for the
result. Unlike ``asyncio.run`` per call, this keeps one connection pool for the life
of the client and lets streams (events, create progress, terminals) stay open between
calls; it also works when the caller's own thread already runs an event loop.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
)
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from rexecd.client.sdk import AsyncClient, EventStream, TerminalSession
from rexecd.models import Event, StreamProgress, TerminalFrame

P = ParamSpec("P")
T = TypeVar("T")


class _Loop:
    """An event loop running in its own daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="rexec-client-loop", daemon=True
        )
        self._thread.start()
        self.closed = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C in the caller must not leave the coroutine running on its own.
            future.cancel()
            raise

    def stop(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(method(self._async, *args, **kwargs))

    return call


class _SyncSocket:
    """What both blocking WebSocket views share: ``close()`` and ``with``."""

    _loop: _Loop

    def _close(self) -> Coroutine[Any, Any, None]:
        raise NotImplementedError

    def close(self) -> None:
        if not self._loop.closed:
            self._loop.run(self._close())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncEventStream(_SyncSocket):
    """Blocking view of :class:`EventStream`: iterate it, then ``close()`` (or use ``with``)."""

    def __init__(self, loop: _Loop, stream: EventStream) -> None:
        self._loop = loop
        self._stream = stream

    def ping(self) -> None:
        self._loop.run(self._stream.ping())

    def _close(self) -> Coroutine[Any, Any, None]:
        return self._stream.close()

    def __iter__(self) -> Iterator[Event]:
        return _iterate(self._loop, self._stream)


class SyncTerminal(_SyncSocket):
    """Blocking view of :class:`TerminalSession`; ``receive()`` returns None once closed."""

    def __init__(self, loop: _Loop, session: TerminalSession) -> None:
        self._loop = loop
        self._session = session

    @property
    def closed(self) -> bool:
        return self._session.closed

    @property
    def protocol(self) -> str | None:
        return self._session.protocol

    def send_input(self, data: str) -> None:
        self._loop.run(self._session.send_input(data))

    def send_raw(self, data: bytes) -> None:
        self._loop.run(self._session.send_raw(data))

    def send_frame(self, frame: TerminalFrame) -> None:
        self._loop.run(self._session.send_frame(frame))

    def resize(self, cols: int, rows: int) -> None:
        self._loop.run(self._session.resize(cols, rows))

    def ping(self) -> None:
        self._loop.run(self._session.ping())

    def receive(self, timeout: float | None = None) -> TerminalFrame | None:
        """The next frame; ``TimeoutError`` if none comes within ``timeout`` seconds."""
        if timeout is None:
            return self._loop.run(self._session.receive())
        return self._loop.run(asyncio.wait_for(self._session.receive(), timeout))

    def _close(self) -> Coroutine[Any, Any, None]:
        return self._session.close()

    def __iter__(self) -> Iterator[TerminalFrame]:
        while (frame := self.receive()) is not None:
            yield frame


async def _next(iterator: AsyncIterator[T]) -> list[T]:
    # The end comes back as a value, so only real failures travel as exceptions.
    try:
        return [await iterator.__anext__()]
    except StopAsyncIteration:
        return []


def _iterate(loop: _Loop, iterator: AsyncIterator[T]) -> Generator[T, None, None]:
    try:
        while item := loop.run(_next(iterator)):
            yield item[0]
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None and not loop.closed:
            loop.run(aclose())


class Client:
    """Blocking rexecd client: the methods of :class:`AsyncClient`, returning plain values.

    ``Client(host, token)`` takes the same arguments (and environment defaults); use it
    as a context manager or call ``close()`` to stop its background thread.
    """

    def __init__(
        self, host: str | None = None, token: str | None = None, *, timeout: float | None = 60.0
    ) -> None:
        self._async = AsyncClient(host, token, timeout=timeout)
        self._loop = _Loop()

    @property
    def host(self) -> str:
        return self._async.host

    @property
    def token(self) -> str | None:
        return self._async.token

    @property
    def rate_limit(self) -> tuple[int, int] | None:
        return self._async.rate_limit

    def close(self) -> None:
        if not self._loop.closed:
            self._loop.run(self._async.close())
            self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    health = _blocking(AsyncClient.health)
    version = _blocking(AsyncClient.version)
    openapi = _blocking(AsyncClient.openapi)
    list_containers = _blocking(AsyncClient.list_containers)
    get = _blocking(AsyncClient.get)
    create = _blocking(AsyncClient.create)
    wait_for = _blocking(AsyncClient.wait_for)
    start = _blocking(AsyncClient.start)
    stop = _blocking(AsyncClient.stop)
    restart = _blocking(AsyncClient.restart)
    delete = _blocking(AsyncClient.delete)
    update_settings = _blocking(AsyncClient.update_settings)
    exec = _blocking(AsyncClient.exec)
    stats = _blocking(AsyncClient.stats)
    upload_file = _blocking(AsyncClient.upload_file)
    download_file = _blocking(AsyncClient.download_file)
    list_files = _blocking(AsyncClient.list_files)
    delete_file = _blocking(AsyncClient.delete_file)
    mkdir = _blocking(AsyncClient.mkdir)
    add_port_forward = _blocking(AsyncClient.add_port_forward)
    list_port_forwards = _blocking(AsyncClient.list_port_forwards)
    delete_port_forward = _blocking(AsyncClient.delete_port_forward)
    list_volumes = _blocking(AsyncClient.list_volumes)
    delete_volume = _blocking(AsyncClient.delete_volume)
    images = _blocking(AsyncClient.images)
    roles = _blocking(AsyncClient.roles)
    import_image = _blocking(AsyncClient.import_image)
    create_token = _blocking(AsyncClient.create_token)
    list_tokens = _blocking(AsyncClient.list_tokens)
    revoke_token = _blocking(AsyncClient.revoke_token)
    validate_token = _blocking(AsyncClient.validate_token)

    def create_stream(
        self,
        image: str,
        *,
        name: str | None = None,
        role: str | None = None,
        custom_image: str | None = None,
        memory_mb: int | None = None,
        cpu_shares: int | None = None,
        disk_mb: int | None = None,
        environment: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Generator[StreamProgress, None, None]:
        """The creation progress frames; ``close()`` it to stop early."""
        stream = self._async.create_stream(
            image,
            name=name,
            role=role,
            custom_image=custom_image,
            memory_mb=memory_mb,
            cpu_shares=cpu_shares,
            disk_mb=disk_mb,
            environment=environment,
            labels=labels,
        )
        return _iterate(self._loop, stream)

    def events(self) -> SyncEventStream:
        """The live events, connected already (so a refused upgrade raises here)."""
        stream = self._async.events()
        self._loop.run(stream.connect())
        return SyncEventStream(self._loop, stream)

    def terminal(
        self, container: str, session: str | None = None, new_session: bool = False
    ) -> SyncTerminal:
        """A connected terminal session; see :meth:`AsyncClient.terminal`."""
        term = self._async.terminal(container, session, new_session)
        self._loop.run(term.connect())
        return SyncTerminal(self._loop, term)
