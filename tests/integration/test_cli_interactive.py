"""Integration: the ``rexec`` CLI as a sysadmin drives it, against a real daemon and a
busybox container: ``connect`` inside tmux (exit status, detach and reattach with
replay, ``~.``, resize), ``exec -i/-t`` over the exec stream, ``cp`` of a tree both
ways, and ``logs``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deadlines import scaled

from .daemon import ROOT, Daemon
from .daemon_fixtures import db_rows, poll, running_daemon, unique
from .terminal_client import create_running, exec_sh

REXEC = [sys.executable, "-m", "rexecd.client.cli"]


@dataclass
class Env:
    d: Daemon
    token: str
    box: str

    @property
    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "REXEC_HOST": self.d.url,
            "REXEC_TOKEN": self.token,
            "PYTHONPATH": str(ROOT),
        }

    def rexec(
        self, *args: str, stdin: bytes | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*REXEC, *args],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env=self.environ,
            cwd=ROOT,
            timeout=scaled(60),
            check=check,
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with running_daemon(tmp_path_factory) as d:
        token = d.token(unique("cli"), tier="pro")
        box = unique("box")
        create_running(d, token, box)
        yield Env(d, token, box)


# ------------------------------------------------------------------ connect, in tmux


class Tmux:
    """One detached tmux session running a command; its screen read with capture-pane."""

    def __init__(self, env: Env, tmp: Path, *args: str, cols: int = 100, rows: int = 30) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed")
        self.name = unique("rxtmux")
        script = tmp / f"{self.name}.sh"
        words = " ".join(f"'{w}'" for w in [*REXEC, *args])
        # The pane stays after the command, so its exit status can be read off it.
        script.write_text(f"{words}\necho RC=$?\nsleep 600\n")
        env_args = [f"-e{k}={v}" for k, v in env.environ.items() if k.startswith(("REXEC", "PY"))]
        subprocess.run(
            [
                "tmux",
                "new-session",
                "-d",
                "-s",
                self.name,
                "-x",
                str(cols),
                "-y",
                str(rows),
                *env_args,
                "-c",
                str(ROOT),
                "sh",
                str(script),
            ],
            check=True,
        )

    def screen(self) -> str:
        out = subprocess.run(
            ["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout

    def wait_for(self, text: str, what: str = "") -> str:
        return poll(lambda: self.screen() if text in self.screen() else None, what=what or text)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-l", "-t", self.name, text], check=True)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False)


@pytest.fixture
def tmux(env: Env, tmp_path: Path) -> Iterator[list[Tmux]]:
    made: list[Tmux] = []
    yield made
    for t in made:
        t.close()


def _connect(env: Env, tmp: Path, made: list[Tmux], *args: str, **size: int) -> Tmux:
    t = Tmux(env, tmp, "connect", env.box, *args, **size)
    made.append(t)
    t.wait_for("# ", "the shell's prompt")
    return t


def test_connect_exits_with_the_shell_status(env: Env, tmp_path: Path, tmux: list[Tmux]) -> None:
    t = _connect(env, tmp_path, tmux, "--new-session", "--session", unique("s"))
    t.type("exit 5")
    t.keys("Enter")
    t.wait_for("RC=5")


def test_connect_detach_then_reattach_with_replay(
    env: Env, tmp_path: Path, tmux: list[Tmux]
) -> None:
    session = unique("s")
    t = _connect(env, tmp_path, tmux, "--session", session)
    mark = unique("mark")
    t.type(f"echo {mark}-$$")
    t.keys("Enter")
    screen = poll(
        lambda: (s := t.screen()) and s.count(f"{mark}-") >= 2 and s, what="the marker echoed"
    )
    shell_pid = screen.split(f"{mark}-")[2].split()[0]
    t.keys("C-p", "C-q")
    screen = t.wait_for("RC=0", "rexec to exit 0 on detach")
    assert f"rexec connect {env.box} --session {session}" in screen
    # Reattached: the earlier output is replayed, and it is the same shell.
    t2 = _connect(env, tmp_path, tmux, "--session", session)
    t2.wait_for(f"{mark}-{shell_pid}", "the replayed marker")
    t2.type("echo again-$$")
    t2.keys("Enter")
    t2.wait_for(f"again-{shell_pid}", "the same shell")
    t2.type("exit 0")
    t2.keys("Enter")
    t2.wait_for("RC=0")


def test_connect_tilde_dot_escape(env: Env, tmp_path: Path, tmux: list[Tmux]) -> None:
    t = _connect(env, tmp_path, tmux, "--session", unique("s"))
    t.keys("Enter")
    t.type("~.")
    screen = t.wait_for("RC=255", "rexec to drop the connection on ~.")
    assert "connection closed (~.)" in screen


def test_connect_follows_resize(env: Env, tmp_path: Path, tmux: list[Tmux]) -> None:
    t = _connect(env, tmp_path, tmux, "--session", unique("s"), cols=100, rows=30)
    t.type("stty size")
    t.keys("Enter")
    t.wait_for("30 100", "the first size")
    subprocess.run(["tmux", "resize-window", "-t", t.name, "-x", "120", "-y", "40"], check=True)
    t.type("clear; stty size")
    t.keys("Enter")
    t.wait_for("40 120", "the new size")
    t.type("exit 0")
    t.keys("Enter")
    t.wait_for("RC=0")


# ------------------------------------------------------------------ exec -i / -t


def test_exec_i_streams_stdin(env: Env) -> None:
    r = env.rexec("exec", "-i", env.box, "--", "wc", "-l", stdin=b"a\nb\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"2"


def test_exec_i_large_stdin_byte_exact(env: Env) -> None:
    data = os.urandom(3 * 1024 * 1024)
    r = env.rexec("exec", "-i", env.box, "--", "md5sum", stdin=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


def test_exec_t_gets_a_pty(env: Env) -> None:
    r = env.rexec("exec", "-t", env.box, "--", "tty")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip().startswith("/dev/pts/"), r.stdout


def test_exec_stream_passes_exit_status_and_stderr(env: Env) -> None:
    r = env.rexec("exec", "-i", env.box, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    r = env.rexec("exec", "-i", env.box, "--", "no-such-program")
    assert r.returncode == 127
    assert b"no-such-program" in r.stderr


def test_exec_timeout_is_an_option_and_one_line(env: Env) -> None:
    for flags in ((), ("-i",)):
        r = env.rexec("exec", *flags, env.box, "--timeout", "1", "--", "sleep", "30")
        assert r.returncode == 1
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rexec: command timed out"), lines
        assert "{" not in lines[0]


def test_exec_stream_process_dies_with_its_client(env: Env) -> None:
    marker = unique("sleeper")
    proc = subprocess.Popen(
        [*REXEC, "exec", "-i", env.box, "--", "sh", "-c", f"exec sleep 3{len(marker)}"],
        stdin=subprocess.PIPE,
        env=env.environ,
        cwd=ROOT,
    )
    try:
        needle = f"sleep 3{len(marker)}"
        poll(lambda: needle in exec_sh(env.d, env.token, env.box, "ps"), what="sleep running")
    finally:
        proc.kill()
        proc.wait()
    poll(
        lambda: needle not in exec_sh(env.d, env.token, env.box, "ps"),
        what="the stream's process killed with its socket",
    )


# ------------------------------------------------------------------ cp


def _tree(root: Path) -> dict[str, tuple[int, str, bytes]]:
    out: dict[str, tuple[int, str, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = (stat.S_IMODE(st.st_mode), "link", os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = (stat.S_IMODE(st.st_mode), "dir", b"")
        else:
            out[rel] = (stat.S_IMODE(st.st_mode), "file", path.read_bytes())
    return out


def test_cp_tree_both_ways_byte_exact_with_modes(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "bin.dat").write_bytes(os.urandom(300_000))
    (src / "secret").write_text("s")
    (src / "secret").chmod(0o600)
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "deep" / "empty").touch()
    (src / "sub" / "deep").chmod(0o711)
    (src / "sub").chmod(0o1777)
    os.symlink("secret", src / "link")
    dest = f"/tmp/{unique('cp')}"

    r = env.rexec("cp", str(src), f"{env.box}:{dest}")
    assert r.returncode == 0, r.stderr
    assert exec_sh(env.d, env.token, env.box, f"{dest}/run.sh") == "hi\n"
    assert exec_sh(env.d, env.token, env.box, f"stat -c %a {dest}/secret") == "600\n"

    back = tmp_path / "back"
    back.mkdir()
    r = env.rexec("cp", f"{env.box}:{dest}", str(back / "copy"))
    assert r.returncode == 0, r.stderr
    assert _tree(back / "copy") == _tree(src)
    # Into an existing directory: the source's name is kept.
    r = env.rexec("cp", f"{env.box}:{dest}/secret", str(back))
    assert r.returncode == 0, r.stderr
    assert (back / "secret").read_text() == "s"
    shutil.rmtree(back)


def test_cp_refuses_a_tree_that_escapes(env: Env, tmp_path: Path) -> None:
    # The tenant's symlink pointing at the host's root must not be followed or made.
    d = f"/tmp/{unique('evil')}"
    exec_sh(env.d, env.token, env.box, f"mkdir -p {d} && ln -s ../../../../.. {d}/up")
    dest = tmp_path / "dest"
    dest.mkdir()
    r = env.rexec("cp", f"{env.box}:{d}", str(dest / "x"))
    assert r.returncode != 0
    assert b"refused" in r.stderr
    assert not (dest / "x" / "up").is_symlink()


def test_cp_missing_source_says_so(env: Env, tmp_path: Path) -> None:
    r = env.rexec("cp", f"{env.box}:/no/such/thing", str(tmp_path))
    assert r.returncode != 0
    assert b"/no/such" in r.stderr


# ------------------------------------------------------------------ logs


def _init_stdout(env: Env, name: str, fd: int = 1) -> Path:
    """The init's stdout as the host sees it: writing there is the init printing."""
    ((pid,),) = db_rows(env.d, "SELECT pid FROM containers WHERE name = ?", name)
    return Path(f"/proc/{pid}/fd/{fd}")


def test_logs_show_and_follow_init_output(env: Env, tmp_path: Path) -> None:
    first, second = unique("first"), unique("second")
    _init_stdout(env, env.box).write_text(first + "\n")
    poll(lambda: first.encode() in env.rexec("logs", env.box).stdout, what="the first line")
    out = tmp_path / "follow.out"
    with open(out, "wb") as sink:
        follower = subprocess.Popen(
            [*REXEC, "logs", "-f", env.box], stdout=sink, env=env.environ, cwd=ROOT
        )
    try:
        poll(lambda: first.encode() in out.read_bytes(), what="the follower's backlog")
        _init_stdout(env, env.box, 2).write_text(second + "\n")
        poll(lambda: second.encode() in out.read_bytes(), what="the followed line")
        assert follower.poll() is None  # still following while the container runs
    finally:
        follower.kill()
        follower.wait()


def test_log_keeps_a_bounded_tail_and_the_daemon_answers(env: Env) -> None:
    ((cid,),) = db_rows(env.d, "SELECT id FROM containers WHERE name = ?", env.box)
    log_file = env.d.state / "logs" / f"{cid}.log"
    last = unique("last")
    with open(_init_stdout(env, env.box), "w") as f:
        for i in range(40_000):  # about 3 MiB
            f.write(f"{i:08d} {'x' * 64}\n")
        f.write(last + "\n")
    poll(lambda: last.encode() in env.rexec("logs", env.box).stdout, what="the tail")
    assert log_file.stat().st_size <= 1024 * 1024
    assert env.rexec("ls").returncode == 0


def test_logs_are_the_owners_and_go_with_the_container(env: Env) -> None:
    other = Env(env.d, env.d.token(unique("other")), env.box)
    r = other.rexec("logs", env.box)
    assert r.returncode == 1 and b"not found" in r.stderr
    name = unique("gone")
    c = create_running(env.d, env.token, name)
    _init_stdout(env, name).write_text("bye\n")
    log_file = env.d.state / "logs" / f"{c['id']}.log"
    poll(log_file.exists, what="the log file")
    assert env.rexec("rm", name).returncode == 0
    poll(lambda: not log_file.exists(), what="the log removed with its container")


# ------------------------------------------------------------------ output


def test_clamped_size_is_said(env: Env) -> None:
    name = unique("big")
    r = env.rexec("--json", "create", "busybox", "--name", name, "--memory", "999999")
    try:
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        (clamp,) = body["clamped"]
        assert clamp["field"] == "memory_mb" and clamp["requested"] == 999999
        assert clamp["granted"] == body["resources"]["memory_mb"] < 999999
        warning = r.stderr.decode()
        assert warning.startswith("rexec: warning: memory 999999 MB was set to ")
        assert "the tier's limit" in warning
    finally:
        env.rexec("rm", name, "--volumes")


def test_exec_stream_is_the_owners_and_needs_write(env: Env) -> None:
    other = Env(env.d, env.d.token(unique("other")), env.box)
    r = other.rexec("exec", "-i", env.box, "--", "true")
    assert r.returncode == 1 and b"container not found (404)" in r.stderr, r.stderr
    user, name = unique("ro"), unique("robox")
    writer = Env(env.d, env.d.token(user), name)
    create_running(env.d, writer.token, name)
    try:
        reader = Env(env.d, env.d.token(user, scopes="read"), name)
        r = reader.rexec("exec", "-i", name, "--", "true")
        assert r.returncode == 1 and b"(403)" in r.stderr, r.stderr
        assert writer.rexec("exec", "-i", name, "--", "true").returncode == 0
    finally:
        writer.rexec("rm", name, "--volumes")


def test_logs_survive_a_daemon_crash(tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_daemon(tmp_path_factory) as d:
        env = Env(d, d.token(unique("crash"), tier="pro"), unique("box"))
        create_running(d, env.token, env.box)
        before, while_down, after = unique("before"), unique("down"), unique("after")
        _init_stdout(env, env.box).write_text(before + "\n")
        poll(lambda: before.encode() in env.rexec("logs", env.box).stdout, what="before")
        d.stop(kill=True)
        # The init keeps writing while no daemon reads (its own read end keeps EPIPE away).
        _init_stdout(env, env.box).write_text(while_down + "\n")
        d.start()
        _init_stdout(env, env.box).write_text(after + "\n")

        def log_with_after() -> bytes | None:
            out = env.rexec("logs", env.box).stdout
            return out if after.encode() in out else None

        out = poll(log_with_after, what="after the restart")
        assert (
            out.index(before.encode()) < out.index(while_down.encode()) < out.index(after.encode())
        )
        assert env.rexec("exec", env.box, "--", "true").returncode == 0
