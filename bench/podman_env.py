"""podman as the benchmarks run it on these machines: its own storage under a temp dir
(nothing left behind) and the settings shared/PEERS.md found necessary here (runc,
cgroupfs, file events, default ulimits podman may not raise without CAP_SYS_RESOURCE)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class PodmanEnv:
    def __init__(self) -> None:
        exe = shutil.which("podman")
        if exe is None:
            raise RuntimeError("podman is not installed (apt-get install podman)")
        self.work = Path(tempfile.mkdtemp(prefix="rexecd-podman-", dir="/var/tmp"))
        conf = self.work / "containers.conf"
        conf.write_text(
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = [
            exe,
            "--root",
            str(self.work / "root"),
            "--runroot",
            str(self.work / "runroot"),
            "--tmpdir",
            str(self.work / "tmp"),
            "--cgroup-manager=cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            "runc",
        ]

    def cmd(self, *args: str) -> list[str]:
        """The full argv of ``podman ARGS`` in this environment (run it with ``env``)."""
        return [*self.base, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(*args), env=self.env, capture_output=True, text=True, check=check, timeout=300
        )

    def close(self) -> None:
        self.run("rm", "-a", "-f", "-t", "0", check=False)
        self.run("system", "reset", "-f", check=False)
        subprocess.run(["umount", "-R", str(self.work)], capture_output=True, check=False)
        shutil.rmtree(self.work, ignore_errors=True)
