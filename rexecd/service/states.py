"""Container states and the one table of the moves between them.

The stored and wire values are the strings of ``models.ContainerStatus``: ``State``
is a ``StrEnum``, so a record's ``status`` compares equal to its member. Every change
of a container's state goes through ``check``; a move the table does not allow is a
bug in the daemon (``IllegalTransition``, an internal error), never a client's fault.
"""

from __future__ import annotations

import enum

from rexecd.models import ContainerRecord


class State(enum.StrEnum):
    CREATING = "creating"
    CONFIGURING = "configuring"  # a role install runs in the container's build
    RUNNING = "running"
    STOPPED = "stopped"
    EXPIRED = "expired"  # stopped by the session expiry; data kept
    ERROR = "error"  # a create or start that failed; data kept


# Where each state may go. A start, restart or settings change of a stopped, expired
# or failed container goes to RUNNING; a failed start of one leaves its state alone.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.CONFIGURING, State.RUNNING, State.ERROR}),
    State.CONFIGURING: frozenset({State.RUNNING, State.ERROR}),
    State.RUNNING: frozenset({State.STOPPED, State.EXPIRED}),
    State.STOPPED: frozenset({State.RUNNING}),
    State.EXPIRED: frozenset({State.RUNNING}),
    State.ERROR: frozenset({State.RUNNING}),
}

# A container in one of these has (or is about to have) an init and kernel objects.
ACTIVE = frozenset({State.CREATING, State.CONFIGURING, State.RUNNING})
# Still being made: start, restart and delete wait or refuse.
BUILDING = frozenset({State.CREATING, State.CONFIGURING})


class IllegalTransition(RuntimeError):
    """The daemon tried a state change the table forbids (a bug: answered as a 500)."""

    def __init__(self, old: State, new: State) -> None:
        super().__init__(f"illegal container state change {old.value} -> {new.value}")
        self.old, self.new = old, new


def check(old: str, new: State) -> State:
    """``new`` if a container in ``old`` may move to it; else ``IllegalTransition``."""
    now = State(old)
    if new not in TRANSITIONS[now]:
        raise IllegalTransition(now, new)
    return new


def of(rec: ContainerRecord) -> State:
    """``rec``'s state as a member (records carry the stored string)."""
    return State(rec.status)
