"""Malicious layers, imported as root through the whole store: every case proves that
nothing outside the store changed (a sentinel tree beside it is snapshotted before and
after, host files checked) and what the layer directory holds, or that the import was
refused with an ImageError naming the member and left nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.unpack_cases import CASES, Case, check_layer, sentinel

__all__ = ["sentinel"]  # a fixture used here


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malicious_layer(tmp_path: Path, sentinel: Path, case: Case) -> None:
    check_layer(tmp_path, sentinel, case)
