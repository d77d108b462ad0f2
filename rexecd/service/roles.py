"""Roles that install, built once: the (base image, role) cache key, the install script,
and the build container that runs it for the first container of a pair.

A role (images/roles/*.yaml) lists packages per package manager and optional setup
steps. The first create of an (image, role) pair runs the install in a build container:
the new container's own identity, volume, cgroup limits and network shaping, but none
of its request (no environment, no /home/user), as root, with a shell script made
only from the role's definition and the daemon's mirrors. Its output goes, appended, to
``<state_dir>/logs/<container id>.log`` and as lines of the ``configuring`` stage.
What the install left in the overlay upper directory goes through the safe unpacker
into the image store as a layer (see runtime/images/diff.py), recorded under the
pair's key: ``sha256`` of the base image's digest and layers and of the role's install
definition. Later containers of the pair start from the cached layer with no install.

What a tenant can and cannot steer: the user picks an image and a role, nothing of the
script; the key names the exact base content and role definition, so a build only
ever serves creates of that same pair. A hostile base image runs its own package
manager inside the build, under the limits of the container that asked, and its result
is only ever used with that same base. Concurrent creates of a pair wait for one build.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rexecd.config import Config, RoleConfig
from rexecd.errors import RoleInstallFailed
from rexecd.models import ContainerRecord
from rexecd.runtime.container import ImageView, Runtime
from rexecd.runtime.images import ImageRecord, ImageStore
from rexecd.runtime.images.diff import write_diff
from rexecd.service.cancel import CancelToken
from rexecd.service.exits import ProcessExits
from rexecd.service.homes import Homes
from rexecd.service.lifecycle import Lifecycle, Started
from rexecd.service.limits import CgroupPolicy
from rexecd.service.oneshot import image_view
from rexecd.service.progress import Reporter
from rexecd.service.publisher import Publisher
from rexecd.service.records import Records
from rexecd.service.states import State

log = logging.getLogger(__name__)

# Bumped when the script changes what an install produces: old builds are not reused.
SCRIPT_VERSION = 1
# Written into the upper dir for each container by the daemon, never part of a role.
EXCLUDED = ("etc/hosts", "etc/resolv.conf")
# The share of a create's progress (0-100) the install takes.
ROLE_FROM, ROLE_TO = 40, 58
LOG_TAIL_BYTES = 2000
# Progress frames from install output: at most this often.
FRAME_EVERY_S = 0.25
# How long the output pipe may stay open once the build's processes are gone.
DRAIN_S = 5.0
NO_MANAGER_STATUS = 78  # EX_CONFIG: the image does not fit the role
# The build container's name inside: nothing of the container that asked for it.
BUILD_HOSTNAME = "rexecd-build"


def installs_nothing(role: RoleConfig) -> bool:
    """A role that adds nothing (``barebone``): its containers use the image as it is."""
    return not any(role.install.values()) and not role.setup


def role_key(
    base: ImageRecord, role: RoleConfig, mirrors: Mapping[Any, list[str]] | None = None
) -> str:
    """The cache key of ``role`` installed on ``base``: what the install depends on,
    the package mirrors included. A layer built through a mirror an admin has since
    replaced (a broken or compromised one) is then never served again: the next create
    builds afresh through the new one."""
    used = {m: list((mirrors or {}).get(_MIRROR_OF.get(m, m)) or []) for m in role.install}
    doc: dict[str, object] = {
        "v": SCRIPT_VERSION,
        "base": {"digest": base.digest, "layers": base.layers},
        "role": {
            "id": role.id,
            "install": {m: role.install[m] for m in sorted(role.install)},
            "setup": role.setup,
        },
    }
    # Only when some apply: keys built without mirrors stay what they were.
    if through := {m: used[m] for m in sorted(used) if used[m]}:
        doc["mirrors"] = through
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


# --- the install script ----------------------------------------------------------------


def _lines_to(path: str, lines: list[str]) -> str:
    return f"printf '%s\\n' {' '.join(shlex.quote(x) for x in lines)} > {path}"


def _apt(pkgs: str, mirror: list[str] | None) -> list[str]:
    # Lists and downloaded .debs live in the temporary dir, so the layer carries neither.
    out = [
        "export DEBIAN_FRONTEND=noninteractive",
        'mkdir -p "$t/lists/partial" "$t/archives/partial"',
        # No fsync per file: a failed build is thrown away whole, never half used.
        'set -- -o "Dir::State::Lists=$t/lists" -o "Dir::Cache::Archives=$t/archives" '
        "-o APT::Sandbox::User=root -o Acquire::Languages=none "
        "-o Dpkg::Options::=--force-unsafe-io",
    ]
    if mirror:
        out += [
            _lines_to('"$t/sources.list"', mirror),
            'set -- "$@" -o "Dir::Etc::SourceList=$t/sources.list" '
            '-o "Dir::Etc::SourceParts=$t/none"',
        ]
    # No service starts during the install: there is no init system to stop it again.
    out += [
        "if [ ! -e /usr/sbin/policy-rc.d ]; then",
        "  printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d",
        "  chmod 755 /usr/sbin/policy-rc.d; rc_made=1",
        "fi",
        'apt-get "$@" update',
        f'apt-get "$@" install -y --no-install-recommends {pkgs}',
        'if [ -n "${rc_made:-}" ]; then rm -f /usr/sbin/policy-rc.d; fi',
    ]
    return out


def _apk(pkgs: str, mirror: list[str] | None) -> list[str]:
    if mirror:
        return [
            _lines_to('"$t/repositories"', mirror),
            f'apk add --no-cache --repositories-file "$t/repositories" {pkgs}',
        ]
    return [f"apk add --no-cache {pkgs}"]


def _dnf(tool: str, pkgs: str, mirror: list[str] | None) -> list[str]:
    opts = "-y --setopt=install_weak_deps=False"
    out = []
    if mirror:
        out += ['mkdir "$t/repos"', _lines_to('"$t/repos/rexecd.repo"', mirror)]
        opts += ' --setopt=reposdir="$t/repos"'
    return [*out, f"{tool} {opts} install {pkgs}", f"{tool} clean all"]


def _pacman(pkgs: str, mirror: list[str] | None) -> list[str]:
    out = []
    conf = ""
    if mirror:
        out += [
            _lines_to('"$t/mirrorlist"', mirror),
            'sed "s|/etc/pacman.d/mirrorlist|$t/mirrorlist|" /etc/pacman.conf > "$t/pacman.conf"',
        ]
        conf = ' --config "$t/pacman.conf"'
    return [*out, f"pacman{conf} -Sy --noconfirm --needed {pkgs}", "pacman -Scc --noconfirm"]


def _zypper(pkgs: str, _mirror: list[str] | None) -> list[str]:
    return [f"zypper --non-interactive install --no-recommends {pkgs}", "zypper clean --all"]


# Package manager -> (the command that shows it is there, how its packages install).
_MANAGERS: dict[str, tuple[str, Callable[[str, list[str] | None], list[str]]]] = {
    "apt": ("apt-get", _apt),
    "apk": ("apk", _apk),
    "dnf": ("dnf", lambda p, m: _dnf("dnf", p, m)),
    "yum": ("yum", lambda p, m: _dnf("yum", p, m)),
    "pacman": ("pacman", _pacman),
    "zypper": ("zypper", _zypper),
}
# yum reads dnf's repo format.
_MIRROR_OF = {"yum": "dnf"}


def install_script(role: RoleConfig, mirrors: Mapping[Any, list[str]]) -> str:
    """The POSIX shell script that installs ``role`` with whichever of its package
    managers the image has (the first, in apt, apk, dnf, yum, pacman, zypper order),
    then runs its setup steps. Exits NO_MANAGER_STATUS when the image has none."""
    lines = [
        "set -eu",
        f"echo 'rexecd: installing role {role.id}'",
        "t=$(mktemp -d /tmp/rexecd-role.XXXXXX)",
        "trap 'rm -rf \"$t\"' EXIT",
    ]
    install: dict[str, list[str]] = {m: p for m, p in role.install.items() if p}
    branches = []
    for manager, (probe, make) in _MANAGERS.items():
        if manager not in install:
            continue
        mirror = mirrors.get(_MIRROR_OF.get(manager, manager))
        body = make(" ".join(shlex.quote(p) for p in install[manager]), mirror)
        cond = f"command -v {probe} >/dev/null 2>&1"
        branches.append((cond, [f"echo 'rexecd: using {manager}'", *body]))
    if branches:
        for i, (cond, body) in enumerate(branches):
            lines.append(f"{'if' if i == 0 else 'elif'} {cond}; then")
            lines += [f"  {b}" for b in body]
        known = ", ".join(m for m in _MANAGERS if m in install)
        lines += [
            "else",
            f"  echo 'rexecd: the image has none of the package managers role {role.id} "
            f"installs with ({known})' >&2",
            f"  exit {NO_MANAGER_STATUS}",
            "fi",
        ]
    for step in role.setup:
        lines.append(step)
    lines.append(f"echo 'rexecd: role {role.id} installed'")
    return "\n".join(lines) + "\n"


# --- the build ---------------------------------------------------------------------------


class RoleBuilds:
    """The manager's role side: the cached layer of a pair, or the one build making it."""

    def __init__(
        self,
        cfg: Config,
        runtime: Runtime,
        images: ImageStore,
        records: Records,
        publisher: Publisher,
        lifecycle: Lifecycle,
        homes: Homes,
        policy: CgroupPolicy,
        exits: ProcessExits,
    ) -> None:
        self.cfg, self.runtime, self.images = cfg, runtime, images
        self.records, self.publisher, self.lifecycle = records, publisher, lifecycle
        self.homes, self.policy, self.exits = homes, policy, exits
        # Builds in progress, by cache key: their lock and how many creates wait.
        self._builds: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def _role_of(self, rec: ContainerRecord) -> RoleConfig | None:
        for role in self.cfg.roles:
            if role.id == rec.role:
                return role
        return None

    def log_path(self, cid: str) -> Path:
        """The container's log: what its role install printed (``rexec logs`` reads it)."""
        return self.runtime.state_dir / "logs" / f"{cid}.log"

    async def with_role(
        self,
        rec: ContainerRecord,
        base: ImageRecord,
        report: Reporter,
        token: CancelToken | None = None,
    ) -> ImageRecord:
        """The image ``rec`` starts from: ``base`` with its role's layer, built now if
        no earlier container of the pair built it (one build per pair at a time).

        A cancelled ``token`` (the container deleted) stops the wait for another
        create's build at once, and its own build by killing the build container's
        processes: CreateCancelled, nothing of the build left. When the builder of a
        pair is cancelled, the next create waiting for that pair builds instead."""
        token = token or CancelToken()
        role = self._role_of(rec)
        if role is None or installs_nothing(role):
            return base
        key = role_key(base, role, self.cfg.packages.mirrors)
        cached = await asyncio.to_thread(self.images.role_image, key)
        if cached is not None:
            await self._role_progress(
                rec, report, f"role {role.id}: cached layer, nothing to install", ROLE_TO
            )
            return cached
        entry = self._builds.setdefault(key, (asyncio.Lock(), [0]))
        lock, users = entry
        users[0] += 1
        try:
            await token.race(lock.acquire())
            try:
                cached = await asyncio.to_thread(self.images.role_image, key)
                if cached is not None:
                    await self._role_progress(
                        rec, report, f"role {role.id}: installed by another create", ROLE_TO
                    )
                    return cached
                token.check()
                return await self._build(rec, base, role, key, report, token)
            finally:
                lock.release()
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._builds.pop(key, None)

    async def _build(
        self,
        rec: ContainerRecord,
        base: ImageRecord,
        role: RoleConfig,
        key: str,
        report: Reporter,
        token: CancelToken,
    ) -> ImageRecord:
        self.policy.require()
        rec = await self.records.move(rec.db_id, State.CONFIGURING)
        self.publisher.publish("updated", rec)
        await self._role_progress(
            rec, report, f"role {role.id}: installing on {base.ref} (first use)", ROLE_FROM
        )
        started = time.monotonic()
        script = install_script(role, self.cfg.packages.mirrors)
        logs = self.log_path(rec.id)
        await asyncio.to_thread(logs.parent.mkdir, mode=0o700, exist_ok=True)
        view = await asyncio.to_thread(image_view, self.images, base)
        st = Started()
        try:
            status, tail = await self._run_build(rec, role, view, st, script, logs, report, token)
            # Before the status: a build killed for a delete is cancelled, not failed.
            token.check()
            if status != 0:
                why = "did not finish" if status is None else f"failed (exit status {status})"
                raise RoleInstallFailed(
                    f"role {role.id}: install {why}; the end of its log:\n{tail}",
                    role=role.id,
                    exit_status=status,
                )
            assert st.dirs is not None
            upper = st.dirs.upper
            await self._role_progress(
                rec, report, f"role {role.id}: saving the installed layer", ROLE_TO - 2
            )
            ids = st.rng
            image = await asyncio.to_thread(
                self.images.add_role_layer,
                key,
                base,
                lambda out: write_diff(upper, out, EXCLUDED, ids),
            )
        finally:
            # The container itself starts on a fresh upper dir over the cached layer.
            await asyncio.to_thread(self.homes.wipe_root, rec)
        took = time.monotonic() - started
        log.info("role %s on %s built in %.1fs (%s)", role.id, base.ref, took, rec.id[:12])
        await self._role_progress(rec, report, f"role {role.id}: installed in {took:.1f}s", ROLE_TO)
        return image

    async def _run_build(
        self,
        rec: ContainerRecord,
        role: RoleConfig,
        view: ImageView,
        st: Started,
        script: str,
        logs: Path,
        report: Reporter,
        token: CancelToken,
    ) -> tuple[int | None, str]:
        """Run the install script in ``rec``'s build container until it exits (status,
        None if it did not finish in time) with the tail of its output; everything of
        the build but its upper dir (still on the mounted volume) is gone after."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                await self.lifecycle.start_init(
                    rec,
                    view,
                    st,
                    env=["LANG=C.UTF-8"],
                    args=["/bin/sh", "-c", script],
                    user="0",
                    stdio=[null, wfd, wfd],
                    home=False,
                    network="default",
                    hostname=BUILD_HOSTNAME,
                    token=token,
                )
            finally:
                os.close(null)
                os.close(wfd)
            return await self._follow(rec, role, st.pid, rfd, logs, report, token)
        finally:
            # Whatever the install left running (a daemon a package started) goes too.
            await asyncio.to_thread(self.runtime.kill_cgroup, rec.id)
            # Its run goes; its id range and mounted volume (the upper dir) stay.
            await asyncio.to_thread(st.undo.run, keep_data=True)
            with contextlib.suppress(OSError):
                os.close(rfd)

    async def _follow(
        self,
        rec: ContainerRecord,
        role: RoleConfig,
        pid: int,
        rfd: int,
        logs: Path,
        report: Reporter,
        token: CancelToken,
    ) -> tuple[int | None, str]:
        """Copy the build's output to its log (appended, capped) and to ``configuring``
        frames until it exits; its status (None: timed out) and the log's tail. A
        cancelled ``token`` kills the build's processes, so it exits at once."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(rfd), "rb", buffering=0)
        )
        cap = self.cfg.packages.log_max_bytes
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        logfd = await asyncio.to_thread(os.open, logs, flags, 0o600)
        tail = bytearray()
        written = 0

        async def pump() -> None:
            nonlocal written
            last = 0.0
            while chunk := await reader.read(1 << 16):
                tail.extend(chunk)
                del tail[:-LOG_TAIL_BYTES]
                if written < cap:
                    part = chunk[: cap - written]
                    written += len(part)
                    os.write(logfd, part)
                    if written >= cap:
                        os.write(logfd, b"\n[rexecd: log truncated]\n")
                now = time.monotonic()
                line = _last_line(chunk)
                if line and now - last >= FRAME_EVERY_S:
                    last = now
                    await self._role_progress(rec, report, f"role {role.id}: {line}", ROLE_FROM + 2)

        pumping = asyncio.ensure_future(pump())
        try:
            status = await token.cut_short(
                self.exits.wait(pid, float(self.cfg.packages.install_timeout_s)),
                lambda: asyncio.to_thread(self.runtime.kill_cgroup, rec.id),
            )
            # Whatever the install left running holds the pipe open: stop it.
            await asyncio.to_thread(self.runtime.kill_cgroup, rec.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pumping), DRAIN_S)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
            transport.close()
            os.close(logfd)
        return status, tail.decode("utf-8", "replace").strip()

    async def _role_progress(
        self, rec: ContainerRecord, report: Reporter, message: str, pct: int
    ) -> None:
        await self.publisher.stage(rec, report, "configuring", message, pct)


def _last_line(chunk: bytes) -> str:
    """The last non-empty line of ``chunk``, printable characters only: frames reach
    terminals (``rexec create --progress``), where an escape sequence would act."""
    for raw in reversed(chunk.splitlines()):
        line = "".join(ch for ch in raw.decode("utf-8", "replace") if ch.isprintable())
        if line.strip():
            return line.strip()[:200]
    return ""
