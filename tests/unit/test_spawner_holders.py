"""The daemon's side of the spawner's user namespace holders, without root: it keeps the
pidfd each holder sends, closes it when the spawner says it reaped the holder, and
reaps (as its new parent) every holder left once the spawner is gone."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from rexecd.runtime import sync
from rexecd.runtime.spawner import Spawner


def bare_client() -> Spawner:
    """The client's holder bookkeeping alone: no spawner process behind it."""
    sp = Spawner.__new__(Spawner)
    sp._holders = {}
    return sp


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_holder_left_behind_is_reaped_and_one_reaped_by_the_spawner_forgotten() -> None:
    sp = bare_client()
    # Our own children stand for holders re-parented to the daemon.
    left = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["sleep", "60"])
    try:
        left_fd, gone_fd = os.pidfd_open(left.pid), os.pidfd_open(gone.pid)
        sp._track_holder(sync.Holder(pid=left.pid), [left_fd])
        sp._track_holder(sync.Holder(pid=gone.pid), [gone_fd])
        assert sp._holders == {left.pid: left_fd, gone.pid: gone_fd}
        sp._track_holder(sync.Holder(pid=gone.pid, reaped=True), [])
        assert sp._holders == {left.pid: left_fd} and not fd_open(gone_fd)
        left.send_signal(signal.SIGKILL)  # as PDEATHSIG does when the spawner dies
        sp._reap_holders()
        assert sp._holders == {} and not fd_open(left_fd)
        # Reaped by the client, not left a zombie: nothing for anyone else to wait for.
        with pytest.raises(ChildProcessError):
            os.waitpid(left.pid, os.WNOHANG)
    finally:
        gone.kill()
        gone.wait()
        if sp._holders:  # failed before the client reaped it (after, its pid is free)
            left.kill()
            left.wait()
        else:
            left.returncode = -signal.SIGKILL  # so that Popen never signals the pid again


def test_a_holder_message_with_extra_fds_keeps_only_the_pidfd() -> None:
    sp = bare_client()
    r, w = os.pipe()
    child = subprocess.Popen(["sleep", "60"])
    try:
        pidfd = os.pidfd_open(child.pid)
        sp._track_holder(sync.Holder(pid=child.pid), [pidfd, r, w])
        assert sp._holders == {child.pid: pidfd}
        assert not fd_open(r) and not fd_open(w)
        # A reaped report carrying fds keeps none of them.
        r2, w2 = os.pipe()
        sp._track_holder(sync.Holder(pid=child.pid, reaped=True), [r2, w2])
        assert sp._holders == {} and not fd_open(pidfd)
        assert not fd_open(r2) and not fd_open(w2)
    finally:
        child.kill()
        child.wait()
