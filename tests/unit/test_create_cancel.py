"""Cancelling a create that still runs (no root): the token's step boundaries, its race
with a shared wait, the cut-short of a long step, a start cancelled between its steps
(each step completes and is undone, or never starts), and the role build's waiters
when the create building the pair is cancelled (the next waiter builds)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rexecd.config import Config, RoleConfig
from rexecd.errors import RuntimeFailure
from rexecd.models import ContainerRecord
from rexecd.runtime.images import ImageRecord
from rexecd.service.cancel import DELETED, CancelToken, CreateCancelled
from rexecd.service.progress import Reporter
from rexecd.service.roles import RoleBuilds
from rexecd.service.states import State
from tests.deadlines import scaled
from tests.unit.fakes.images import base_image as base
from tests.unit.fakes.lifecycle import world
from tests.unit.fakes.store import RES


async def _until(cond: Callable[[], bool]) -> None:
    """Let the loop run until ``cond`` holds (the other tasks have got that far)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(5)
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0)


# --- the token ---------------------------------------------------------------------------


async def test_check_passes_until_cancelled_and_keeps_the_first_reason() -> None:
    token = CancelToken()
    token.check()
    token.cancel()
    token.cancel("another reason")
    with pytest.raises(CreateCancelled) as caught:
        token.check()
    assert caught.value.reason == DELETED and token.cancelled


async def test_race_returns_the_result_when_not_cancelled() -> None:
    token = CancelToken()

    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    assert await token.race(value()) == 7


async def test_race_stops_waiting_but_a_shielded_shared_task_goes_on() -> None:
    """The shape of a shared pull: one task, each create awaiting it shielded."""
    token = CancelToken()
    release = asyncio.Event()

    async def pull() -> str:
        await release.wait()
        return "image"

    shared = asyncio.ensure_future(pull())
    mine = asyncio.ensure_future(token.race(asyncio.shield(shared)))
    other = asyncio.ensure_future(asyncio.shield(shared))
    await asyncio.sleep(0)
    token.cancel()
    with pytest.raises(CreateCancelled):
        await asyncio.wait_for(mine, scaled(5))
    assert not shared.done()
    release.set()
    assert await asyncio.wait_for(other, scaled(5)) == "image"


async def test_race_after_cancel_never_starts_its_step() -> None:
    token = CancelToken()
    token.cancel()
    started: list[bool] = []

    async def step() -> None:
        started.append(True)

    with pytest.raises(CreateCancelled):
        await token.race(step())
    await asyncio.sleep(0)
    assert started == []


async def test_cut_short_cuts_a_long_wait_once_and_returns_its_end() -> None:
    token = CancelToken()
    ended = asyncio.Event()
    cuts: list[int] = []

    async def wait_exit() -> int:
        await ended.wait()
        return 137

    async def kill() -> None:
        cuts.append(1)
        ended.set()

    waiting = asyncio.ensure_future(token.cut_short(wait_exit(), kill))
    await asyncio.sleep(0)
    assert not waiting.done() and cuts == []
    token.cancel()
    assert await asyncio.wait_for(waiting, scaled(5)) == 137
    assert cuts == [1]


async def test_cut_short_that_fails_still_waits_for_its_step() -> None:
    """A step in a thread is never abandoned: a failing cut leaves it to end itself."""
    token = CancelToken()
    ended = asyncio.Event()

    async def step() -> str:
        await ended.wait()
        return "undone by its owner"

    cuts: list[int] = []

    async def broken_kill() -> None:
        cuts.append(1)
        raise OSError("cgroup busy")

    waiting = asyncio.ensure_future(token.cut_short(step(), broken_kill))
    await asyncio.sleep(0)
    token.cancel()
    await _until(lambda: bool(cuts))
    await asyncio.sleep(0)
    assert not waiting.done()
    ended.set()
    assert await asyncio.wait_for(waiting, scaled(5)) == "undone by its owner"


async def test_cut_short_does_not_cut_a_wait_that_ended_first() -> None:
    token = CancelToken()
    cuts: list[int] = []

    async def done() -> int:
        return 0

    async def kill() -> None:
        cuts.append(1)

    assert await token.cut_short(done(), kill) == 0
    token.cancel()
    assert cuts == []


# --- a start cancelled between its steps ----------------------------------------------


def _blocking(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> tuple[Any, Any]:
    """Make ``obj.name`` (run in a thread) wait for ``go`` after saying it ``entered``."""
    entered, go = threading.Event(), threading.Event()
    orig = getattr(obj, name)

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        go.wait(scaled(10))
        return orig(*args, **kwargs)

    monkeypatch.setattr(obj, name, slow)
    return entered, go


async def test_start_cancelled_during_a_step_completes_it_undoes_it_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, monkeypatch)
    entered, go = _blocking(monkeypatch, w.lifecycle.host, "prepare")
    token = CancelToken()
    launching = asyncio.ensure_future(w.lifecycle.launch(w.rec, w.image, token=token))
    assert await asyncio.to_thread(entered.wait, scaled(10))
    token.cancel()
    go.set()
    with pytest.raises(CreateCancelled):
        await asyncio.wait_for(launching, scaled(10))
    # The volume step ran to its end and was undone; nothing after it began.
    assert w.journal.made() == ["userns", "volume"]
    assert w.journal.undone() == ["runtime", "volume", "userns"]
    assert w.store.rec.status == "creating" and w.watcher.watched == []


async def test_start_cancelled_before_it_makes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, monkeypatch)
    token = CancelToken()
    token.cancel()
    with pytest.raises(CreateCancelled):
        await w.lifecycle.launch(w.rec, w.image, token=token)
    assert w.journal.entries == []


async def test_spawn_stuck_when_cancelled_is_killed_and_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that never gets ready (frozen, say) holds the spawn's thread: the cancel
    kills its cgroup, the spawn fails as a killed child does, and every step goes."""
    w = world(tmp_path, monkeypatch)
    runtime: Any = w.lifecycle.runtime
    entered, killed = threading.Event(), threading.Event()
    monkeypatch.setattr(runtime, "kill_cgroup", lambda _cid: killed.set())

    def start(*_a: Any, **_kw: Any) -> int:
        w.journal.make("cgroup")
        w.journal.make("spawn")
        entered.set()
        assert killed.wait(scaled(10)), "never killed"
        raise RuntimeFailure("sync", "the child died before it was ready")

    monkeypatch.setattr(runtime, "start", start)
    token = CancelToken()
    launching = asyncio.ensure_future(w.lifecycle.launch(w.rec, w.image, token=token))
    assert await asyncio.to_thread(entered.wait, scaled(10))
    token.cancel()
    with pytest.raises(RuntimeFailure):
        await asyncio.wait_for(launching, scaled(10))
    assert w.journal.undone() == ["address", "runtime", "volume", "userns"]
    assert w.watcher.watched == []


async def test_spawn_done_when_cancelled_completes_for_the_delete_to_halt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawn that got through before the kill took effect: the record says running
    (its init known, so the delete halts it like any running container)."""
    w = world(tmp_path, monkeypatch)
    runtime: Any = w.lifecycle.runtime
    entered, go = _blocking(monkeypatch, runtime, "start")
    token = CancelToken()
    launching = asyncio.ensure_future(w.lifecycle.launch(w.rec, w.image, token=token))
    assert await asyncio.to_thread(entered.wait, scaled(10))
    token.cancel()
    await _until(lambda: runtime.kills > 0)
    go.set()
    rec = await asyncio.wait_for(launching, scaled(10))
    assert rec.status == State.RUNNING and w.journal.undone() == []
    assert w.watcher.watched == [rec.db_id]


# --- the role build's waiters ---------------------------------------------------------


def role() -> RoleConfig:
    return RoleConfig(id="python", name="Python", description="d", install={"apt": ["python3"]})


class _RoleImages:
    """The image store's role side: a layer appears once a build made it."""

    def __init__(self) -> None:
        self.built: dict[str, ImageRecord] = {}

    def role_image(self, key: str) -> ImageRecord | None:
        return self.built.get(key)


def _builds(monkeypatch: pytest.MonkeyPatch) -> tuple[RoleBuilds, _RoleImages, list[str]]:
    cfg = Config(roles=[role()])
    images = _RoleImages()
    rb = RoleBuilds(cfg, None, images, None, None, None, None, None, None)  # type: ignore[arg-type]
    builders: list[str] = []
    layer = base(digest="sha256:" + "3" * 64)

    async def build(
        rec: ContainerRecord,
        _base: ImageRecord,
        _role: object,
        key: str,
        _report: Reporter,
        token: CancelToken,
    ) -> ImageRecord:
        builders.append(rec.name)
        if rec.name == "first":
            # A long install: only the cancel ends it (the kill of its processes).
            await token.race(asyncio.Event().wait())
        images.built[key] = layer
        return layer

    async def progress(*_a: object) -> None:
        pass

    monkeypatch.setattr(rb, "_build", build)
    monkeypatch.setattr(rb, "_role_progress", progress)
    return rb, images, builders


def _waiting(rb: RoleBuilds) -> int:
    """Creates in the one pair's build, its builder included."""
    return sum(users[0] for _, users in rb._builds.values())


def _rec(name: str) -> ContainerRecord:
    return ContainerRecord(user_id="u1", name=name, image="debian", role="python", resources=RES)


async def test_cancelled_builder_hands_the_build_to_the_next_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rb, images, builders = _builds(monkeypatch)
    report = Reporter(None)
    first, second, third = CancelToken(), CancelToken(), CancelToken()
    a = asyncio.ensure_future(rb.with_role(_rec("first"), base(), report, first))
    await _until(lambda: builders == ["first"])
    b = asyncio.ensure_future(rb.with_role(_rec("second"), base(), report, second))
    c = asyncio.ensure_future(rb.with_role(_rec("third"), base(), report, third))
    await _until(lambda: _waiting(rb) == 3)
    assert builders == ["first"] and not b.done() and not c.done()
    first.cancel()
    with pytest.raises(CreateCancelled):
        await asyncio.wait_for(a, scaled(5))
    got_b = await asyncio.wait_for(b, scaled(5))
    got_c = await asyncio.wait_for(c, scaled(5))
    # One build by the next waiter; the third found its layer made.
    assert builders == ["first", "second"]
    assert got_b is got_c and got_b is next(iter(images.built.values()))
    assert rb._builds == {}


async def test_cancelled_waiter_leaves_at_once_and_the_build_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rb, _images, builders = _builds(monkeypatch)
    report = Reporter(None)
    first, second = CancelToken(), CancelToken()
    a = asyncio.ensure_future(rb.with_role(_rec("first"), base(), report, first))
    await _until(lambda: builders == ["first"])
    b = asyncio.ensure_future(rb.with_role(_rec("second"), base(), report, second))
    await _until(lambda: _waiting(rb) == 2)
    second.cancel()
    with pytest.raises(CreateCancelled):
        await asyncio.wait_for(b, scaled(5))
    assert not a.done() and builders == ["first"]
    # The builder still holds its pair; its own cancel ends it, and nothing is left.
    first.cancel()
    with pytest.raises(CreateCancelled):
        await asyncio.wait_for(a, scaled(5))
    assert rb._builds == {}
