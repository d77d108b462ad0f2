"""The undo stack of a container start: each step that made something pushes how to
undo it, and a failure undoes exactly the steps made so far, newest first.

Steps that hold the container's data (its id range, its mounted volume) are marked
``data``: a role build undoes its run but keeps them (the build's upper dir is still
read after it), while a failed start undoes everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class _Step:
    name: str
    undo: Callable[[], object]
    data: bool


@dataclass
class Rollback:
    steps: list[_Step] = field(default_factory=list)

    def push(self, name: str, undo: Callable[[], object], *, data: bool = False) -> None:
        self.steps.append(_Step(name, undo, data))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def run(self, *, keep_data: bool = False) -> None:
        """Undo the steps newest first (with ``keep_data``, all but the data ones).
        One undo failing does not stop the others: it is logged, and start-up
        reconcile sweeps what it left. Blocking: run it in a thread."""
        kept: list[_Step] = []
        for step in reversed(self.steps):
            if keep_data and step.data:
                kept.append(step)
                continue
            try:
                step.undo()
            except Exception:  # the other undos must still run
                log.exception("undoing %s failed", step.name)
        self.steps = list(reversed(kept))
