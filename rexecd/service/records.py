"""The manager's view of container records: look-ups by owner, field updates, state
moves checked against ``states.TRANSITIONS``, and the per-container lock that keeps
two requests from changing one container at once."""

from __future__ import annotations

import asyncio
from typing import Any

from rexecd.errors import ContainerNotFound
from rexecd.models import ContainerRecord
from rexecd.service import states
from rexecd.service.auth import Principal
from rexecd.service.states import State
from rexecd.service.store import Store
from rexecd.service.storethread import in_store_thread


class Records:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, db_id: str) -> asyncio.Lock:
        lock = self._locks.get(db_id)
        if lock is None:
            lock = self._locks[db_id] = asyncio.Lock()
        return lock

    def forget(self, db_id: str) -> None:
        self._locks.pop(db_id, None)

    async def find(self, p: Principal, ref: str) -> ContainerRecord:
        rec = await in_store_thread(self.store.find_container, p.user_id, ref)
        if rec is None:
            raise ContainerNotFound("container not found")
        return rec

    async def get(self, db_id: str) -> ContainerRecord | None:
        return await in_store_thread(self.store.get_container, db_id)

    async def update(self, db_id: str, **fields: Any) -> ContainerRecord:
        """Fields other than ``status`` (a state change goes through ``move``)."""
        assert "status" not in fields, "state changes go through Records.move"
        return await in_store_thread(self.store.update_container, db_id, **fields)

    async def move(self, db_id: str, new: State, **fields: Any) -> ContainerRecord:
        """Move the container to ``new`` with ``fields``; ``IllegalTransition`` if its
        stored state may not go there."""
        return await in_store_thread(self._move, db_id, new, fields)

    def _move(self, db_id: str, new: State, fields: dict[str, Any]) -> ContainerRecord:
        cur = self.store.get_container(db_id)
        if cur is None:
            raise ContainerNotFound("container not found")
        states.check(cur.status, new)
        return self.store.update_container(db_id, status=new.value, **fields)
