#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris/libFuzzer) of the image import path, for a bounded time.

Four targets share one input space; the first byte chooses:

0. a whole outer archive -> ``ImageStore.import_archive`` (tar, gzip or zstd; the
   digest checks stop most mutations early, which is what targets 2 and 3 are for);
1. a layer tar -> ``unpack_layer`` (the security boundary itself);
2. OCI documents ``index.json``, manifest, config and a layer tar, separated by
   ``SEP``: the harness builds the image layout around them and substitutes the real
   digests and sizes for the placeholders ``@M@ @MS@ @C@ @CS@ @L@ @LS@ @D@``, so that
   mutated JSON reaches the parsers past the digest checks;
3. docker-archive documents ``manifest.json``, config and a layer tar, the same way.

Invariants checked after every input (a violation is a finding: the input is saved
under ``--out`` with its traceback, and fuzzing goes on):

* the call returns or raises the project's own error (``RexecError``), nothing else;
* it returns within ``--input-timeout`` seconds (SIGALRM; libFuzzer's ``-timeout`` is
  the backstop for a hang outside Python);
* nothing outside the destination changes: a snapshot (names, types, modes, sizes,
  mtimes, link targets) of the temporary root around the store and the unpack
  destination, including the working directory, is compared after each input;
* a failed import leaves no layer, image record or temporary directory in the store;
* no file descriptor is leaked.

Run as root (the unpacker chowns as root does in the daemon):
    .venv/bin/python bench/fuzz_images.py --seconds 600 [--jobs 1]
Results: a summary on stdout and in bench/results/fuzz_images.json; findings in
bench/results/fuzz_images/. ``--replay FILE`` runs one saved input through the same
checks (for turning a finding into a test).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from hashlib import sha256
from pathlib import Path
from typing import Any

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Instrument the code under test (and the pure-Python tar reader it relies on) for
# coverage feedback; both must be imported first here.
with atheris.instrument_imports(include=["rexecd.runtime.images", "tarfile", "gzip"]):
    import tarfile

    from rexecd.errors import RexecError
    from rexecd.runtime.images import ImageStore
    from rexecd.runtime.images.unpack import unpack_layer

from tests.unit.fakes.images import (  # noqa: E402
    compress,
    dev,
    dir_,
    docker_archive,
    fifo,
    hard,
    layer,
    oci_archive,
    reg,
    sym,
)

SEP = b"\n%%\n"
TARGETS = ("archive", "layer", "oci-docs", "docker-docs")
RESULTS = ROOT / "bench" / "results"


class Timeout(Exception):
    """An input ran past --input-timeout."""


class Violation(Exception):
    """An invariant other than the exception type broke."""


# --- seeds ------------------------------------------------------------------------------


def _seed_layer() -> bytes:
    return layer(
        dir_("etc"),
        reg("etc/hello", b"hello\n", pax={"SCHILY.xattr.user.k": "v"}),
        reg("./bin/sh", b"\x7fELF", mode=0o4755, uid=1000, gid=1000),
        sym("lib", "usr/lib"),
        sym("etc/abs", "/etc/passwd"),
        hard("etc/hello2", "etc/hello"),
        fifo("run/fifo"),
        dev("dev/null"),
        reg("usr/.wh.gone"),
        reg("opt/.wh..wh..opq"),
        dir_("opt/x", mode=0o500),
        reg("a" * 120 + "/" + "b" * 120, b"long"),
    )


OCI_DOCS = [
    b'{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    b'"digest":"@M@","size":@MS@,"annotations":{"org.opencontainers.image.ref.name":"fuzz:1"}}]}',
    b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"@C@","size":@CS@},'
    b'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"@L@","size":@LS@}]}',
    b'{"os":"linux","architecture":"amd64","created":"2024-01-01T00:00:00Z",'
    b'"config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/","User":"1:1"},'
    b'"rootfs":{"type":"layers","diff_ids":["@D@"]}}',
]
DOCKER_DOCS = [
    b'[{"Config":"blobs/sha256/@CH@","RepoTags":["fuzz:2"],"Layers":["blobs/sha256/@LH@"]}]',
    OCI_DOCS[2],
]


def seeds() -> list[bytes]:
    lay = _seed_layer()
    small = layer(reg("x", b"x"))
    return [
        b"\x00" + oci_archive([lay], "gzip"),
        b"\x00" + oci_archive([small, lay], "zstd"),
        b"\x00" + docker_archive([lay], "tar", repo_tags=["fuzz:0"]),
        b"\x00" + compress(docker_archive([small], "gzip", repo_tags=["a/b:c"]), "gzip"),
        b"\x01" + lay,
        b"\x01" + small,
        b"\x02" + SEP.join([*OCI_DOCS, lay]),
        b"\x02" + SEP.join([*OCI_DOCS, small]),
        b"\x03" + SEP.join([*DOCKER_DOCS, lay]),
        b"\x03" + SEP.join([*DOCKER_DOCS, small]),
    ]


# --- building archives from documents -----------------------------------------------------


def _sub(doc: bytes, values: dict[bytes, bytes]) -> bytes:
    for k, v in values.items():
        doc = doc.replace(k, v)
    return doc


def _hex(data: bytes) -> bytes:
    return sha256(data).hexdigest().encode()


def _outer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _docs(data: bytes, n: int) -> list[bytes]:
    parts = data.split(SEP)
    parts += [b""] * (n - len(parts))
    return [*parts[: n - 1], SEP.join(parts[n - 1 :])]


def oci_from_docs(data: bytes) -> bytes:
    index, manifest, config, lay = _docs(data, 4)
    v = {b"@LH@": _hex(lay), b"@LS@": str(len(lay)).encode()}
    v[b"@L@"] = v[b"@D@"] = b"sha256:" + v[b"@LH@"]
    config = _sub(config, v)
    v |= {b"@CH@": _hex(config), b"@CS@": str(len(config)).encode()}
    v[b"@C@"] = b"sha256:" + v[b"@CH@"]
    manifest = _sub(manifest, v)
    v |= {b"@MS@": str(len(manifest)).encode(), b"@M@": b"sha256:" + _hex(manifest)}
    blobs = {f"blobs/sha256/{_hex(b).decode()}": b for b in (lay, config, manifest)}
    return _outer(
        {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": _sub(index, v), **blobs}
    )


def docker_from_docs(data: bytes) -> bytes:
    manifest, config, lay = _docs(data, 3)
    v = {b"@LH@": _hex(lay), b"@D@": b"sha256:" + _hex(lay)}
    config = _sub(config, v)
    v[b"@CH@"] = _hex(config)
    blobs = {f"blobs/sha256/{_hex(b).decode()}": b for b in (lay, config)}
    return _outer({"manifest.json": _sub(manifest, v), **blobs})


# --- the harness ----------------------------------------------------------------------------


def _snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*dirnames, *filenames]:
            p = here / name
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else None
            out[str(p)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_nlink, link)
    return out


def _clear(d: Path) -> None:
    for entry in os.scandir(d):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


class Harness:
    """One temporary root, reused for every input: store, unpack destination, bystanders."""

    def __init__(self, base: Path, timeout: float) -> None:
        self.base = base
        self.timeout = timeout
        self.store_root = base / "store"
        self.dest = base / "dest"
        self.dest.mkdir()
        self.store = ImageStore(self.store_root, durable=False)
        # Bystanders an escaping write would change: files, a directory, a symlink out.
        (base / "cwd").mkdir()
        (base / "outside").mkdir()
        (base / "outside" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (base / "outside" / "etc").symlink_to("/nonexistent-fuzz-target")
        os.chdir(base / "cwd")  # a relative-path bug lands here, in the snapshot
        self.skip = {self.store_root, self.dest}
        self.before = _snapshot(base, self.skip)
        self.fds = sorted(os.listdir("/proc/self/fd"))
        self.counts = dict.fromkeys(TARGETS, 0)
        self.outcomes: dict[str, int] = {}

    def _run(self, target: int, data: bytes) -> None:
        if target == 1:
            unpack_layer(io.BytesIO(data), self.dest, "fuzz layer")
            return
        if target == 0:
            arc = data
        elif target == 2:
            arc = oci_from_docs(data)
        else:
            arc = docker_from_docs(data)
        name = "fuzz:x" if len(data) % 3 == 0 else None  # also the name-override path
        self.store.import_archive(io.BytesIO(arc), name)

    def one(self, data: bytes) -> None:
        """Run one input; raise Timeout, Violation or the unexpected exception."""
        if not data:
            return
        target = data[0] % len(TARGETS)
        self.counts[TARGETS[target]] += 1
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        failed = False
        try:
            self._run(target, data[1:])
            self._tally("ok")
        except RexecError as e:
            failed = True
            self._tally(type(e).__name__)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._check(target, failed)

    def _tally(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def _check(self, target: int, failed: bool) -> None:
        try:
            if sorted(os.listdir("/proc/self/fd")) != self.fds:
                raise Violation(f"fd leak: {self.fds} -> {sorted(os.listdir('/proc/self/fd'))}")
            after = _snapshot(self.base, self.skip)
            if after != self.before:
                keys = after.keys() | self.before.keys()
                changed = sorted(k for k in keys if after.get(k) != self.before.get(k))
                raise Violation(f"written outside the destination: {changed[:5]}")
            if target != 1 and failed:
                dirs = [self.store_root / d for d in ("layers", "images", "tmp")]
                left = [p for d in dirs for p in d.iterdir()]
                if left:
                    raise Violation(f"failed import left {left[:3]}")
        finally:
            for d in ("layers", "images", "tmp"):
                _clear(self.store_root / d)
            _clear(self.dest)
            os.chmod(self.dest, 0o755)


def _on_alarm(_sig: int, _frame: Any) -> None:
    raise Timeout("input ran past the per-input bound")


def _signature(exc: BaseException) -> str:
    """One finding per exception type and the line that raised it, however many inputs
    reach it: ``ValueError@tarfile.py:1545``."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
    return f"{type(exc).__name__}@{where}"


def _record(out: Path, data: bytes, exc: BaseException, seen: dict[str, Any]) -> None:
    """Keep the first (and the smallest) input of each signature, and a count."""
    sig = _signature(exc)
    entry = seen.setdefault(sig, {"count": 0, "size": None, "message": ""})
    entry["count"] += 1
    if entry["size"] is not None and len(data) >= entry["size"]:
        return
    entry["size"] = len(data)
    entry["message"] = f"{type(exc).__name__}: {exc}"[:300]
    out.mkdir(parents=True, exist_ok=True)
    key = sig.replace("@", "-").replace(":", "-")
    (out / f"{key}.bin").write_bytes(data)
    (out / f"{key}.txt").write_text("".join(traceback.format_exception(exc)))
    print(f"FINDING {sig} ({len(data)} bytes): {entry['message']}", file=sys.stderr, flush=True)


def worker(args: argparse.Namespace) -> None:
    """Run inside the libFuzzer process: fuzz until -max_total_time, then write stats."""
    signal.signal(signal.SIGALRM, _on_alarm)
    base = Path(tempfile.mkdtemp(prefix="rexecd-fuzz-"))
    h = Harness(base, args.input_timeout)
    findings: dict[str, Any] = {}
    started = time.monotonic()
    last = [started]
    stats_file = Path(args.stats)

    def dump() -> None:
        stats = {
            "executions": sum(h.counts.values()),
            "per_target": h.counts,
            "outcomes": h.outcomes,
            "findings": findings,
            "seconds": round(time.monotonic() - started, 1),
        }
        tmp = stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.rename(stats_file)  # the parent may read it at any time

    def test_one(data: bytes) -> None:
        try:
            h.one(data)
        except Exception as e:  # every other exception is a finding
            _record(Path(args.out), data, e, findings)
        if time.monotonic() - last[0] > 2:
            last[0] = time.monotonic()
            dump()

    corpus = Path(args.corpus)
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds()):
        (corpus / f"seed-{i}").write_bytes(s)
    fuzz_args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={args.seconds}",
        f"-timeout={max(60, int(args.input_timeout * 4))}",
        "-max_len=65536",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    import atexit

    atexit.register(dump)
    atheris.Setup(fuzz_args, test_one)
    try:
        atheris.Fuzz()
    finally:
        dump()
        shutil.rmtree(base, ignore_errors=True)


def replay(path: Path, timeout: float) -> int:
    """Run one saved input through the harness; 0 when every invariant holds."""
    signal.signal(signal.SIGALRM, _on_alarm)
    base = Path(tempfile.mkdtemp(prefix="rexecd-fuzz-"))
    try:
        Harness(base, timeout).one(path.read_bytes())
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        os.chdir("/")
        shutil.rmtree(base, ignore_errors=True)
    print("ok")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="total fuzzing time")
    ap.add_argument("--jobs", type=int, default=1, help="parallel fuzzing processes")
    ap.add_argument("--input-timeout", type=float, default=10.0, help="bound per input (s)")
    ap.add_argument("--out", default=str(RESULTS / "fuzz_images"), help="findings directory")
    ap.add_argument("--corpus", default=None, help="corpus directory (kept between runs)")
    ap.add_argument("--replay", type=Path, help="check one saved input and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replay:
        return replay(args.replay, args.input_timeout)
    if args.worker:
        worker(args)
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or str(RESULTS / "fuzz_images_corpus")
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    for j in range(args.jobs):
        stats = RESULTS / f"fuzz_images.stats.{j}.json"
        log = RESULTS / f"fuzz_images.{j}.log"
        cmd = [sys.executable, __file__, "--worker", "--seconds", str(args.seconds)]
        cmd += ["--input-timeout", str(args.input_timeout), "--out", args.out]
        cmd += ["--corpus", corpus, "--stats", str(stats)]
        with log.open("wb") as logf:
            procs.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), stats, log))
    bound = args.seconds + 120
    # "executions" is what the harness counted up to its last stats dump; libFuzzer's
    # own final count ("libfuzzer_runs") is the exact one.
    total: dict[str, Any] = {"executions": 0, "findings": {}, "per_target": {}, "outcomes": {}}
    rc = 0
    for p, stats, log in procs:
        try:
            p.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            total["findings"][f"hang-{p.pid}"] = {"message": "fuzzer ran past its bound"}
        text = log.read_text(errors="replace")
        if m := re.search(r"Done (\d+) runs in (\d+) second", text):
            print(f"worker {p.pid}: libFuzzer: {m.group(0)}")
            total["libfuzzer_runs"] = total.get("libfuzzer_runs", 0) + int(m.group(1))
        if p.returncode not in (0, None):
            total["findings"][f"exit-{p.pid}"] = {"message": f"exited {p.returncode}; see {log}"}
        if stats.exists():
            s = json.loads(stats.read_text())
            total["executions"] += s["executions"]
            for sig, f in s["findings"].items():
                mine = total["findings"].setdefault(sig, {**f, "count": 0})
                mine["count"] += f["count"]
            for key in ("per_target", "outcomes"):
                for k, v in s[key].items():
                    total[key][k] = total[key].get(k, 0) + v
    total["seconds"] = args.seconds
    total["jobs"] = args.jobs
    (RESULTS / "fuzz_images.json").write_text(json.dumps(total, indent=1))
    print(json.dumps(total, indent=1))
    if total["findings"]:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
