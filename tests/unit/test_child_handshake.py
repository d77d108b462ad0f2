"""The daemon's waits on an exec child's handshake (its PTY master, then its execve)
are bounded: a child that never answers costs the calling thread ``timeout`` seconds,
then a ChildSetupError, never a thread for good (no root needed: a socketpair stands
in for the spawner's sync socket)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from rexecd.errors import ChildSetupError
from rexecd.runtime import sync
from rexecd.runtime.spawner import Child


@pytest.fixture
def pair() -> Iterator[tuple[Child, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        yield Child(pid=os.getpid(), sock=a), b
    finally:
        a.close()
        b.close()


def test_silent_child_times_out_on_pty_master(pair: tuple[Child, socket.socket]) -> None:
    child, _peer = pair
    t0 = time.monotonic()
    with pytest.raises(ChildSetupError, match=r"no answer from the child in 0\.2s"):
        child.expect(sync.PtyMaster, timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_silent_child_times_out_on_exec(pair: tuple[Child, socket.socket]) -> None:
    child, _peer = pair
    with pytest.raises(ChildSetupError, match="its exec"):
        child.wait_exec(timeout=0.2)


def test_answer_within_the_bound_is_taken(pair: tuple[Child, socket.socket]) -> None:
    child, peer = pair
    r, w = os.pipe()
    try:
        sync.send(peer, sync.PtyMaster(pts="/dev/pts/3"), [r])
        msg, fds = child.expect(sync.PtyMaster, timeout=5)
        assert msg == sync.PtyMaster(pts="/dev/pts/3")
        assert len(fds) == 1
        os.close(fds[0])
        # The socket is back to blocking for whatever the caller does next.
        assert child.sock.gettimeout() is None
        peer.close()
        child.wait_exec(timeout=5)  # EOF: the child exec'd
    finally:
        os.close(r)
        os.close(w)
