"""A fake ContainerService (terminal sessions included) and an API harness shared by the
test_api_* modules (no tests here)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from rexecd.api import make_app
from rexecd.config import ConcurrencyConfig, Config, RateLimitsConfig
from rexecd.errors import (
    Conflict,
    ContainerNotFound,
    ContainerNotRunning,
    InvalidRequest,
    NotFound,
    RexecError,
    UnsupportedImage,
)
from rexecd.models import (
    ContainerCreate,
    ContainerOut,
    ContainerRecord,
    ContainerResources,
    ContainerStatus,
    Event,
    ExecRequest,
    FileInfo,
    FileList,
    Health,
    ImageInfo,
    ImageRemoved,
    ImportResult,
    LocalImage,
    PruneOut,
    PullOut,
    Role,
    SettingsPatch,
    Stats,
    StreamProgress,
    utcnow,
)
from rexecd.service import auth
from rexecd.service.auth import Principal
from rexecd.service.interface import FileDownload, ProgressFn, TerminalProcess
from rexecd.service.ratelimit import RateLimiter
from rexecd.service.store import Store
from rexecd.service.terminals import TerminalClient

IMAGES = ("ubuntu", "alpine")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _resources() -> ContainerResources:
    return ContainerResources(memory_mb=512, cpu_shares=500, disk_mb=2048, network_mbps=100)


class _Subscription:
    """Registers at creation, like the real service should, so no event is missed."""

    def __init__(self, queues: list[asyncio.Queue[Event | None]]) -> None:
        self._queues = queues
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        queues.append(self._queue)
        self.closed = False

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self.closed = True
        if self._queue in self._queues:
            self._queues.remove(self._queue)


class FakeTerminal:
    """A terminal session without a shell: records what the socket sent it, and echoes
    each write back as output, the way a PTY in cooked mode would."""

    def __init__(self, scrollback: bytes = b"") -> None:
        self.scrollback = scrollback
        self.written: list[bytes] = []
        self.sizes: list[tuple[int, int]] = []
        self.client: TerminalClient | None = None
        self.detached = asyncio.Event()

    async def attach(self, client: TerminalClient) -> bytes:
        old, self.client = self.client, None
        if old is not None:
            old.abort()
        return self.scrollback

    def resume(self, client: TerminalClient) -> None:
        self.client = client

    def detach(self, client: TerminalClient) -> None:
        if self.client is client:
            self.client = None
        self.detached.set()

    async def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.client is not None:
            await self.client.send_output(data)

    def resize(self, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))


class FakeService:
    """In memory, per user, raising the same errors the real manager does."""

    def __init__(self) -> None:
        self.records: dict[str, ContainerRecord] = {}
        self.limit = 5
        self.files: dict[tuple[str, str], bytes] = {}
        self.uploads: list[tuple[str, str, bytes, int]] = []
        self.imports: list[tuple[bytes, str | None]] = []
        self.pulls: list[tuple[str, str | None]] = []
        self.local = ["used:1", "team/tool:2", "free:1"]
        self.exec_answer: tuple[int, dict[str, object]] = (
            200,
            {
                "stdout": "hi\n",
                "stderr": "",
                "output": "hi\n",
                "exit_code": 0,
                "duration_ms": 3,
                "truncated": False,
            },
        )
        # Set: every exec waits for it, so a test can keep execs in flight.
        self.exec_gate: asyncio.Event | None = None
        self.stop_timeouts: list[float | None] = []
        self.deleted_volumes: list[bool] = []
        self.subscribers: dict[str, list[asyncio.Queue[Event | None]]] = {}
        self.subscriptions: list[_Subscription] = []
        self.boom: Exception | None = None
        # Subscribe like the real EventBus: an async generator, registered on first read.
        self.generator_subscriptions = False
        self.on_list: Callable[[], Awaitable[None]] | None = None
        self._ready: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # (container db id, session id) -> session; set to make opening a shell fail.
        self.terminals: dict[tuple[str, str], FakeTerminal] = {}
        self.terminal_error: RexecError | None = None

    # -- helpers for tests ------------------------------------------------------------

    def add(self, user_id: str, name: str, status: ContainerStatus = "running") -> ContainerRecord:
        rec = ContainerRecord(
            user_id=user_id,
            name=name,
            image="ubuntu",
            status=status,
            resources=_resources(),
            created_at=T0,
        )
        self.records[rec.db_id] = rec
        return rec

    async def publish(self, user_id: str, event: Event) -> None:
        for q in self.subscribers.get(user_id, []):
            await q.put(event)

    def _find(self, p: Principal, ref: str) -> ContainerRecord:
        if self.boom is not None:
            raise self.boom
        for rec in self.records.values():
            if rec.user_id == p.user_id and ref in (rec.id, rec.db_id, rec.name):
                return rec
        raise ContainerNotFound("container not found")

    def _running(self, p: Principal, ref: str) -> ContainerRecord:
        rec = self._find(p, ref)
        if rec.status != "running":
            raise ContainerNotRunning("container is not running", status=rec.status)
        return rec

    # -- ContainerService -------------------------------------------------------------

    async def list_containers(self, p: Principal) -> list[ContainerOut]:
        if self.boom is not None:
            raise self.boom
        if self.on_list is not None:
            await self.on_list()
        mine = [r for r in self.records.values() if r.user_id == p.user_id]
        return [r.to_out() for r in sorted(mine, key=lambda r: r.created_at, reverse=True)]

    def container_limit(self, p: Principal) -> int:
        return self.limit

    async def get_container(self, p: Principal, ref: str) -> ContainerOut:
        return self._find(p, ref).to_out()

    async def create_container(
        self, p: Principal, req: ContainerCreate, progress: ProgressFn | None = None
    ) -> ContainerOut:
        if req.image not in (*IMAGES, "broken"):
            raise UnsupportedImage("unsupported image type", supported_images=list(IMAGES))
        name = req.name or f"box-{len(self.records)}"
        if any(r.user_id == p.user_id and r.name == name for r in self.records.values()):
            raise Conflict("container with this name already exists", name=name)
        if progress is not None:
            await progress(StreamProgress(stage="validating", message="validating", progress=5))
        rec = ContainerRecord(user_id=p.user_id, name=name, image=req.image, resources=_resources())
        self.records[rec.db_id] = rec
        done = self._ready[rec.id] = asyncio.Event()
        task = asyncio.create_task(self._build(rec, progress, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return rec.to_out()

    async def _build(
        self, rec: ContainerRecord, progress: ProgressFn | None, done: asyncio.Event
    ) -> None:
        await asyncio.sleep(0)
        if progress is not None:
            await progress(
                StreamProgress(
                    stage="creating", message="creating", progress=40, container_id=rec.id
                )
            )
        if rec.image == "broken":
            rec.status = "error"
            rec.error_message = "image is broken"
        else:
            rec.status = "running"
        done.set()

    async def wait_ready(self, p: Principal, ref: str, timeout: float) -> ContainerOut:
        rec = self._find(p, ref)
        await asyncio.wait_for(self._ready[rec.id].wait(), timeout)
        return rec.to_out()

    async def start_container(self, p: Principal, ref: str) -> ContainerOut:
        rec = self._find(p, ref)
        if rec.status == "running":
            raise Conflict("container is already running")
        rec.status = "running"
        return rec.to_out()

    async def stop_container(self, p: Principal, ref: str, timeout: float | None) -> ContainerOut:
        rec = self._find(p, ref)
        self.stop_timeouts.append(timeout)
        rec.status = "stopped"
        return rec.to_out()

    async def restart_container(self, p: Principal, ref: str) -> ContainerOut:
        rec = self._find(p, ref)
        rec.status = "running"
        return rec.to_out()

    async def delete_container(self, p: Principal, ref: str, volumes: bool) -> ContainerOut:
        rec = self._find(p, ref)
        self.deleted_volumes.append(volumes)
        del self.records[rec.db_id]
        return rec.to_out()

    async def update_settings(
        self, p: Principal, ref: str, patch: SettingsPatch
    ) -> tuple[ContainerOut, bool]:
        rec = self._find(p, ref)
        if patch.name is not None:
            rec.name = patch.name
        if patch.disk_mb:
            rec.resources = rec.resources.model_copy(update={"disk_mb": patch.disk_mb})
        return rec.to_out(), bool(patch.disk_mb)

    async def exec(self, p: Principal, ref: str, req: ExecRequest) -> tuple[int, dict[str, object]]:
        self._running(p, ref)
        if self.exec_gate is not None:
            await self.exec_gate.wait()
        return self.exec_answer

    async def stats(self, p: Principal, ref: str) -> Stats:
        self._running(p, ref)
        return Stats(
            cpu_percent=1.5,
            cpu_usage_usec=10,
            memory=1024,
            memory_limit=2048,
            pids=3,
            disk_read=0,
            disk_write=0,
            disk_usage=10,
            disk_limit=100,
            net_rx=1,
            net_tx=2,
            oom_kills=0,
        )

    def _info(self, path: str, size: int, is_dir: bool = False) -> FileInfo:
        return FileInfo(
            name=path.rstrip("/").rsplit("/", 1)[-1],
            path=path,
            size=size,
            mode="drwxr-xr-x" if is_dir else "-rw-r--r--",
            mod_time=T0,
            is_dir=is_dir,
        )

    async def list_files(self, p: Principal, ref: str, path: str) -> FileList:
        rec = self._running(p, ref)
        prefix = path.rstrip("/") + "/"
        infos = [
            self._info(fpath, len(data))
            for (db_id, fpath), data in self.files.items()
            if db_id == rec.db_id and fpath.startswith(prefix)
        ]
        return FileList(path=path, files=infos, count=len(infos))

    async def open_file(self, p: Principal, ref: str, path: str) -> FileDownload:
        rec = self._running(p, ref)
        data = self.files.get((rec.db_id, path))
        if data is None:
            raise NotFound("file not found", path=path)
        return FileDownload(info=self._info(path, len(data)), fileobj=io.BytesIO(data))

    async def upload_file(
        self,
        p: Principal,
        ref: str,
        directory: str,
        filename: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
    ) -> FileInfo:
        rec = self._running(p, ref)
        data = b"".join([c async for c in chunks])
        path = f"{directory.rstrip('/')}/{filename}"
        self.files[(rec.db_id, path)] = data
        self.uploads.append((directory, filename, data, max_bytes))
        return self._info(path, len(data))

    async def delete_file(self, p: Principal, ref: str, path: str) -> None:
        rec = self._running(p, ref)
        if self.files.pop((rec.db_id, path), None) is None:
            raise NotFound("file not found", path=path)

    async def make_dir(self, p: Principal, ref: str, path: str) -> FileInfo:
        self._running(p, ref)
        if not path.startswith("/"):
            raise InvalidRequest("path must be absolute")
        return self._info(path, 4096, is_dir=True)

    async def list_images(self) -> list[ImageInfo]:
        return [
            ImageInfo(
                name=name,
                display_name=name.title(),
                description=f"{name} image",
                category="linux",
                tags=[name],
                popular=True,
                available=True,
            )
            for name in IMAGES
        ]

    async def import_image(
        self, src: BinaryIO, name: str | None, rootfs: bool = False
    ) -> ImportResult:
        data = src.read()
        self.imports.append((data, name) if not rootfs else (data, f"rootfs {name}"))
        return ImportResult(
            name=name or "imported:latest", digest="sha256:0", size=len(data), layers=1
        )

    async def pull_image(self, reference: str, name: str | None) -> PullOut:
        if reference.startswith("missing"):
            raise NotFound(f"image {reference} not found")
        self.pulls.append((reference, name))
        return PullOut(
            name=name or reference,
            digest="sha256:1",
            size=10,
            layers=1,
            source="mirror 127.0.0.1:1",
            downloaded=10,
            layers_fetched=1,
            layers_present=0,
            seconds=0.1,
        )

    async def list_local_images(self) -> list[LocalImage]:
        now = utcnow()
        return [
            LocalImage(
                name=ref, digest="sha256:1", size=1, layers=[], created=now, imported=now,
                containers=1 if ref == "used:1" else 0,
            )
            for ref in self.local
        ]  # fmt: skip

    async def remove_image(self, ref: str) -> ImageRemoved:
        if ref not in self.local:
            raise NotFound(f"image {ref!r} not found")
        if ref == "used:1":
            raise Conflict(f"image {ref} is in use by 1 container(s): delete them first")
        self.local.remove(ref)
        return ImageRemoved(message="image removed", name=ref, digest="sha256:1", layers_removed=2)

    async def prune_images(self, all_unused: bool) -> PruneOut:
        gone = [r for r in self.local if r != "used:1"] if all_unused else []
        self.local = [r for r in self.local if r not in gone]
        return PruneOut(images_removed=gone, layers_removed=len(gone), bytes_freed=4096)

    def roles(self) -> list[Role]:
        return [Role(id="dev", name="Developer", description="tools", packages=["git"])]

    async def health(self) -> Health:
        running = sum(1 for r in self.records.values() if r.status == "running")
        return Health(
            status="ok",
            containers_total=len(self.records),
            containers_running=running,
            cgroup="v2",
            version="test",
        )

    async def _generator(self, user_id: str) -> AsyncIterator[Event]:
        queues = self.subscribers.setdefault(user_id, [])
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        queues.append(queue)
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            queues.remove(queue)

    def subscribe(self, p: Principal) -> AsyncIterator[Event]:
        if self.generator_subscriptions:
            return self._generator(p.user_id)
        sub = _Subscription(self.subscribers.setdefault(p.user_id, []))
        self.subscriptions.append(sub)
        return sub

    async def open_terminal(self, p: Principal, ref: str, cols: int, rows: int) -> TerminalProcess:
        raise NotImplementedError

    async def terminal_session(
        self, p: Principal, ref: str, session_id: str, new: bool, cols: int, rows: int
    ) -> tuple[FakeTerminal, bool]:
        rec = self._running(p, ref)
        if self.terminal_error is not None:
            raise self.terminal_error
        key = (rec.db_id, session_id)
        found = self.terminals.get(key)
        if found is not None and not new:
            return found, False
        self.terminals[key] = FakeTerminal()
        return self.terminals[key], True


@dataclass
class Harness:
    client: TestClient[web.Request, web.Application]
    service: FakeService
    store: Store
    cfg: Config
    limiter: RateLimiter
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def user_id(self, who: str = "alice") -> str:
        user = self.store.get_user_by_name(who.split("-")[0])
        assert user is not None
        return user.id


@asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    limits: RateLimitsConfig | None = None,
    clock: Callable[[], float] | None = None,
    extra_routes: Callable[[web.Application], None] | None = None,
    concurrency: ConcurrencyConfig | None = None,
) -> AsyncIterator[Harness]:
    """A served app with users alice (read+write), alice-ro (read), bob, root (admin)."""
    cfg = Config(
        state_dir=tmp_path / "state",
        stop_timeout_s=7,
        concurrency=concurrency or ConcurrencyConfig(),
    )
    limits = limits or RateLimitsConfig(create_per_min=1000, ops_per_min=1000, read_per_min=1000)
    limiter = RateLimiter(limits, clock=clock) if clock else RateLimiter(limits)
    service = FakeService()
    with Store(cfg.state_dir) as store:
        tokens = {
            "alice": auth.create_token(store, "alice", scopes=["read", "write"])[0],
            "alice-ro": auth.create_token(store, "alice", scopes=["read"])[0],
            "bob": auth.create_token(store, "bob")[0],
            "root": auth.create_token(store, "root", scopes=["admin"])[0],
        }
        app = make_app(
            service, store, cfg, limiter, version="1.2.3", build="abc", extra_routes=extra_routes
        )
        async with TestClient(TestServer(app)) as client:
            yield Harness(client, service, store, cfg, limiter, tokens)
