"""Seccomp profiles of container processes: loading, validating and compiling them to BPF.

A profile is named by a tier's ``seccomp`` config key: ``default`` (the packaged
``seccomp_default.yaml``), ``unconfined`` (no filter), or the absolute path of a JSON
or YAML file in the OCI ``linux.seccomp`` format (a subset: ``defaultAction``,
``defaultErrnoRet`` and ``syscalls`` with ``names``, ``action``, ``errnoRet`` and
``args``). Each profile is compiled once per process with libseccomp, for the native
architecture only; the spawner's child installs the programs last before ``execve``
(``child.py``), so this module runs on the daemon side only and never in a spawner.

A profile becomes one or two BPF programs. Rules that are not allows and have argument
conditions go to a second program whose default is to allow: filters stack and the
kernel takes the strictest answer (and, between two errnos, the later filter's), so
such a rule wins over an allow of the same syscall. libseccomp alone cannot say
"allow ioctl except TIOCSTI": an unconditional allow swallows the conditional refusal.
"""

from __future__ import annotations

import base64
import errno
import json
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rexecd import _native as n
from rexecd.config import ConfigError, _format_errors

DEFAULT = "default"
UNCONFINED = "unconfined"
_DEFAULT_RESOURCE = "seccomp_default.yaml"

Action = Literal[
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_LOG",
]
Op = Literal[
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
]
_OPS: dict[str, int] = {
    "SCMP_CMP_NE": n.SCMP_CMP_NE,
    "SCMP_CMP_LT": n.SCMP_CMP_LT,
    "SCMP_CMP_LE": n.SCMP_CMP_LE,
    "SCMP_CMP_EQ": n.SCMP_CMP_EQ,
    "SCMP_CMP_GE": n.SCMP_CMP_GE,
    "SCMP_CMP_GT": n.SCMP_CMP_GT,
    "SCMP_CMP_MASKED_EQ": n.SCMP_CMP_MASKED_EQ,
}
_U64 = (1 << 64) - 1


class _Strict(BaseModel):
    """A part of a profile; field names are the OCI format's own (camelCase)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ArgCondition(_Strict):
    """One comparison of a syscall argument; for MASKED_EQ ``value`` is the mask and
    ``valueTwo`` what the masked argument must equal (OCI's meaning)."""

    index: int = Field(ge=0, le=5)
    op: Op
    value: int = Field(ge=0, le=_U64)
    valueTwo: int = Field(default=0, ge=0, le=_U64)


class SyscallRule(_Strict):
    names: list[str] = Field(min_length=1)
    action: Action
    errnoRet: int | None = Field(default=None, ge=1, le=4095)
    args: list[ArgCondition] = Field(default_factory=list, max_length=6)
    comment: str = ""

    @model_validator(mode="after")
    def _check(self) -> SyscallRule:
        if self.errnoRet is not None and self.action != "SCMP_ACT_ERRNO":
            raise ValueError(f"errnoRet is only for SCMP_ACT_ERRNO, not {self.action}")
        indexes = [a.index for a in self.args]
        if len(set(indexes)) != len(indexes):
            raise ValueError("each argument may be compared once in a rule")
        return self

    @property
    def overrides(self) -> bool:
        """A refusal with conditions: compiled into the second (stacked) program."""
        return bool(self.args) and self.action != "SCMP_ACT_ALLOW"


class Profile(_Strict):
    defaultAction: Action
    defaultErrnoRet: int | None = Field(default=None, ge=1, le=4095)
    syscalls: list[SyscallRule] = Field(default_factory=list)
    comment: str = ""

    @model_validator(mode="after")
    def _check(self) -> Profile:
        if self.defaultAction == "SCMP_ACT_ALLOW":
            # Stacking relies on the first program refusing what no rule names.
            raise ValueError("defaultAction SCMP_ACT_ALLOW: use the profile 'unconfined'")
        if self.defaultErrnoRet is not None and self.defaultAction != "SCMP_ACT_ERRNO":
            raise ValueError("defaultErrnoRet is only for defaultAction SCMP_ACT_ERRNO")
        # libseccomp keeps an unconditional rule and silently drops every conditional
        # one of the same syscall in the same program: refuse what would be lost.
        plain: dict[str, str] = {}
        conditional: set[str] = set()
        for rule in self.syscalls:
            for name in rule.names:
                if not rule.args:
                    if name in plain:
                        raise ValueError(f"syscall {name!r} has two rules without conditions")
                    plain[name] = rule.action
                elif not rule.overrides:
                    conditional.add(name)
        hidden = sorted(conditional & set(plain))
        if hidden:
            raise ValueError(
                f"syscalls {hidden} have a rule without conditions, which would hide "
                "their allow rules with conditions"
            )
        return self


def _action(action: str, err: int | None) -> int:
    if action == "SCMP_ACT_ERRNO":
        return n.scmp_act_errno(err if err is not None else errno.EPERM)
    return {
        "SCMP_ACT_ALLOW": n.SCMP_ACT_ALLOW,
        "SCMP_ACT_KILL": n.SCMP_ACT_KILL_THREAD,
        "SCMP_ACT_KILL_THREAD": n.SCMP_ACT_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS": n.SCMP_ACT_KILL_PROCESS,
        "SCMP_ACT_TRAP": n.SCMP_ACT_TRAP,
        "SCMP_ACT_LOG": n.SCMP_ACT_LOG,
    }[action]


@dataclass(frozen=True)
class Compiled:
    """A profile's BPF programs, in the order they are installed, and the syscall
    names this libseccomp does not know (left out: they meet the default action)."""

    programs: tuple[bytes, ...]
    unknown: tuple[str, ...]

    def encoded(self) -> list[str]:
        """The programs as a process spec carries them (base64, JSON-safe)."""
        return [base64.b64encode(p).decode() for p in self.programs]


def _filters(profile: Profile) -> tuple[n.ScmpFilter, n.ScmpFilter | None, list[str]]:
    default = _action(profile.defaultAction, profile.defaultErrnoRet)
    main = n.ScmpFilter(default, n.SCMP_ACT_KILL_PROCESS)
    extra: n.ScmpFilter | None = None
    unknown: list[str] = []
    try:
        for rule in profile.syscalls:
            if rule.overrides and extra is None:
                extra = n.ScmpFilter(n.SCMP_ACT_ALLOW, n.SCMP_ACT_KILL_PROCESS)
            target = extra if rule.overrides and extra is not None else main
            action = _action(rule.action, rule.errnoRet)
            if target is main and action == default:
                # What the default does anyway (clone3's ENOSYS): libseccomp refuses
                # such a rule, and it would change nothing.
                continue
            conds = [(a.index, _OPS[a.op], a.value, a.valueTwo) for a in rule.args]
            for name in rule.names:
                nr = n.scmp_resolve(name)
                if nr is None:
                    if name not in unknown:
                        unknown.append(name)
                    continue
                target.add_rule(action, nr, conds)
    except BaseException:
        main.close()
        if extra is not None:
            extra.close()
        raise
    return main, extra, unknown


def compile_profile(profile: Profile) -> Compiled:
    """BPF for ``profile`` on this machine's architecture (no kernel call is made)."""
    main, extra, unknown = _filters(profile)
    with main:
        programs = [main.export_bpf()]
        if extra is not None:
            with extra:
                programs.append(extra.export_bpf())
    return Compiled(tuple(programs), tuple(unknown))


def pseudo_code(profile: Profile) -> str:
    """libseccomp's readable listing of the programs ``compile_profile`` makes."""
    main, extra, _unknown = _filters(profile)
    parts = []
    with main:
        parts.append(main.export_pfc())
    if extra is not None:
        with extra:
            parts.append("# second filter, stacked: its refusals win\n" + extra.export_pfc())
    return "\n".join(parts)


def load_profile(ref: str) -> Profile | None:
    """The profile ``ref`` names; None for ``unconfined``. Raises ConfigError saying
    what is wrong with a file."""
    if ref == UNCONFINED:
        return None
    if ref == DEFAULT:
        origin = f"the default profile ({_DEFAULT_RESOURCE})"
        text = resources.files("rexecd.runtime").joinpath(_DEFAULT_RESOURCE).read_text("utf-8")
    else:
        path = Path(ref)
        origin = ref
        if not path.is_absolute():
            raise ConfigError(
                f"seccomp profile {ref!r}: must be default, unconfined or an absolute path"
            )
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"seccomp profile {ref}: cannot read: {exc}") from None
    try:
        data: Any = json.loads(text) if ref.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"seccomp profile {origin}: not valid JSON/YAML: {exc}") from None
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"seccomp profile {origin}: {_format_errors(exc)}") from None


class SeccompFilters:
    """Compiled filters by profile name, each profile compiled once; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Compiled, list[str]]] = {}

    def compiled(self, ref: str) -> Compiled:
        """The compiled profile ``ref`` (no programs for ``unconfined``)."""
        return self._get(ref)[0]

    def programs(self, ref: str) -> list[str]:
        """What a process spec carries for profile ``ref``: base64 BPF programs."""
        return list(self._get(ref)[1])

    def _get(self, ref: str) -> tuple[Compiled, list[str]]:
        with self._lock:
            hit = self._cache.get(ref)
            if hit is None:
                profile = load_profile(ref)
                compiled = Compiled((), ()) if profile is None else compile_profile(profile)
                hit = self._cache[ref] = (compiled, compiled.encoded())
            return hit


def describe(ref: str, filters: SeccompFilters | None = None) -> dict[str, Any]:
    """What a process under profile ``ref`` gets, as JSON-ready data: its rules (a
    profile document, reusable as a custom profile), the size of each compiled program
    and the names left out because this libseccomp does not know them."""
    profile = load_profile(ref)
    compiled = (filters or SeccompFilters()).compiled(ref)
    return {
        "profile": ref,
        "programs": [{"instructions": len(p) // 8} for p in compiled.programs],
        "unknown_syscalls": list(compiled.unknown),
        "rules": None if profile is None else profile.model_dump(exclude_defaults=True),
    }
