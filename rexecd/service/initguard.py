"""Keeps every container's init running: a stopped pid 1 is noticed and continued.

A stopped init reaps nothing: the container's zombies pile up to its pids limit and
every exec fails. No process of the container can stop it (rexec-init is
non-dumpable, so ptrace needs CAP_SYS_PTRACE, which containers never have, and the
kernel drops SIGSTOP sent to a namespace's init from inside), but the host can: an
operator's strace or gdb that went away, a stray ``kill -STOP``. Every
``INIT_CHECK_S`` the guard reads each watched init's state in /proc and sends
SIGCONT through its pidfd (never to a recycled pid) to one in group stop (``T``),
with a warning in the log and an ``init_resumed`` record in the event log. A
ptrace stop (``t``) belongs to its tracer, whom SIGCONT does not override: it is
logged once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from rexecd.models import utcnow
from rexecd.runtime import procinfo
from rexecd.service.store import Store

log = logging.getLogger(__name__)

INIT_CHECK_S = 1.0


@dataclass
class _Init:
    pid: int
    pidfd: int  # owned by the manager's watcher, which forgets the init before closing it
    name: str
    user_id: str
    traced: bool = False


class InitGuard:
    """The set of watched inits and the loop that continues stopped ones."""

    def __init__(self, store: Store, interval: float = INIT_CHECK_S) -> None:
        self._store = store
        self._interval = interval
        self._inits: dict[str, _Init] = {}

    def watch(self, db_id: str, pid: int, pidfd: int, name: str, user_id: str) -> None:
        self._inits[db_id] = _Init(pid, pidfd, name, user_id)

    def forget(self, db_id: str) -> None:
        self._inits.pop(db_id, None)

    def check(self) -> list[str]:
        """Continue every init in group stop; the db ids of those continued."""
        resumed = []
        for db_id, init in list(self._inits.items()):
            state = procinfo.state(init.pid)
            if state == "T":
                try:
                    signal.pidfd_send_signal(init.pidfd, signal.SIGCONT)
                except ProcessLookupError:
                    continue  # exited meanwhile: the exit watcher takes it from here
                log.warning(
                    "init (pid %d) of container %s was stopped: sent SIGCONT", init.pid, init.name
                )
                resumed.append(db_id)
            elif state == "t" and not init.traced:
                log.warning(
                    "init (pid %d) of container %s is stopped by a tracer on the host",
                    init.pid,
                    init.name,
                )
            init.traced = state == "t"
        return resumed

    async def run(self) -> None:
        """Check forever (the owner cancels the task); one bad pass does not end it."""
        while True:
            try:
                for db_id in self.check():
                    init = self._inits.get(db_id)
                    if init is not None:
                        await asyncio.to_thread(self._record, db_id, init)
            except Exception:
                log.exception("init guard pass failed")
            await asyncio.sleep(self._interval)

    def _record(self, db_id: str, init: _Init) -> None:
        self._store.append_event(
            "init_resumed",
            {"name": init.name, "pid": init.pid},
            user_id=init.user_id,
            container_db_id=db_id,
            ts=utcnow(),
        )
