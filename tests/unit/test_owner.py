"""The state dir's lock and the owner marks, without root (no host resources touched:
a resource is a pair of functions here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rexecd import owner
from rexecd.errors import RuntimeUnavailable


def test_a_second_lock_on_a_state_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = owner.StateDirLock(tmp_path)
    try:
        with pytest.raises(RuntimeUnavailable, match=rf"in use by rexecd \(pid {os.getpid()}\)"):
            owner.StateDirLock(tmp_path)
        assert owner.holder(str(tmp_path)) == os.getpid()
    finally:
        first.release()
    assert owner.holder(str(tmp_path)) is None
    owner.StateDirLock(tmp_path).release()  # free again


def test_state_owner_is_stable_and_marks_round_trip(tmp_path: Path) -> None:
    me = owner.state_owner(tmp_path)
    assert owner.state_owner(tmp_path) == me
    assert owner.Owner.parse(me.mark()) == me
    assert owner.Owner.parse("rexecd-owner id=zz dir=/x") is None
    assert owner.Owner.parse(None) is None
    # A path that cannot go inside an nft comment is not written into marks.
    odd = tmp_path / 'a "b'
    odd.mkdir()
    assert owner.state_owner(odd).state_dir == "/"


def _resource(marks: dict[str, str | None], name: str) -> owner.Resource:
    def write(mark: str) -> None:
        marks[name] = mark

    return owner.Resource(name, lambda: marks.get(name), write)


def test_another_live_daemons_mark_refuses_and_changes_nothing(tmp_path: Path) -> None:
    theirs_dir, mine_dir = tmp_path / "theirs", tmp_path / "mine"
    theirs_dir.mkdir()
    mine_dir.mkdir()
    theirs, me = owner.state_owner(theirs_dir), owner.state_owner(mine_dir)
    marks: dict[str, str | None] = {"cg": theirs.mark(), "br": None}
    res = [_resource(marks, "br"), _resource(marks, "cg")]
    lock = owner.StateDirLock(theirs_dir)
    try:
        with pytest.raises(RuntimeUnavailable, match=rf"cg belongs to .* \(pid {os.getpid()}\)"):
            owner.check(res, me)
        assert marks == {"cg": theirs.mark(), "br": None}
    finally:
        lock.release()
    # Their daemon is gone: the resources are taken over.
    owner.check(res, me)
    owner.claim(res, me)
    assert marks == {"cg": me.mark(), "br": me.mark()}
