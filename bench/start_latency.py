#!/usr/bin/env python3
"""Container start latency: N sequential runs of /bin/true, rexecd's runtime layer in one
long-lived process (as the daemon does it: spawn, exec, reap, clean up, cgroup
included) side by side with `crun run` and `runc run` on the same busybox rootfs.

Run as root: .venv/bin/python bench/start_latency.py [--runs 100] [--seccomp-cost]
[--userns-cost] [--phases]
Results: a table on stdout and bench/results/start_latency.json.

--phases also prints where the time of a start goes (medians per phase, upper on tmpfs,
default profile): the spawner and its children write each set-up step's start time to
the file named by REXECD_START_TRACE (see rexecd/runtime/spawner.py), and the bench
adds its own marks (start, exec'd, reaped, removed) on the same monotonic clock.

rexecd runs with its default seccomp profile, as the daemon does. --seccomp-cost also
runs it unconfined, alternating the two profiles run by run in the same spawner so
that drift on the machine weighs on both alike. --userns-cost adds the default profile
in a user namespace of the container's own (idmapped layers, as ``userns.enabled:
auto`` does where the kernel can) and unconfined without one, interleaved the same way:
the cost of both defences against neither; and the user namespace start once more
through a spawner that makes no spare holder ahead (``Spawner(spare_userns=False)``),
which is what a start costs when starts come faster than spares are made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rexecd.runtime.cgroups import CgroupLimits, open_driver  # noqa: E402
from rexecd.runtime.container import Runtime  # noqa: E402
from rexecd.runtime.images import ImageStore  # noqa: E402
from rexecd.runtime.spawner import TRACE_ENV, Spawner  # noqa: E402
from rexecd.runtime.userns import IdRanges  # noqa: E402
from rexecd.service.oneshot import image_view  # noqa: E402


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median_ms": round(statistics.median(s), 3),
        "p95_ms": round(s[int(len(s) * 0.95) - 1], 3),
        "min_ms": round(s[0], 3),
        "mean_ms": round(statistics.fmean(s), 3),
        "runs": len(s),
    }


# A variant: (seccomp profile, in a user namespace of its own, spare holder made ahead).
Variant = tuple[str, bool, bool]
RANGES = IdRanges(base=1_000_000, size=65536, count=64)

# --phases: each phase ends at the first mark of its list that a start has (a trace
# step's name, spaces as underscores; "b:" marks are the bench's own).
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dirs, spec, cgroup create, request sent", ("request",)),
    ("spawner: decode, fork", ("fork",)),
    ("fork until the child runs", ("child",)),
    ("child: signals, dumpable, keyring, stdio", ("cgroup_join",)),
    ("child: cgroup join", ("unshare_namespaces",)),
    ("child: unshare, setsid, loopback, hostname, Ready", ("mount_rootfs",)),
    ("child: overlay root", ("mount_/dev",)),
    ("child: /dev", ("mount_/proc_and_/sys",)),
    ("child: /proc, /sys", ("mask_paths",)),
    ("child: masked and read-only paths", ("bind_mounts",)),
    ("child: bind mounts, pivot_root, stdio", ("capabilities",)),
    ("child: capabilities, user, no_new_privs, fds", ("seccomp",)),
    ("child: seccomp filters", ("execve",)),
    ("execve until the caller sees it", ("b:execd",)),
    ("rexec-init, /bin/true, exit, reaped", ("b:reaped",)),
    ("remove: cgroup, directories", ("b:removed",)),
)


def bench_rexecd(
    state: Path,
    run_dir: Path,
    runs: int,
    ephemeral: bool,
    variants: list[Variant],
    marks: dict[str, list[tuple[str, int]]] | None = None,
) -> dict[Variant, list[float]]:
    """``runs`` starts per variant, the variants taking turns run by run. With
    ``marks``, the bench's own marks of each counted start of the first variant go
    there, by container id."""
    store = ImageStore(state / "images")
    view = image_view(store, store.get("busybox:latest"))
    parent = f"rexecd-bench-{uuid.uuid4().hex[:6]}"
    drv = open_driver(parent)
    spawners = {spare: Spawner(spare_userns=spare) for spare in {v[2] for v in variants}}
    runtimes = {
        spare: Runtime(state, run_dir, drv, sp, userns=RANGES) for spare, sp in spawners.items()
    }
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    for p, _, spare in variants:
        runtimes[spare].seccomp.compiled(p)  # compiled once, as at daemon start-up
    try:
        for i in range(runs + 5):
            for profile, own_userns, spare in variants:
                rt, sp = runtimes[spare], spawners[spare]
                t0 = time.perf_counter()
                begin = time.monotonic_ns()
                cid = uuid.uuid4().hex * 2
                dirs = rt.dirs(cid, ephemeral=ephemeral)
                # As the daemon does: a leased range (the lease is a database row).
                rng = RANGES.range(i % RANGES.count) if own_userns else None
                rt.create_dirs(dirs, rng)
                spec = rt.build_spec(
                    cid, "bench", view, dirs, args=["/bin/true"], seccomp=profile, userns=rng
                )
                pid = rt.start(spec, CgroupLimits(memory_bytes=256 << 20, cpu_millicores=1000))
                execd = time.monotonic_ns()
                status = sp.wait(pid, timeout=10)
                reaped = time.monotonic_ns()
                rt.remove(cid, ephemeral=ephemeral)
                dt = (time.perf_counter() - t0) * 1000
                if status != 0:
                    raise SystemExit(f"rexecd run {i} ({profile}) exited {status}")
                if i >= 5:  # warm-up runs are not counted
                    times[(profile, own_userns, spare)].append(dt)
                    if marks is not None and (profile, own_userns, spare) == variants[0]:
                        marks[cid] = [
                            ("b:begin", begin),
                            ("b:execd", execd),
                            ("b:reaped", reaped),
                            ("b:removed", time.monotonic_ns()),
                        ]
    finally:
        for sp in spawners.values():
            sp.close()
        drv.remove_parent()
    return times


PEER_LOOP = r"""
import json, subprocess, sys, time
from rexecd import _native as n
# crun refuses hybrid hosts while /sys/fs/cgroup/unified lists controllers: hide it in
# this private mount namespace only (see shared/PEERS.md).
if sys.argv[3] == "hide-unified":
    n.mount("none", "/sys/fs/cgroup/unified", "tmpfs", 0, None)
tool, bundle, runs = sys.argv[1], sys.argv[2], int(sys.argv[4])
out = []
for i in range(runs + 5):
    t0 = time.perf_counter()
    r = subprocess.run([tool, "run", "--bundle", bundle, f"bench-{i}"],
                       stdin=subprocess.DEVNULL, capture_output=True)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        sys.exit(f"{tool} run {i}: {r.returncode} {r.stderr.decode()[-300:]}")
    if i >= 5:
        out.append(dt)
print(json.dumps(out))
"""


def make_bundle(tool: str, rootfs: Path, work: Path) -> Path:
    bundle = work / f"bundle-{tool}"
    bundle.mkdir()
    subprocess.run([tool, "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["root"] = {"path": str(rootfs), "readonly": True}
    cfg["process"]["args"] = ["/bin/true"]
    cfg["process"]["terminal"] = False
    cfg["hostname"] = "bench"
    # Absolute: a relative path nests the container under the caller's cgroup.
    cfg["linux"]["cgroupsPath"] = f"/rexecd-bench-{tool}-{uuid.uuid4().hex[:6]}"
    cfg["linux"]["resources"] = {
        "memory": {"limit": 256 << 20},
        "cpu": {"quota": 100000, "period": 100000},
    }
    if not any(ns["type"] == "cgroup" for ns in cfg["linux"]["namespaces"]):
        cfg["linux"]["namespaces"].append({"type": "cgroup"})
    (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


def bench_peer(tool: str, rootfs: Path, work: Path, runs: int) -> list[float] | str:
    exe = shutil.which(tool)
    if exe is None:
        return f"{tool} not installed (apt-get install {tool})"
    bundle = make_bundle(tool, rootfs, work)
    cgpath = json.loads((bundle / "config.json").read_text())["linux"]["cgroupsPath"]
    hide = "hide-unified" if tool == "crun" and Path("/sys/fs/cgroup/unified").is_dir() else "-"
    try:
        r = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                sys.executable,
                "-c",
                PEER_LOOP,
                exe,
                str(bundle),
                hide,
                str(runs),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        for ctrl in Path("/sys/fs/cgroup").iterdir():
            d = ctrl / cgpath.lstrip("/")
            if d.is_dir():
                for sub in sorted(d.rglob("*"), reverse=True):
                    if sub.is_dir():
                        sub.rmdir()
                d.rmdir()
    if r.returncode != 0:
        return f"{tool} failed: {r.stderr.strip()[-400:]}"
    times: list[float] = json.loads(r.stdout)
    return times


def phase_table(trace: Path, marks: dict[str, list[tuple[str, int]]]) -> dict[str, float]:
    """Median ms of each phase over the starts that both the trace and ``marks`` have."""
    spans: dict[str, list[float]] = {name: [] for name, _ in PHASES}
    spans["total"] = []
    for line in trace.read_text().splitlines():
        tag, *fields = line.split()
        if tag not in marks:
            continue
        at = dict(marks[tag])
        for field in fields:
            name, _, ns = field.rpartition("=")
            at.setdefault(name, int(ns))
        prev = at["b:begin"]
        for phase, ends in PHASES:
            end = next((at[e] for e in ends if e in at), None)
            if end is not None:
                spans[phase].append((end - prev) / 1e6)
                prev = end
        spans["total"].append((at["b:removed"] - at["b:begin"]) / 1e6)
    return {k: round(statistics.median(v), 3) for k, v in spans.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--image", default=str(ROOT / "build" / "test-images" / "busybox.tar"))
    ap.add_argument(
        "--seccomp-cost",
        action="store_true",
        help="also run rexecd unconfined, interleaved with the default seccomp profile",
    )
    ap.add_argument(
        "--userns-cost",
        action="store_true",
        help="also run rexecd with the default profile in a user namespace, and unconfined "
        "without one, interleaved",
    )
    ap.add_argument(
        "--phases",
        action="store_true",
        help="also print where the time of a start goes (a trace of each set-up step)",
    )
    args = ap.parse_args()
    variants: list[Variant] = [("default", False, True)]
    if args.seccomp_cost or args.userns_cost:
        variants.append(("unconfined", False, True))
    if args.userns_cost:
        variants += [("default", True, False), ("default", True, True)]
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    with tempfile.TemporaryDirectory(prefix="rexecd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        state, run_dir = work / "state", Path(tempfile.mkdtemp(prefix="rexecd-bench-", dir="/run"))
        try:
            store = ImageStore(state / "images")
            rec = store.import_archive(Path(args.image))
            rootfs = store.layer_paths(rec)[0]
            results: dict[str, object] = {}
            marks: dict[str, list[tuple[str, int]]] | None = None
            trace = work / "start.trace"
            if args.phases:
                marks = {}
                os.environ[TRACE_ENV] = str(trace)  # read by the spawners started next
            places = ((True, "upper on tmpfs, like --rm"), (False, "upper on the state disk"))
            for ephemeral, where in places:
                by_variant = bench_rexecd(
                    state, run_dir, args.runs, ephemeral, variants, marks if ephemeral else None
                )
                for (profile, own_userns, spare), times in by_variant.items():
                    label = "" if profile == "default" else f", seccomp {profile}"
                    if own_userns:
                        label += ", own userns" + ("" if spare else ", no spare")
                    results[f"rexecd ({where}{label})"] = times
            os.environ.pop(TRACE_ENV, None)
            phases = phase_table(trace, marks) if marks is not None else None
            for tool in ("crun", "runc"):
                results[f"{tool} run"] = bench_peer(tool, rootfs, work, args.runs)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    report: dict[str, object] = {"runs": args.runs, "kernel": os.uname().release}
    crun = results.get("crun run")
    base = statistics.median(crun) if isinstance(crun, list) else None
    print(f"{'runtime':58} {'median ms':>10} {'p95 ms':>10} {'vs crun':>8}")
    for name, val in results.items():
        if isinstance(val, str):
            print(f"{name:58} {val}")
            report[name] = {"error": val}
            continue
        s = summary(val)
        ratio = round(s["median_ms"] / base, 2) if base else None
        s["ratio_vs_crun"] = ratio if ratio is not None else float("nan")
        report[name] = s
        print(f"{name:58} {s['median_ms']:>10} {s['p95_ms']:>10} {ratio if ratio else '-':>8}")
    if phases is not None:
        print(f"\n{'phase of a start (upper on tmpfs, default profile)':58} {'median ms':>10}")
        for name, ms in phases.items():
            print(f"{name:58} {ms:>10}")
        report["phases_ms"] = phases
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "start_latency.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
