"""Running the daemon's own command line (``rexecd ...``) in-process for unit tests."""

from __future__ import annotations

import pytest

from rexecd.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``rexecd ARGS``: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err
