"""How long tests wait: one slow factor for every deadline in the suite.

``REXECD_TEST_SLOW`` (the cgroup v2 guest harness sets it; a developer on a slow or
loaded machine may too) stretches deadlines only: how long a test waits for
something to happen, never a measurement window or a tolerance. Helpers that take a
deadline (``Daemon.start``, ``poll``, ``apoll``, ``wait_status``) scale it
themselves; a test that waits on its own calls ``scaled``.
"""

from __future__ import annotations

import os

SLOW = max(1.0, float(os.environ.get("REXECD_TEST_SLOW", "1") or "1"))


def scaled(seconds: float) -> float:
    """``seconds`` stretched by the slow factor."""
    return seconds * SLOW
