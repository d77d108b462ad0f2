"""Shared test policy: integration tests need root and real kernel features.

Tests under ``tests/integration`` are marked ``root``; without root they are skipped
with a reason that says so, never silently passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.root)
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(
                pytest.mark.skip(reason="needs root (real namespaces, mounts, cgroups)")
            )
