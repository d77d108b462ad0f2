"""lxcfs: where it runs, its /proc files bound over a container's own, so that ``free``,
``top``, ``uptime`` and ``nproc``-style readers of /proc see the container's cgroup
limits and numbers rather than the host's.

lxcfs answers each read from the cgroup of the process reading, so one mount serves
every container. rexecd does not start it: it is the host's service (Debian's
``lxcfs`` package), found at its mount point.
"""

from __future__ import annotations

from pathlib import Path

from rexecd.runtime.spec import BindMount

# The /proc files lxcfs virtualises that a container's tools read.
PROC_FILES = ("meminfo", "cpuinfo", "stat", "uptime", "loadavg", "diskstats", "swaps")


def _mounted_lxcfs(mountpoint: Path, mountinfo: str) -> bool:
    want = str(mountpoint)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields:
            continue
        fstype = fields[fields.index("-") + 1]
        # Octal escapes (\\040 for a space) in the mount point are left as they are:
        # a mount point with a space simply is not found.
        if fields[4] == want and fstype == "fuse.lxcfs":
            return True
    return False


def proc_binds(mountpoint: Path, mountinfo_path: str = "/proc/self/mountinfo") -> list[BindMount]:
    """The binds for a container's /proc when lxcfs is mounted at ``mountpoint``; []
    when it is not (containers then see the host's /proc totals)."""
    try:
        with open(mountinfo_path) as f:
            mountinfo = f.read()
    except OSError:
        return []
    if not _mounted_lxcfs(mountpoint, mountinfo):
        return []
    # Not remounted read-only: lxcfs itself refuses every write to these files.
    return [
        BindMount(source=str(mountpoint / "proc" / name), target=f"/proc/{name}")
        for name in PROC_FILES
        if (mountpoint / "proc" / name).is_file()
    ]
