"""The contract between the HTTP layer and the service layer.

``api/`` depends only on this Protocol (and on ``models``, ``errors``, ``auth``,
``ratelimit``), so its handlers are unit-tested against a fake service, and
``ContainerManager`` is the real implementation. Every method raises ``RexecError``
subclasses for anything a client did wrong (404 for another user's container).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from rexecd.models import (
    ContainerCreate,
    ContainerOut,
    Event,
    ExecRequest,
    ExecStreamStart,
    FileInfo,
    FileList,
    Health,
    ImageInfo,
    ImageRemoved,
    ImportResult,
    LocalImage,
    PortForwardCreate,
    PortForwardOut,
    PruneOut,
    PullOut,
    Role,
    SettingsPatch,
    Stats,
    StreamProgress,
    VolumeList,
)
from rexecd.service.auth import Principal
from rexecd.service.execstream import StreamProcess

if TYPE_CHECKING:  # terminals imports this module
    from rexecd.service.terminals import TerminalClient

ProgressFn = Callable[[StreamProgress], Awaitable[None]]


@dataclass
class FileDownload:
    """An open file inside a container, ready to stream; the caller closes ``fileobj``."""

    info: FileInfo
    fileobj: BinaryIO


@dataclass
class TerminalProcess:
    """A shell running on a PTY inside a container: ``master`` is the PTY master fd
    (owned by the caller), ``pid`` the host pid, ``wait`` resolves to its exit status."""

    master: int
    pid: int
    pts: str
    wait: Callable[[], Awaitable[int | None]]


class Terminal(Protocol):
    """A terminal session: a shell on a PTY that outlives its clients (service.terminals)."""

    async def attach(self, client: TerminalClient) -> bytes:
        """Make ``client`` the one client; returns the scrollback to replay before
        ``resume`` (output is held until then, so none is lost or reordered)."""
        ...

    def resume(self, client: TerminalClient) -> None: ...

    def detach(self, client: TerminalClient) -> None: ...

    async def write(self, data: bytes) -> None: ...

    def resize(self, cols: int, rows: int) -> None: ...


class ContainerService(Protocol):
    async def list_containers(self, p: Principal) -> list[ContainerOut]: ...

    def container_limit(self, p: Principal) -> int: ...

    async def get_container(self, p: Principal, ref: str) -> ContainerOut: ...

    async def create_container(
        self, p: Principal, req: ContainerCreate, progress: ProgressFn | None = None
    ) -> ContainerOut:
        """Validate, check quota and name, insert the record (status ``creating``) and
        return it; creation continues in the background. With ``progress``, each stage
        (validating, pulling, creating, starting, configuring, ready) is reported, the
        last one with ``complete`` set, or with ``error`` on failure; ``wait_ready``
        tells when the background part has finished."""
        ...

    async def wait_ready(self, p: Principal, ref: str, timeout: float) -> ContainerOut:
        """The container once its creation has finished (running or error)."""
        ...

    async def start_container(self, p: Principal, ref: str) -> ContainerOut: ...

    async def stop_container(
        self, p: Principal, ref: str, timeout: float | None
    ) -> ContainerOut: ...

    async def restart_container(self, p: Principal, ref: str) -> ContainerOut: ...

    async def delete_container(self, p: Principal, ref: str, volumes: bool) -> ContainerOut: ...

    async def update_settings(
        self, p: Principal, ref: str, patch: SettingsPatch
    ) -> tuple[ContainerOut, bool]:
        """Apply the patch; returns the container and whether it was restarted."""
        ...

    async def exec(self, p: Principal, ref: str, req: ExecRequest) -> tuple[int, dict[str, object]]:
        """Run a command to completion: ``(200, ExecResult)`` or ``(504, partial result)``."""
        ...

    async def open_exec_stream(self, p: Principal, ref: str, req: ExecStreamStart) -> StreamProcess:
        """Start a process whose stdio (or PTY) the caller streams; see ``execstream``."""
        ...

    async def open_logs(self, p: Principal, ref: str, follow: bool) -> AsyncIterator[bytes]:
        """The container's log (init output, role installs) as chunks; with ``follow``
        the iterator goes on with new output while the container runs."""
        ...

    async def stats(self, p: Principal, ref: str) -> Stats: ...

    async def list_files(self, p: Principal, ref: str, path: str) -> FileList: ...

    async def open_file(self, p: Principal, ref: str, path: str) -> FileDownload: ...

    async def upload_file(
        self,
        p: Principal,
        ref: str,
        directory: str,
        filename: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
    ) -> FileInfo: ...

    async def delete_file(self, p: Principal, ref: str, path: str) -> None: ...

    async def make_dir(self, p: Principal, ref: str, path: str) -> FileInfo: ...

    async def add_port_forward(
        self, p: Principal, ref: str, req: PortForwardCreate
    ) -> PortForwardOut:
        """Forward 127.0.0.1:host_port on the daemon's host to a port of the (running)
        container, until it is deleted or the container stops."""
        ...

    async def list_port_forwards(self, p: Principal, ref: str) -> list[PortForwardOut]: ...

    async def delete_port_forward(self, p: Principal, ref: str, forward_id: str) -> PortForwardOut:
        """Remove one forward of the container; returns what it was."""
        ...

    async def list_volumes(self, p: Principal) -> VolumeList:
        """The caller's /home/user volumes, kept ones and those in use, with the caps."""
        ...

    async def delete_volume(self, p: Principal, name: str) -> None:
        """Delete a kept volume and its data: 404 for a name the caller has no volume of,
        409 while a container of that name exists."""
        ...

    async def list_images(self) -> list[ImageInfo]: ...

    async def import_image(
        self, src: BinaryIO, name: str | None, rootfs: bool = False
    ) -> ImportResult:
        """An OCI-layout or docker-archive tarball; with ``rootfs``, a plain root file
        system tarball (compressed or not) made a one-layer image named ``name``."""
        ...

    async def pull_image(self, reference: str, name: str | None) -> PullOut:
        """Pull ``reference`` from its registry (or a mirror) into the local store."""
        ...

    async def list_local_images(self) -> list[LocalImage]: ...

    async def remove_image(self, ref: str) -> ImageRemoved:
        """Remove a local image (Conflict while a container made from it exists)."""
        ...

    async def prune_images(self, all_unused: bool) -> PruneOut: ...

    def roles(self) -> list[Role]: ...

    async def health(self) -> Health: ...

    def subscribe(self, p: Principal) -> AsyncIterator[Event]:
        """Events about this user's containers, until the iterator is closed."""
        ...

    async def open_terminal(self, p: Principal, ref: str, cols: int, rows: int) -> TerminalProcess:
        """Start the container's shell (zsh, bash or sh) on a PTY from its own devpts."""
        ...

    async def terminal_session(
        self, p: Principal, ref: str, session_id: str, new: bool, cols: int, rows: int
    ) -> tuple[Terminal, bool]:
        """The session ``session_id`` of a running container (started if needed, or
        afresh with ``new``) and whether it was started now."""
        ...
