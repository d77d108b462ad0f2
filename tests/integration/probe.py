"""Static probes for the seccomp and CVE tests, built once per session with gcc, the
image layer that carries them into containers, and a running container to exec into.

``probe`` (syscall_probe.c) tries syscalls from inside a container and prints ``NAME=RESULT``
lines; ``interp`` (interp.c) is a libc-free ELF interpreter that prints what
/proc/self/exe is.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexecd.runtime.cgroups import CgroupLimits
from rexecd.runtime.container import ContainerDirs, ImageView, Runtime
from rexecd.runtime.spec import BindMount, ProcessSpec
from tests.deadlines import scaled

HERE = Path(__file__).resolve().parent


def _gcc(out: Path, *args: str) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (scripts/setup installs it)")
    cmd = ["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), *args]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build {out.name}: {r.stderr.decode()[-300:]}")
    return out


def build_probe(dest: Path) -> Path:
    """``dest``/probe, static (images may have no libc)."""
    return _gcc(dest / "probe", "-static", str(HERE / "syscall_probe.c"))


def build_interp(dest: Path) -> Path:
    if platform.machine() != "x86_64":
        pytest.skip("the stand-in ELF interpreter is written for x86_64")
    return _gcc(
        dest / "interp",
        "-nostdlib",
        "-fno-stack-protector",
        "-fPIE",
        "-static-pie",
        str(HERE / "interp.c"),
    )


def probe_layer(dest: Path, probe: Path) -> Path:
    """A layer holding only /bin/probe (stacked above a busybox layer)."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(probe, dest / "bin" / "probe")
    return dest


def parse(out: str) -> dict[str, str]:
    """``NAME=RESULT`` lines of a probe run, as a dict."""
    # A PTY ends lines with \r\n, and echoes what TIOCSTI pushed in front of a line.
    text = out.replace("\r", "")
    return dict(m.groups() for m in re.finditer(r"^[ \t]*([\w-]+)=(\S+)$", text, re.M))


def elf_interpreter(binary: Path) -> str | None:
    """The PT_INTERP path of a 64-bit little-endian ELF ``binary`` (None when static)."""
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 0x20)[0],
        *struct.unpack_from("<HH", data, 0x36),
    )
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, base)
        if p_type == 3:  # PT_INTERP
            return data[offset : offset + filesz].rstrip(b"\0").decode()
    return None


@pytest.fixture(scope="session")
def probe_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_probe(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="session")
def probe_lower(tmp_path_factory: pytest.TempPathFactory, probe_bin: Path) -> Path:
    return probe_layer(tmp_path_factory.mktemp("probe-layer") / "root", probe_bin)


def image(*layers: Path) -> ImageView:
    """An image of ``layers`` (lowest first) that runs ``sh``."""
    return ImageView(
        layers=list(layers),
        env=["PATH=/bin"],
        entrypoint=None,
        cmd=["sh"],
        working_dir="/",
        user="",
    )


@contextlib.contextmanager
def running(
    rt: Runtime,
    img: ImageView,
    *,
    seccomp: str = "default",
    mounts: list[BindMount] | None = None,
    dirs: ContainerDirs | None = None,
) -> Iterator[tuple[str, int]]:
    """A container idling under ``seccomp``: ``(id, init pid)``; stopped and removed
    after (its data too unless ``dirs`` were given by the caller)."""
    cid = uuid.uuid4().hex * 2
    own = dirs is None
    dirs = dirs or rt.dirs(cid)
    rt.create_dirs(dirs)
    try:
        spec = rt.build_spec(
            cid, "probe", img, dirs, args=["sleep", "100000"], mounts=mounts, seccomp=seccomp
        )
        pid = rt.start(spec, CgroupLimits())
        try:
            yield cid, pid
        finally:
            rt.stop(cid, pid, timeout=scaled(2))
    finally:
        if own:
            rt.remove(cid)
        else:
            rt.release(cid)


def exec_out(
    rt: Runtime,
    cid: str,
    pid: int,
    args: list[str],
    *,
    tty: bool = False,
    seccomp: str = "default",
    cwd: str = "/",
) -> tuple[int, str]:
    """Run ``args`` in the container (on a PTY from its devpts if ``tty``): its exit
    status and output."""
    proc = ProcessSpec(args=args, env=["PATH=/bin"], tty=tty, cwd=cwd)
    if tty:
        child, master = rt.exec(cid, pid, proc, seccomp=seccomp)
        assert master is not None
        r = master
    else:
        r, w = os.pipe()
        try:
            child, _ = rt.exec(cid, pid, proc, [w, w, w], seccomp=seccomp)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
    out = b""
    try:
        while chunk := os.read(r, 65536):
            out += chunk
    except OSError:
        pass  # EIO: the PTY's slave side closed
    finally:
        os.close(r)
    status = rt.spawner.wait(child.pid, timeout=scaled(30))
    assert status is not None, f"{args} did not exit"
    return status, out.decode(errors="replace")
