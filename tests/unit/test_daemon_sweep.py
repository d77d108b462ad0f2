"""The session-start sweep of test daemons left by killed runs (tests/integration/
daemon.py): which records it takes as stale, and which names it will act on. The
removal itself needs root and is shown by killing a pytest run (see the README)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration import daemon as td
from tests.integration.daemon import OwnerRecord, is_alive

TAG = "a1b2c3"


def record(**kw: object) -> OwnerRecord:
    base = {
        "tag": TAG,
        "owner": [1234, 5678],
        "base": "/tmp/pytest-of-root/x/rexecd0",
        "run": f"/run/rexecd-test-{TAG}",
        "bridge": f"rxt{TAG}",
        "subnet": "10.211.178.0/24",
        "nft_table": f"rxt_{TAG}",
        "cgroup_parent": f"rexecd-test-{TAG}",
        "daemon": [1300, 5700],
    }
    base.update(kw)
    return OwnerRecord(**base)  # type: ignore[arg-type]


def starts(table: dict[int, int]):  # type: ignore[no-untyped-def]
    return lambda pid: table.get(pid)


def test_live_owner_is_kept() -> None:
    assert not record().is_stale(starts({1234: 5678}))


def test_dead_owner_is_stale() -> None:
    assert record().is_stale(starts({}))


def test_reused_pid_is_stale() -> None:
    # The pid exists but started at another time: another process took the number.
    assert record().is_stale(starts({1234: 9999}))


def test_live_daemon_does_not_keep_a_dead_owners_record() -> None:
    # The orphaned daemon is what the sweep must stop, not a reason to keep it.
    assert record().is_stale(starts({1300: 5700}))


def test_is_alive_of_nothing() -> None:
    assert not is_alive(None, starts({}))


def test_this_process_is_alive() -> None:
    ident = td._identity(os.getpid())
    assert ident is not None and is_alive(ident)


def _write(tmp_path: Path, name: str, rec: dict[str, object]) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(rec))
    return p


def test_load_roundtrip(tmp_path: Path) -> None:
    rec = record()
    p = _write(tmp_path, f"{TAG}.json", rec.__dict__)
    assert OwnerRecord.load(p) == rec


@pytest.mark.parametrize(
    "field,value",
    [
        ("bridge", "docker0"),  # someone else's bridge
        ("nft_table", "filter"),
        ("cgroup_parent", "system.slice"),
        ("run", "/run/rexecd"),  # a production daemon's run dir
        ("tag", "zzzzzz"),
        ("tag", "a1b2c"),
    ],
)
def test_names_not_of_a_test_daemon_are_refused(tmp_path: Path, field: str, value: str) -> None:
    rec = record(**{field: value})
    p = _write(tmp_path, f"{rec.tag}.json", rec.__dict__)
    assert OwnerRecord.load(p) is None


def test_file_name_must_match_tag(tmp_path: Path) -> None:
    p = _write(tmp_path, "ffffff.json", record().__dict__)
    assert OwnerRecord.load(p) is None


@pytest.mark.parametrize("text", ["", "{", "[]", '{"tag": "a1b2c3"}'])
def test_unreadable_records_are_skipped(tmp_path: Path, text: str) -> None:
    p = tmp_path / f"{TAG}.json"
    p.write_text(text)
    assert OwnerRecord.load(p) is None


def test_sweep_acts_only_on_dead_owners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(td, "OWNERS", tmp_path)
    alive = td._identity(os.getpid())
    assert alive is not None
    dead = record(
        tag="dead00",
        owner=[2**22 + 1, 1],  # above any pid_max: no such process
        run="/run/rexecd-test-dead00",
        bridge="rxtdead00",
        nft_table="rxt_dead00",
        cgroup_parent="rexecd-test-dead00",
    )
    live = record(owner=alive)
    for r in (dead, live):
        _write(tmp_path, f"{r.tag}.json", r.__dict__)
    removed: list[str] = []
    monkeypatch.setattr(OwnerRecord, "remove_objects", lambda self: removed.append(self.tag))
    assert td.sweep_dead_owners() == ["dead00"]
    assert removed == ["dead00"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{TAG}.json"]
