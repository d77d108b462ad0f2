"""PTY master operations on the host side: window size and non-blocking reads.

The PTY itself is allocated inside the container (its own devpts) by the spawner's
child; the daemon only holds the master fd it received over SCM_RIGHTS.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios


def set_size(master: int, cols: int, rows: int) -> None:
    """TIOCSWINSZ on the master: the kernel sends SIGWINCH to the foreground process group."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_size(master: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(master, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows


def make_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)
