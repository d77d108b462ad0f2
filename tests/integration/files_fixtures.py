"""A daemon with a running container per test, and upload helpers, for the files API
tests (test_daemon_files and the CVE regression tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, running_daemon, unique

F = "/api/containers/{}/files"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


@pytest.fixture
async def box(daemon: Daemon) -> AsyncIterator[tuple[ApiClient, str]]:
    name = unique("files")
    async with ApiClient(daemon, daemon.token(unique("fu"))) as c:
        try:
            await c.create_running(name)
            yield c, name
        finally:
            await c.remove(name)


def form(data: bytes, filename: str, path: str | None = None) -> aiohttp.FormData:
    fd = aiohttp.FormData()
    if path is not None:
        fd.add_field("path", path)
    fd.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return fd


async def upload(c: ApiClient, name: str, directory: str | None, data: bytes, filename: str):
    params = {"path": directory} if directory is not None else None
    return await c.post(F.format(name), data=form(data, filename), params=params)
