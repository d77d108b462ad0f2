"""The container's mount sequence, recorded through a fake kernel (no root needed).

Each test builds a root with ``child.build_root`` (the steps a new container's pid 1
runs between unshare and exec) against ``FakeKernel`` and compares the exact calls:
order, flags and options. The integration suite checks the same mounts on a real
kernel; these catch a changed flag or a reordered step in milliseconds.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from rexecd import _native as n
from rexecd.runtime import child, rootfs
from rexecd.runtime.spec import (
    DEFAULT_MASKED_PATHS,
    BindMount,
    ContainerSpec,
    ExecSpec,
    ProcessSpec,
    RootfsSpec,
    UsernsSpec,
)
from rexecd.runtime.userns import UsernsFds
from tests.unit.fakes.kernel import Call, FakeKernel, Mount

NSNDNE = n.MS_NOSUID | n.MS_NODEV | n.MS_NOEXEC
ROOT = "/c/rootfs"
NULL = f"{ROOT}/dev/null"


def _spec(mounts: list[BindMount] | None = None, userns: UsernsSpec | None = None) -> ContainerSpec:
    return ContainerSpec(
        id="c1",
        hostname="box",
        rootfs=RootfsSpec(
            lowerdirs=["/layers/a", "/layers/b"],
            upperdir="/c/upper",
            workdir="/c/work",
            target=ROOT,
        ),
        process=ProcessSpec(args=["/bin/sh"]),
        mounts=mounts or [],
        userns=userns,
    )


def _kernel() -> FakeKernel:
    # An image root with no /dev, /proc or /sys of its own: the set-up creates them.
    return FakeKernel(tree=["/layers/a", "/layers/b", "/c/upper", "/c/work", ROOT])


def _build(k: FakeKernel, spec: ContainerSpec, nsfds: UsernsFds | None = None) -> None:
    child.build_root(k, spec, child._Step(), nsfds)
    assert k.open_fds() == {}, "every descriptor opened during set-up is closed"


def _mask_and_readonly() -> list[Mount]:
    """What the default masked and read-only paths become on the fake's proc and sysfs."""
    dirs = {"/proc/acpi", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/block"}
    dirs |= {"/sys/block", "/sys/class/block", "/sys/dev/block"}
    files = {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"}
    masks = [
        Mount("tmpfs", ROOT + p, "tmpfs", n.MS_RDONLY, "size=0")
        if p in dirs
        else Mount(NULL, ROOT + p, None, n.MS_BIND)
        for p in DEFAULT_MASKED_PATHS
        if p in dirs | files  # latency_stats, timer_stats, powercap: absent, skipped
    ]
    ro = []
    for p in ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"):
        ro += [
            Mount(ROOT + p, ROOT + p, None, n.MS_BIND | n.MS_REC),
            Mount(None, ROOT + p, None, n.MS_BIND | n.MS_REMOUNT | n.MS_RDONLY | NSNDNE),
        ]
    return masks + ro


def _default_mounts(id_base: int = 0, lower: str = "/layers/b:/layers/a") -> list[Mount]:
    owner = f",uid={id_base},gid={id_base}" if id_base else ""
    return [
        Mount(None, "/", None, n.MS_REC | n.MS_PRIVATE),
        Mount(
            "overlay",
            ROOT,
            "overlay",
            0,
            f"lowerdir={lower},upperdir=/c/upper,workdir=/c/work",
        ),
        Mount(
            "tmpfs",
            f"{ROOT}/dev",
            "tmpfs",
            n.MS_NOSUID | n.MS_STRICTATIME,
            f"mode=755,size=65536k{owner}",
        ),
        Mount(
            "devpts",
            f"{ROOT}/dev/pts",
            "devpts",
            n.MS_NOSUID | n.MS_NOEXEC,
            f"newinstance,ptmxmode=0666,mode=0620,gid={id_base + 5},max={rootfs.DEVPTS_MAX}",
        ),
        Mount("shm", f"{ROOT}/dev/shm", "tmpfs", NSNDNE, f"mode=1777,size=65536k{owner}"),
        Mount("mqueue", f"{ROOT}/dev/mqueue", "mqueue", NSNDNE),
        Mount("proc", f"{ROOT}/proc", "proc", NSNDNE),
        Mount("sysfs", f"{ROOT}/sys", "sysfs", NSNDNE | n.MS_RDONLY),
        *_mask_and_readonly(),
    ]


PIVOT = [
    Call("chdir", (ROOT,)),
    Call("pivot_root", (".", ".")),
    Call("umount2", (".", n.MNT_DETACH)),
    Call("chdir", ("/",)),
]


def test_default_container_mounts_in_order_with_their_flags() -> None:
    k = _kernel()
    _build(k, _spec())
    assert k.mounts() == _default_mounts()
    assert k.calls[-4:] == PIVOT
    # Nothing but the image's own layers under the overlay, and no idmapping.
    assert k.named("idmap_layers") == []
    assert k.named("chown") == []


def test_dev_holds_only_the_safe_nodes_and_links() -> None:
    k = _kernel()
    _build(k, _spec())
    assert k.named("mknod") == [
        (f"{ROOT}/dev/{name}", stat.S_IFCHR | 0o666, major, minor)
        for name, major, minor in rootfs.DEVICES
    ]
    # mknod's mode is cut by the umask: each node is chmod'ed to 0666 after.
    assert k.named("chmod") == [(f"{ROOT}/dev/{name}", 0o666) for name, _, _ in rootfs.DEVICES]
    assert k.named("symlink") == [
        ("pts/ptmx", f"{ROOT}/dev/ptmx"),
        ("/proc/self/fd", f"{ROOT}/dev/fd"),
        ("/proc/self/fd/0", f"{ROOT}/dev/stdin"),
        ("/proc/self/fd/1", f"{ROOT}/dev/stdout"),
        ("/proc/self/fd/2", f"{ROOT}/dev/stderr"),
    ]


def test_proc_sys_and_dev_are_opened_refusing_symlinks() -> None:
    k = _kernel()
    _build(k, _spec())
    for name in ("dev", "proc", "sys"):
        # The O_PATH opens whose descriptors become mount targets.
        opens = [o for o in k.opens if o.path == f"{ROOT}/{name}" and o.flags & os.O_PATH]
        assert opens and all(o.resolve & n.RESOLVE_NO_SYMLINKS for o in opens), name
        assert all(o.resolve & (n.RESOLVE_IN_ROOT | n.RESOLVE_BENEATH) for o in opens), name


def test_an_image_whose_proc_is_a_symlink_gets_no_proc_mount() -> None:
    k = _kernel()
    k.add(f"{ROOT}/proc", "link", target="/etc")
    k.add(f"{ROOT}/etc", "dir")
    with pytest.raises(OSError) as caught:
        _build(k, _spec())
    assert caught.value.errno == errno.ELOOP
    assert [m.fstype for m in k.mounts()].count("proc") == 0


def test_a_dev_null_that_is_not_the_null_device_stops_masking() -> None:
    # runc CVE-2025-31133: a symlink at /dev/null would turn every mask into a bind of
    # the file it names.
    k = _kernel()
    k.add(f"{ROOT}/proc/sys/kernel/core_pattern", "file")
    k.add(f"{ROOT}/dev/null", "link", target="/proc/sys/kernel/core_pattern")
    rootfd = k.open(ROOT, 0)
    with pytest.raises(OSError) as caught:
        rootfs.mask_paths(k, rootfd, ["/proc/kcore"], [])
    assert caught.value.errno == errno.EINVAL
    assert k.mounts() == []


def test_userns_container_idmaps_the_layers_and_owns_dev() -> None:
    k = _kernel()
    rng = UsernsSpec(base=200_000, size=65_536)
    nsfds = UsernsFds(user=7, net=8, uts=9, ipc=10)
    _build(k, _spec(userns=rng), nsfds)
    assert k.named("idmap_layers") == [(("/layers/a", "/layers/b"), 7)]
    # Only the image layers are idmapped; upper and work already belong to the range.
    expected = _default_mounts(id_base=200_000, lower="idmapped:/layers/b:idmapped:/layers/a")
    assert k.mounts() == expected
    chowns = k.named("chown")
    names = [d[0] for d in rootfs.DEVICES] + ["ptmx", "fd", "stdin", "stdout", "stderr"]
    assert chowns == [
        *[(f"{ROOT}/dev/{x}", 200_000, 200_000, False) for x in names],
        *[(f"{ROOT}/dev/{x}", 200_000, 200_000, True) for x in ("pts", "shm", "mqueue")],
    ]


def test_namespaces_without_userns_are_all_unshared() -> None:
    k = FakeKernel()
    child.join_namespaces(k, _spec(), child._Step())
    assert k.calls == [
        Call(
            "unshare",
            (n.CLONE_NEWNS | n.CLONE_NEWUTS | n.CLONE_NEWIPC | n.CLONE_NEWNET | n.CLONE_NEWCGROUP,),
        )
    ]


def test_namespaces_with_userns_join_the_owned_ones_and_unshare_mount_and_cgroup() -> None:
    k = FakeKernel()
    nsfds = UsernsFds(user=7, net=8, uts=9, ipc=10)
    child.join_namespaces(k, _spec(userns=UsernsSpec(200_000, 65_536)), child._Step(), nsfds=nsfds)
    assert k.calls == [
        Call("setns", (8, n.CLONE_NEWNET)),
        Call("setns", (9, n.CLONE_NEWUTS)),
        Call("setns", (10, n.CLONE_NEWIPC)),
        # Mount and cgroup namespaces stay owned by the host's user namespace.
        Call("unshare", (n.CLONE_NEWNS | n.CLONE_NEWCGROUP,)),
    ]


def test_an_exec_joins_every_namespace_of_the_container_and_closes_its_pidfd() -> None:
    k = FakeKernel(tree=["/proc/4242"])
    pidfd = k.open("/proc/4242", 0)
    body = ExecSpec(container_pid=4242, process=ProcessSpec(args=["/bin/true"]))
    child.join_namespaces(k, body, child._Step(), pidfd)
    everything_but_pid = (
        n.CLONE_NEWNS | n.CLONE_NEWUTS | n.CLONE_NEWIPC | n.CLONE_NEWNET | n.CLONE_NEWCGROUP
    )
    assert k.calls == [Call("setns", (pidfd, everything_but_pid))]
    assert k.open_fds() == {}


def test_volumes_are_bound_after_masking_and_readonly_ones_remounted() -> None:
    k = _kernel()
    k.add("/vol/home", "dir")
    k.add("/vol/data", "dir")
    spec = _spec(
        mounts=[
            BindMount("/vol/home", "/home/user"),
            BindMount("/vol/data", "/data", readonly=True),
        ]
    )
    _build(k, spec)
    assert k.mounts() == [
        *_default_mounts(),
        Mount("/vol/home", f"{ROOT}/home/user", None, n.MS_BIND | n.MS_REC),
        Mount("/vol/data", f"{ROOT}/data", None, n.MS_BIND | n.MS_REC),
        Mount(None, f"{ROOT}/data", None, n.MS_BIND | n.MS_REMOUNT | n.MS_RDONLY),
    ]
    # Missing targets are made inside the root, one component at a time.
    assert [a[0] for a in k.named("mkdir") if not str(a[0]).startswith(f"{ROOT}/dev")] == [
        f"{ROOT}/proc",
        f"{ROOT}/sys",
        f"{ROOT}/home",
        f"{ROOT}/home/user",
        f"{ROOT}/data",
    ]
    assert k.calls[-4:] == PIVOT


def test_a_volume_target_through_a_symlink_stays_inside_the_root() -> None:
    k = _kernel()
    k.add("/vol/home", "dir")
    k.add(f"{ROOT}/home", "link", target="/../../etc")
    k.add(f"{ROOT}/etc", "dir")
    _build(k, _spec(mounts=[BindMount("/vol/home", "/home/user")]))
    # RESOLVE_IN_ROOT: the image's "/../../etc" is the container's /etc, not the host's.
    assert k.mounts()[-1] == Mount("/vol/home", f"{ROOT}/etc/user", None, n.MS_BIND | n.MS_REC)


def test_lxcfs_binds_go_over_existing_proc_files_without_symlinks() -> None:
    k = _kernel()
    binds = [BindMount(f"/var/lib/lxcfs/proc/{f}", f"/proc/{f}") for f in ("meminfo", "uptime")]
    _build(k, _spec(mounts=binds))
    assert k.mounts()[-2:] == [
        Mount(b.source, ROOT + b.target, None, n.MS_BIND | n.MS_REC) for b in binds
    ]
    opens = [o for o in k.opens if o.path.endswith(("proc/meminfo", "proc/uptime"))]
    assert opens and all(o.resolve & n.RESOLVE_NO_SYMLINKS for o in opens)


def test_an_lxcfs_bind_over_a_missing_proc_file_is_not_created() -> None:
    k = _kernel()
    with pytest.raises(FileNotFoundError):
        _build(k, _spec(mounts=[BindMount("/var/lib/lxcfs/proc/diskstats", "/proc/diskstats")]))
    assert f"{ROOT}/proc/diskstats" not in k.nodes
    assert all(c.name != "pivot_root" for c in k.calls if isinstance(c, Call))


def test_a_failed_mount_names_its_step() -> None:
    k = _kernel()
    k.fail(
        lambda c: isinstance(c, Mount) and c.fstype == "sysfs", PermissionError(errno.EPERM, "no")
    )
    step = child._Step()
    with pytest.raises(PermissionError):
        child.build_root(k, _spec(), step)
    assert step.name == "mount /proc and /sys"
    assert [m.fstype for m in k.mounts()][-1] == "proc"
