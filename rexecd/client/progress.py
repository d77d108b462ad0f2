"""A one-line progress bar for command lines (pulls, creates): redrawn in place on a
terminal, printed as plain lines at most every few seconds elsewhere (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
PLAIN_EVERY_S = 5.0


class ProgressBar:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self._last_plain = 0.0
        self._drawn = False

    def update(self, percent: int, message: str) -> None:
        percent = max(0, min(100, percent))
        if self.tty:
            filled = WIDTH * percent // 100
            bar = "#" * filled + "." * (WIDTH - filled)
            self.out.write(f"\r\x1b[2K[{bar}] {percent:3d}% {message}")
            self._drawn = True
        else:
            now = time.monotonic()
            if now - self._last_plain < PLAIN_EVERY_S and percent < 100:
                return
            self._last_plain = now
            self.out.write(f"{percent:3d}% {message}\n")
        self.out.flush()

    def done(self) -> None:
        """End the bar's line, so what is printed next starts on a fresh one."""
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
        self._drawn = False
