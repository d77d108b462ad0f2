"""Container logs without a container: the FIFO capture, the tail bound, dropping when
the writer is behind, following, and removal."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rexecd.service import containerlogs
from rexecd.service.containerlogs import ContainerLogs, trim
from tests.deadlines import scaled


def test_trim_keeps_the_tail_from_a_line_start(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"".join(b"line %04d\n" % i for i in range(1000)))
    removed = trim(log, 100)
    data = log.read_bytes()
    assert len(data) <= 100 and data.endswith(b"line 0999\n")
    assert data.startswith(b"line ")
    assert removed == 10_000 - len(data)


async def _until(check: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + scaled(10)
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_capture_is_bounded_followed_and_removed(tmp_path: Path) -> None:
    logs = ContainerLogs(tmp_path / "state", max_bytes=4096)
    stdin, out, err = logs.open_capture("c1")
    assert out == err
    assert os.readlink(f"/proc/self/fd/{out}").startswith("pipe:")  # no host file
    assert os.read(stdin, 10) == b""  # stdin is at EOF, not a host device
    logs.watch("c1", os.getpid())
    try:
        for i in range(200):
            os.write(out, b"%04d %s\n" % (i, b"x" * 40))
        path = logs.path("c1")
        await _until(
            lambda: path.exists() and path.read_bytes().endswith(b"0199 " + b"x" * 40 + b"\n"),
            "tail",
        )
        assert path.stat().st_size <= 4096
        got = bytearray()

        async def alive() -> bool:
            return len(got) < 10_000 and b"LAST" not in got

        async def follow() -> None:
            async for chunk in logs.follow("c1", True, alive):
                got.extend(chunk)

        task = asyncio.ensure_future(follow())
        os.write(out, b"LAST\n")
        await asyncio.wait_for(task, scaled(10))
        assert got.endswith(b"LAST\n")
    finally:
        for fd in {stdin, out}:
            os.close(fd)
        logs.unwatch("c1")
    assert logs._readers == {} and logs._opened == {}
    logs.remove("c1")
    await _until(lambda: not logs.path("c1").exists(), "log removed")


def test_output_past_the_queue_is_dropped_not_queued(tmp_path: Path) -> None:
    logs = ContainerLogs(tmp_path / "state", max_bytes=1 << 20)
    logs._thread = object()  # type: ignore[assignment]  # a writer that never drains
    for _ in range(containerlogs.QUEUE_CHUNKS + 5):
        logs.append("c1", b"y" * 100)
    assert logs._queue.qsize() == containerlogs.QUEUE_CHUNKS
    assert logs._dropped["c1"] == 500


def test_a_restarted_daemon_reopens_the_pipe_only(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"kept")
        fd = containerlogs._reopen_pipe(f"/proc/self/fd/{w}")
        assert fd is not None
        try:
            assert os.read(fd, 10) == b"kept"
        finally:
            os.close(fd)
        (tmp_path / "file").write_text("x")
        with open(tmp_path / "file") as f:
            assert containerlogs._reopen_pipe(f"/proc/self/fd/{f.fileno()}") is None
    finally:
        os.close(r)
        os.close(w)
