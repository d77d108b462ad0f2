"""Helpers for the daemon integration suite: a module daemon, an HTTP client over TCP or
the unix socket, polls with deadlines, leak checks and a broken test image.

Import what a module needs explicitly (no conftest magic)::

    from tests.integration.daemon_fixtures import ApiClient, running_daemon
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from rexecd.config import Config
from tests.deadlines import scaled
from tests.integration.daemon import TEST_IMAGES, Daemon

IMAGES = TEST_IMAGES
BUSYBOX_TAR = IMAGES / "busybox.tar"
LAYERED_TAR = IMAGES / "layered.tar"
MiB = 1024 * 1024
T = TypeVar("T")


def unique(prefix: str = "c") -> str:
    """A container or user name no other test (or earlier run) uses."""
    return f"{prefix}-{secrets.token_hex(4)}"


def seccomp_tiers(**profiles: str) -> dict[str, object]:
    """Config overrides: the ``tiers`` section with ``profiles`` (tier -> seccomp
    profile) over the defaults (a tier written in config must be whole)."""
    tiers = Config().tiers.model_dump()
    for tier, ref in profiles.items():
        tiers[tier]["seccomp"] = ref
    return {"tiers": tiers}


@contextlib.contextmanager
def running_daemon(
    tmp_path_factory: pytest.TempPathFactory,
    overrides: dict[str, Any] | None = None,
    images: tuple[Path, ...] = (BUSYBOX_TAR,),
    launcher: list[str] | None = None,
) -> Iterator[Daemon]:
    """A started daemon with ``images`` imported; everything it made is removed after,
    whatever the test did. ``launcher`` runs in front of it (see ``Daemon``)."""
    for img in images:
        if not img.exists():
            pytest.skip(f"{img} missing: run ./scripts/setup (scripts/build-test-image)")
    d = Daemon(
        tmp_path_factory.mktemp("rexecd"), overrides=overrides or {}, launcher=launcher or []
    )
    try:
        for img in images:
            d.import_image(img)
        d.start()
        yield d
    finally:
        try:
            d.close()
        except Exception:  # leave the real failure visible; report what close hit
            print(f"daemon close failed; log:\n{d.logs()[-4000:]}")
            raise


# ------------------------------------------------------------------ polling


def poll(
    fn: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    """Call ``fn`` until it returns something truthy; fail past ``timeout`` seconds
    (stretched by the slow factor)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}")
        time.sleep(interval)


async def apoll(
    fn: Callable[[], Awaitable[T | None]],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """``poll`` for a coroutine."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        last = await fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}")
        await asyncio.sleep(interval)


def pids_with_cmdline(needle: bytes) -> list[int]:
    """Host pids whose command line contains ``needle`` (a container's processes are
    host processes too, seen from the host)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


async def until_running(needle: str, count: int, timeout: float = 60.0) -> None:
    """Wait until ``count`` processes whose command line holds ``needle`` run."""

    async def enough() -> bool:
        return len(pids_with_cmdline(needle.encode())) >= count

    await apoll(enough, timeout, what=f"{count} processes running {needle!r}")


# ------------------------------------------------------------------ HTTP client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        try:
            return json.loads(self.raw) if self.raw else None
        except ValueError:
            return None

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def expect(self, status: int) -> Reply:
        assert self.status == status, f"expected {status}, got {self.status}: {self.raw[:2000]!r}"
        return self


class ApiClient:
    """A user of the API over the daemon's TCP port or its unix socket (aiohttp)."""

    def __init__(self, daemon: Daemon, token: str | None, transport: str = "tcp") -> None:
        self.d = daemon
        self.token = token
        self.transport = transport
        self.base = daemon.url if transport == "tcp" else "http://rexecd.sock"
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        connector: aiohttp.BaseConnector
        if self.transport == "unix":
            connector = aiohttp.UnixConnector(path=str(self.d.sock), limit=0)
        else:
            connector = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=scaled(120))
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    def auth(self, token: str | None = None) -> dict[str, str]:
        tok = token if token is not None else self.token
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    async def request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
        params: dict[str, str] | None = None,
        anonymous: bool = False,
    ) -> Reply:
        assert self.session is not None
        h = {} if anonymous else self.auth(token)
        h.update(headers or {})
        async with self.session.request(
            method, self.base + path, json=json_body, data=data, headers=h, params=params
        ) as r:
            raw = await r.read()
            return Reply(r.status, dict(r.headers), raw)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)

    async def patch(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("PATCH", path, body, **kw)

    # -------------------------------------------------------------- containers

    async def container(self, ref: str) -> dict[str, Any]:
        r = (await self.get(f"/api/containers/{ref}")).expect(200)
        body: dict[str, Any] = r.body
        return body

    async def wait_status(
        self, ref: str, want: str, timeout: float = 30.0, allow_error: bool = False
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        async def check() -> dict[str, Any] | None:
            nonlocal last
            r = await self.get(f"/api/containers/{ref}")
            if r.status != 200:
                last = {"http": r.status, "body": r.body}
                return None
            last = r.body
            if last.get("status") == want:
                return last
            if last.get("status") == "error" and want != "error" and not allow_error:
                raise AssertionError(f"container {ref} failed: {last}")
            return None

        try:
            return await apoll(check, timeout, what=f"{ref} to be {want}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {last}") from None

    async def create(
        self, name: str | None = None, image: str = "busybox", token: str | None = None, **kw: Any
    ) -> Reply:
        """``POST /api/containers``; ``kw`` are body fields."""
        body: dict[str, Any] = {"image": image, **kw}
        if name is not None:
            body["name"] = name
        return await self.post("/api/containers", body, token=token)

    async def create_running(
        self, name: str | None = None, image: str = "busybox", **kw: Any
    ) -> dict[str, Any]:
        r = (await self.create(name, image, **kw)).expect(202)
        return await self.wait_status(r["id"], "running")

    async def exec(self, ref: str, command: str | None = None, **kw: Any) -> Reply:
        body: dict[str, Any] = dict(kw)
        if command is not None:
            body["command"] = command
        return await self.post(f"/api/containers/{ref}/exec", body)

    async def sh(self, ref: str, command: str) -> str:
        """Run ``command`` in the container; assert it succeeds and return stdout."""
        r = (await self.exec(ref, command)).expect(200)
        assert r["exit_code"] == 0, r.body
        out: str = r["stdout"]
        return out

    async def remove(self, ref: str, volumes: bool = True) -> None:
        q = "?volumes=true" if volumes else ""
        r = await self.delete(f"/api/containers/{ref}{q}")
        assert r.status in (200, 404), r.body

    async def stream_create(
        self, body: dict[str, Any], token: str | None = None
    ) -> tuple[int, dict[str, str], list[dict[str, Any]]]:
        """``POST /api/containers/stream``: the status, headers and every ``data:`` frame
        (a non-SSE answer gives its JSON body as the only frame)."""
        assert self.session is not None
        frames: list[dict[str, Any]] = []
        async with self.session.post(
            self.base + "/api/containers/stream", json=body, headers=self.auth(token)
        ) as r:
            if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
                return r.status, dict(r.headers), [await r.json()]
            async for raw in r.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    frames.append(json.loads(line[5:].strip()))
            return r.status, dict(r.headers), frames

    async def ws(
        self, path: str, token: str | None = None, **kw: Any
    ) -> aiohttp.ClientWebSocketResponse:
        assert self.session is not None
        if "protocols" not in kw and "headers" not in kw:
            kw["headers"] = self.auth(token)
        return await self.session.ws_connect(self.base + path, **kw)


@contextlib.asynccontextmanager
async def cleaning(client: ApiClient) -> AsyncIterator[list[str]]:
    """A list to append container refs to; each is deleted (volumes too) at the end."""
    refs: list[str] = []
    try:
        yield refs
    finally:
        for ref in refs:
            with contextlib.suppress(Exception):
                await client.remove(ref)


# ------------------------------------------------------------------ host-side checks


def cgroup_parent_dirs(d: Daemon) -> dict[str, Path]:
    """Where the daemon's cgroup parent lives, per v1 controller (``{"": dir}`` on v2).

    A relative parent is placed under the daemon's own cgroup, which may differ per
    hierarchy (here memory is nested, the others are at the root): resolved by the
    same driver the daemon uses, from this process, which shares its cgroups.
    """
    from rexecd.runtime.cgroups import open_driver

    drv: Any = open_driver(d.cgroup_parent)
    if hasattr(drv, "parent_dirs"):
        return dict(drv.parent_dirs)
    return {"": Path(drv.parent_dir)}


def cgroup_dirs(d: Daemon, cid: str) -> list[str]:
    """Every cgroup directory of container ``cid`` that exists on this host."""
    return [str(p / cid) for p in cgroup_parent_dirs(d).values() if (p / cid).exists()]


def memory_limit_file(d: Daemon, cid: str) -> Path:
    dirs = cgroup_parent_dirs(d)
    if "memory" in dirs:
        return dirs["memory"] / cid / "memory.limit_in_bytes"
    return dirs[""] / cid / "memory.max"


def cpu_quota(d: Daemon, cid: str) -> tuple[int, int] | None:
    """(quota, period) in microseconds of the container's cpu limit, if it has one."""
    dirs = cgroup_parent_dirs(d)
    if "cpu" in dirs:
        base = dirs["cpu"] / cid
        quota = int((base / "cpu.cfs_quota_us").read_text())
        period = int((base / "cpu.cfs_period_us").read_text())
        return (quota, period) if quota > 0 else None
    q, per = (dirs[""] / cid / "cpu.max").read_text().split()
    return None if q == "max" else (int(q), int(per))


def bridge_ports(d: Daemon) -> list[str]:
    """Names of the links enslaved to the daemon's bridge."""
    out = subprocess.run(
        ["ip", "-o", "link", "show", "master", d.bridge], capture_output=True, text=True
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def host_links(d: Daemon, cid: str) -> list[str]:
    """Host links (veth, ifb) that would belong to container ``cid``."""
    from rexecd.runtime.network.naming import host_ifname, ifb_ifname

    names = {host_ifname(d.bridge, cid), ifb_ifname(d.bridge, cid)}
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in found if n in names]


def host_mounts(needle: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.strip() for line in f if needle in line]


def db_rows(d: Daemon, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """A read-only query of the daemon's SQLite state."""
    db = sqlite3.connect(f"file:{d.state / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def leases(d: Daemon, db_id: str | None = None) -> list[tuple[Any, ...]]:
    if db_id is None:
        return db_rows(d, "SELECT ip, container_db_id FROM ip_leases")
    return db_rows(d, "SELECT ip, container_db_id FROM ip_leases WHERE container_db_id = ?", db_id)


def volume_image(d: Daemon, user_id: str, name: str) -> Path:
    """The quota'd volume image of (user, container name) (LoopStorage's layout)."""
    return d.state.resolve() / "volumes" / user_id / f"{name}.img"


def volume_mountpoint(d: Daemon, user_id: str, name: str) -> Path:
    return d.run.resolve() / "volumes" / user_id / name


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            text = backing.read_text().strip()
        except OSError:
            continue
        if text.removesuffix(" (deleted)") == str(image):
            found.append(backing.parent.parent.name)
    return found


def leftovers(d: Daemon, c: dict[str, Any], lease: bool = True) -> dict[str, Any]:
    """What is still on the host of container ``c`` (its JSON object); ``{}`` = clean.

    Checked: its cgroups, host links (veth, IFB), mounts (its id, or its volume's mount
    point), loop devices on its volume image, IP leases and run dir. A stopped container
    keeps its IP lease (it comes back with the same address), so ``lease=False`` leaves
    the lease out; a deleted one must have none. The volume image itself is data, kept
    unless deleted with ``?volumes=true`` (see ``volume_image``).
    """
    cid, db_id = c["id"], c["db_id"]
    mountpoint = str(volume_mountpoint(d, c["user_id"], c["name"]))
    found = {
        "cgroups": cgroup_dirs(d, cid),
        "links": host_links(d, cid),
        "mounts": host_mounts(cid) + host_mounts(f" {mountpoint} "),
        "loop": loop_devices_of(volume_image(d, c["user_id"], c["name"])),
        "leases": leases(d, db_id) if lease else [],
        "run_dir": [str(p) for p in (d.run / "containers").glob(f"{cid}*")],
    }
    return {k: v for k, v in found.items() if v}


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of ``pid``, or None once it is gone (reaped)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
    fields = raw[raw.rindex(b")") + 2 :].split()
    return comm, fields[0].decode(), int(fields[1])


def children(ppid: int) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of every process whose parent is ``ppid``."""
    found = []
    for entry in Path("/proc").iterdir():
        st = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if st is not None and st[2] == ppid:
            found.append((int(entry.name), st[0], st[1]))
    return found


def zombies_of(ppid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the children of ``ppid`` that have exited and not been waited for."""
    return [(pid, comm) for pid, comm, state in children(ppid) if state == "Z"]


def spawner_pid(d: Daemon) -> int:
    """The daemon's live spawner process."""
    assert d.proc is not None
    mine = children(d.proc.pid)
    found = [pid for pid, comm, state in mine if comm == "rexecd-spawner" and state != "Z"]
    assert len(found) == 1, mine
    return found[0]


def kill_spawner(d: Daemon) -> None:
    """SIGKILL the daemon's spawner and wait until it has died."""
    pid = spawner_pid(d)
    os.kill(pid, signal.SIGKILL)
    poll(lambda: not pid_alive(pid), what="the spawner to die")


# ------------------------------------------------------------------ test images


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.mtime = 1704067200
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_proc_symlink_image(dest: Path, ref: str = "brokenproc:latest") -> Path:
    """A docker-archive whose only layer has busybox but ``proc`` as a symlink to
    ``/etc``: the container child must refuse to mount /proc over it."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, kind: bytes, data: bytes | None = None, link: str = "", mode: int = 0o755):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.linkname = kind, mode, link
        if data is not None:
            info.size = len(data)
        members.append((info, data))

    for dname in ("bin", "dev", "etc", "home", "home/user", "sys", "tmp", "root"):
        add(dname, tarfile.DIRTYPE)
    add("proc", tarfile.SYMTYPE, link="/etc", mode=0o777)
    add("bin/busybox", tarfile.REGTYPE, Path("/bin/busybox").read_bytes())
    add("bin/sh", tarfile.SYMTYPE, link="busybox", mode=0o777)
    passwd = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    add("etc/passwd", tarfile.REGTYPE, passwd, mode=0o644)
    add("etc/group", tarfile.REGTYPE, b"root:x:0:\nuser:x:1000:\n", mode=0o644)
    layer = _tar_bytes(members)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": _arch(),
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [ref], "Layers": ["layer/layer.tar"]}]
    ).encode()
    outer: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name, data in (
        ("manifest.json", manifest),
        (config_name, config),
        ("layer/layer.tar", layer),
    ):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        outer.append((info, data))
    dest.write_bytes(_tar_bytes(outer))
    return dest


def _arch() -> str:
    import platform

    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)
