"""A container start that fails at any step undoes exactly the steps made before it,
newest first, and leaves the record's state alone; one that succeeds undoes nothing.
Also: the state table refuses the moves a container cannot make."""

from __future__ import annotations

from pathlib import Path

import pytest

from rexecd.errors import RuntimeFailure
from rexecd.service import states
from rexecd.service.rollback import Rollback
from rexecd.service.states import IllegalTransition, State
from rexecd.service.store import Store
from tests.unit.fakes.lifecycle import STEPS, world
from tests.unit.fakes.store import RES

# Undos of steps that can fail halfway are pushed before the step: the volume's
# release (a mount made, the dirs not) and the runtime's (mount point and cgroup: a
# start that made the cgroup and then failed to spawn). Both are safe on what was
# never made. Atomic steps (id range and address leases, the attach) push after.
EXPECTED_UNDO = {
    "userns": [],
    "volume": ["runtime", "volume", "userns"],
    "address": ["runtime", "volume", "userns"],
    "cgroup": ["address", "runtime", "volume", "userns"],
    "spawn": ["address", "runtime", "volume", "userns"],
    "attach": ["address", "runtime", "volume", "userns"],
    "go": ["attach", "address", "runtime", "volume", "userns"],
}


@pytest.mark.parametrize("step", STEPS)
async def test_failed_start_undoes_earlier_steps_in_reverse(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, monkeypatch, fail_at=step)
    with pytest.raises(RuntimeFailure):
        await w.lifecycle.launch(w.rec, w.image)
    assert w.journal.made() == list(STEPS[: STEPS.index(step)])
    assert w.journal.undone() == EXPECTED_UNDO[step]
    # Every undo comes after the failure: nothing was undone while still making.
    kinds = [kind for kind, _ in w.journal.entries]
    assert kinds == sorted(kinds, key=lambda k: k == "undo")
    assert w.store.rec.status == "creating" and w.watcher.watched == []


async def test_started_container_undoes_nothing_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, monkeypatch)
    rec = await w.lifecycle.launch(w.rec, w.image)
    assert w.journal.made() == list(STEPS)
    assert w.journal.undone() == []
    assert rec.status == State.RUNNING and rec.ip_address == "10.88.0.2"
    assert rec.spec["userns_base"] == 1 << 20
    assert w.watcher.watched == [rec.db_id]


async def test_container_that_ran_keeps_its_id_range_on_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, monkeypatch, fail_at="spawn")
    ran = w.rec.model_copy(update={"status": "stopped", "started_at": w.rec.created_at})
    w.store.rec = ran
    with pytest.raises(RuntimeFailure):
        await w.lifecycle.launch(ran, w.image)
    # Its files are owned by that range: the lease stays with it.
    assert w.journal.undone() == ["address", "runtime", "volume"]


def test_rollback_keeps_data_steps_when_asked_and_survives_a_failing_undo() -> None:
    done: list[str] = []
    undo = Rollback()
    undo.push("ids", lambda: done.append("ids"), data=True)
    undo.push("address", lambda: done.append("address"))

    def broken() -> None:
        raise OSError("gone already")

    undo.push("cgroup", broken)
    undo.push("attach", lambda: done.append("attach"))
    undo.run(keep_data=True)
    assert done == ["attach", "address"]
    assert undo.names == ["ids"]
    undo.run()
    assert done == ["attach", "address", "ids"] and undo.names == []


LEGAL = {
    ("creating", State.CONFIGURING),
    ("creating", State.RUNNING),
    ("creating", State.ERROR),
    ("configuring", State.RUNNING),
    ("configuring", State.ERROR),
    ("running", State.STOPPED),
    ("running", State.EXPIRED),
    ("stopped", State.RUNNING),
    ("expired", State.RUNNING),
    ("error", State.RUNNING),
}


@pytest.mark.parametrize("old", [s.value for s in State])
@pytest.mark.parametrize("new", list(State))
def test_state_table(old: str, new: State) -> None:
    if (old, new) in LEGAL:
        assert states.check(old, new) is new
    else:
        with pytest.raises(IllegalTransition, match=f"{old} -> {new.value}"):
            states.check(old, new)


async def test_illegal_move_leaves_the_record_alone(tmp_path: Path) -> None:
    from rexecd.models import ContainerRecord
    from rexecd.service.records import Records

    with Store(tmp_path / "state") as store:
        uid = store.create_user("alice", "free").id
        rec = ContainerRecord(
            user_id=uid, name="a", image="busybox", status="stopped", resources=RES
        )
        store.insert_container_checked(rec, 10)
        records = Records(store)
        with pytest.raises(IllegalTransition):
            await records.move(rec.db_id, State.CONFIGURING)
        with pytest.raises(AssertionError, match=r"Records\.move"):
            await records.update(rec.db_id, status="running")
        again = store.get_container(rec.db_id)
        assert again is not None and again.status == "stopped"
        moved = await records.move(rec.db_id, State.RUNNING, pid=1)
        assert moved.status == State.RUNNING and states.of(moved) is State.RUNNING
