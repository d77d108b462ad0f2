"""A real Store in a temp dir, and container records to put in it, for unit tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexecd.models import ContainerRecord, ContainerResources
from rexecd.service.store import MIGRATIONS, Store

RES = ContainerResources(memory_mb=512, cpu_shares=1000, disk_mb=2048, network_mbps=10)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


def rec(user_id: str, name: str, **kw: object) -> ContainerRecord:
    """A record of ``name`` owned by ``user_id`` (image ubuntu, RES), ``kw`` over it."""
    fields: dict[str, object] = {
        "user_id": user_id,
        "name": name,
        "image": "ubuntu",
        "resources": RES,
    }
    fields.update(kw)
    return ContainerRecord.model_validate(fields)


def database_at(state: Path, version: int) -> sqlite3.Connection:
    """A state database in ``state`` as an rexecd of schema ``version`` left it (empty),
    open for the test to add rows before a Store migrates it."""
    state.mkdir(mode=0o700)
    db = sqlite3.connect(state / "state.db")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    for statements in MIGRATIONS[:version]:
        for sql in statements:
            db.execute(sql)
    return db
