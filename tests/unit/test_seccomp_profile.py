"""Seccomp profiles as data: the default profile's rules, loading and validating custom
profiles, compiling them (libseccomp, in user space only), the tier config key and
``rexecd seccomp show``. The kernel's answers are tested in tests/integration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rexecd import _native as n
from rexecd.cli import main as rexecd_main
from rexecd.config import Config, ConfigError, TierLimits
from rexecd.runtime import seccomp
from rexecd.runtime.spec import ProcessSpec
from tests.seccomp_expect import REFUSED_WITH_EPERM

MASK32 = 0xFFFFFFFF
NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)


def _default() -> seccomp.Profile:
    profile = seccomp.load_profile("default")
    assert profile is not None
    return profile


def _plain(profile: seccomp.Profile) -> dict[str, seccomp.SyscallRule]:
    """Rules without conditions, by syscall name."""
    return {name: r for r in profile.syscalls if not r.args for name in r.names}


def _conditional(profile: seccomp.Profile, name: str) -> list[seccomp.SyscallRule]:
    return [r for r in profile.syscalls if r.args and name in r.names]


def test_default_refuses_the_dangerous_syscalls_with_eperm() -> None:
    plain = _plain(_default())
    for name in REFUSED_WITH_EPERM:
        rule = plain[name]
        assert (rule.action, rule.errnoRet) == ("SCMP_ACT_ERRNO", 1), name
    assert (plain["clone3"].action, plain["clone3"].errnoRet) == ("SCMP_ACT_ERRNO", 38)
    for name in ("execve", "execveat", "clone", "ioctl", "socket", "seccomp", "prctl"):
        assert plain[name].action == "SCMP_ACT_ALLOW", name
    default = _default()
    assert (default.defaultAction, default.defaultErrnoRet) == ("SCMP_ACT_ERRNO", 38)


def _refused_values(profile: seccomp.Profile, name: str, index: int) -> dict[int, int]:
    """``{datum: errno}`` of the masked refusals of argument ``index`` of ``name``."""
    out = {}
    for rule in _conditional(profile, name):
        if rule.action != "SCMP_ACT_ERRNO":
            continue
        (cond,) = rule.args
        assert cond.index == index and cond.op == "SCMP_CMP_MASKED_EQ"
        out[cond.valueTwo] = (cond.value, rule.errnoRet)
    return out


def test_default_ioctl_refusals_compare_the_low_32_bits_only() -> None:
    got = _refused_values(_default(), "ioctl", 1)
    want = {0x5412, 0x541C, 0x40086602, 0x40046602, 0x401C5820}
    assert set(got) == want
    # The mask ignores the high half the kernel drops, so 0x100005412 is TIOCSTI too.
    assert all(v == (MASK32, 1) for v in got.values())
    sock = _refused_values(_default(), "socket", 0)
    assert sock == {40: (MASK32, 97)}  # AF_VSOCK: EAFNOSUPPORT


def test_default_namespace_flags_are_refused_for_clone_and_unshare() -> None:
    profile = _default()
    clone = _refused_values(profile, "clone", 0)
    assert set(clone) == set(NAMESPACE_FLAGS)
    assert all(mask == datum for datum, (mask, _e) in clone.items())
    unshare = _refused_values(profile, "unshare", 0)
    assert set(unshare) == {*NAMESPACE_FLAGS, 0x80}  # and CLONE_NEWTIME
    allow = [r for r in _conditional(profile, "unshare") if r.action == "SCMP_ACT_ALLOW"]
    (cond,) = allow[0].args
    assert cond.valueTwo == 0 and cond.value == sum(NAMESPACE_FLAGS) | 0x80


def test_default_compiles_to_a_main_program_and_a_stacked_one() -> None:
    compiled = seccomp.compile_profile(_default())
    assert len(compiled.programs) == 2
    for program in compiled.programs:
        assert program and len(program) % 8 == 0 and len(program) // 8 <= 4096
    # Only names newer than this libseccomp are left out.
    assert all(n.scmp_resolve(name) is None for name in compiled.unknown)
    assert "ioctl" not in compiled.unknown and "clone" not in compiled.unknown


def test_a_profile_without_conditional_refusals_is_one_program(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "defaultAction": "SCMP_ACT_KILL_PROCESS",
                "syscalls": [
                    {
                        "names": ["read", "write", "exit_group", "no_such_call"],
                        "action": "SCMP_ACT_ALLOW",
                    },
                    {"names": ["getpid"], "action": "SCMP_ACT_ERRNO"},
                ],
            }
        )
    )
    compiled = seccomp.SeccompFilters().compiled(str(path))
    assert len(compiled.programs) == 1 and compiled.unknown == ("no_such_call",)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"defaultAction": "SCMP_ACT_ALLOW"}, "use the profile 'unconfined'"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "flags": []}, "flags: Extra inputs"),
        (
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}],
            },
            "syscalls.0.action",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}],
            },
            "errnoRet is only for SCMP_ACT_ERRNO",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 6, "op": "SCMP_CMP_EQ", "value": 1}],
                    }
                ],
            },
            "syscalls.0.args.0.index",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [
                    {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO"},
                ],
            },
            "two rules without conditions",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [
                    {"names": ["personality"], "action": "SCMP_ACT_ERRNO"},
                    {
                        "names": ["personality"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 0, "op": "SCMP_CMP_EQ", "value": 0}],
                    },
                ],
            },
            "would hide",
        ),
    ],
)
def test_bad_profiles_are_refused_naming_the_key(
    tmp_path: Path, doc: dict[str, Any], message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as info:
        seccomp.load_profile(str(path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_profile_references(tmp_path: Path) -> None:
    assert seccomp.load_profile("unconfined") is None
    with pytest.raises(ConfigError, match="absolute path"):
        seccomp.load_profile("relative.json")
    with pytest.raises(ConfigError, match="cannot read"):
        seccomp.load_profile(str(tmp_path / "missing.yaml"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON/YAML"):
        seccomp.load_profile(str(tmp_path / "x.json"))
    assert seccomp.SeccompFilters().programs("unconfined") == []


def test_each_profile_is_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = seccomp.compile_profile

    def counting(p: seccomp.Profile) -> seccomp.Compiled:
        calls.append(p)
        return real(p)

    monkeypatch.setattr(seccomp, "compile_profile", counting)
    filters = seccomp.SeccompFilters()
    first = filters.programs("default")
    assert filters.programs("default") == first and len(calls) == 1
    assert len(first) == 2 and all(isinstance(p, str) for p in first)


def test_tier_config_key() -> None:
    assert {Config().tiers.get(t).seccomp for t in ("guest", "free", "pro", "enterprise")} == {
        "default"
    }
    base = Config().tiers.free.model_dump()
    for ok in ("default", "unconfined", "/etc/rexecd/strict.json"):
        assert TierLimits.model_validate({**base, "seccomp": ok}).seccomp == ok
    with pytest.raises(ValueError, match="absolute path"):
        TierLimits.model_validate({**base, "seccomp": "strict.json"})


def test_process_spec_carries_programs_and_needs_no_new_privs() -> None:
    spec = ProcessSpec(args=["true"], seccomp=["AAAA"])
    assert ProcessSpec.from_dict(json.loads(json.dumps(spec.__dict__))).seccomp == ["AAAA"]
    assert ProcessSpec(args=["true"]).seccomp is None  # nobody chose: the child refuses
    with pytest.raises(ValueError, match="no_new_privs"):
        ProcessSpec(args=["true"], seccomp=["AAAA"], no_new_privs=False)


def _show(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        rexecd_main(["seccomp", "show", *args])
    return int(info.value.code or 0), capsys.readouterr().out


def test_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiers = Config().tiers.model_dump()
    tiers["enterprise"]["seccomp"] = "unconfined"
    cfg = tmp_path / "rexecd.yaml"
    cfg.write_text(yaml.safe_dump({"tiers": tiers}))
    code, out = _show(capsys, "--config", str(cfg), "--tier", "enterprise")
    assert code == 0
    assert json.loads(out) == {
        "tier": "enterprise",
        "profile": "unconfined",
        "programs": [],
        "unknown_syscalls": [],
        "rules": None,
    }
    code, out = _show(capsys, "--config", str(cfg), "--tier", "pro")
    shown = json.loads(out)
    assert shown["profile"] == "default" and len(shown["programs"]) == 2
    # The rules printed are a profile document: saved to a file, they load again.
    assert seccomp.Profile.model_validate(shown["rules"]) == _default()
    code, out = _show(capsys, "--profile", "default", "--pfc")
    assert "ERRNO(1)" in out and "second filter" in out
    code, _out = _show(capsys, "--tier", "platinum")
    assert code != 0
