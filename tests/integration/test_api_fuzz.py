"""Schemathesis over ``/api/openapi.json`` against a real daemon, for a bounded time:
no answer is a 500, the fuzzer's token still works at the end, and only accepted
requests changed what the fuzzing user owns (``bench/fuzz_api.py`` runs the same for
longer)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import fuzz
from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient, running_daemon

pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (.[dev])")

# The run's time budget; REXECD_FUZZ_SECONDS stretches it for a deeper look.
FUZZ_SECONDS = int(os.environ.get("REXECD_FUZZ_SECONDS", "90"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory, overrides=fuzz.DAEMON_OVERRIDES) as d:
        yield d


def _summary(run: fuzz.FuzzRun) -> str:
    return f"seed {run.seed}, {len(run.exchanges)} requests, statuses {dict(run.statuses())}"


@pytest.mark.timeout(FUZZ_SECONDS + 300)
async def test_schemathesis_finds_no_server_error(daemon: Daemon, tmp_path: Path) -> None:
    # Guest tier: at most one container, so a create the fuzzer gets right costs little.
    token = await asyncio.to_thread(
        daemon.token, fuzz.FUZZ_USER, tier="guest", scopes="read,write,admin"
    )
    async with ApiClient(daemon, token) as c:
        await c.create_running(fuzz.SEED_CONTAINER)
        box = await c.container(fuzz.SEED_CONTAINER)
    before = await asyncio.to_thread(fuzz.holdings, daemon, token)

    run = await asyncio.to_thread(
        fuzz.run_schemathesis, daemon.url, token, tmp_path, max_time=FUZZ_SECONDS
    )
    summary = _summary(run)
    print(summary)
    # A run that hardly ran, or that lost its token early on, proves nothing.
    assert len(run.exchanges) > 200, f"{summary}\n{run.output[-3000:]}"
    assert await asyncio.to_thread(fuzz.token_works, daemon, token), summary
    assert run.statuses()[401] < len(run.exchanges) // 2, summary

    errors = run.server_errors()
    assert not errors, f"{summary}\nfirst: {errors[:5]}\n{run.output[-3000:]}"
    logged = fuzz.server_errors_in_log(daemon)
    assert not logged, f"{summary}\n" + "\n".join(logged[:10])

    after = await asyncio.to_thread(fuzz.holdings, daemon, token)
    assert after == before.expected_after(run), summary
    if not run.changed_a_container():
        # Every stop, restart, resize or delete of it was refused: it is as it was.
        async with ApiClient(daemon, token) as c:
            assert await c.container(fuzz.SEED_CONTAINER) == box
