"""PTY master operations on the host side: the window size.

The PTY itself is allocated inside the container (its own devpts) by the spawner's
child; the daemon only holds the master fd it received over SCM_RIGHTS.
"""

from __future__ import annotations

import fcntl
import struct
import termios


def set_size(master: int, cols: int, rows: int) -> None:
    """TIOCSWINSZ on the master: the kernel sends SIGWINCH to the foreground process group."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


