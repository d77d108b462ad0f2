"""`rexecd token` and `rexecd user`: the admin commands, against a state dir in tmp."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rexecd.service.auth import authenticate
from rexecd.service.store import Store
from tests.unit.fakes.cli import run


def test_token_create_prints_only_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "token",
        "create",
        "--state-dir",
        str(tmp_path),
        "--user",
        "ann",
        "--tier",
        "pro",
        "--scopes",
        "read,write,admin",
    )
    assert code == 0
    token = out.strip()
    assert re.fullmatch(r"rexec_[0-9a-f]{48}", token)
    with Store(tmp_path) as store:
        p = authenticate(store, token)
        assert (p.user_name, p.tier) == ("ann", "pro")
        assert {"read", "write", "admin"} <= set(p.scopes)
        # Only the hash is stored.
        assert token not in (tmp_path / "state.db").read_bytes().decode(errors="ignore")


def test_token_ls_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "token", "create", "--state-dir", str(tmp_path), "--user", "bob")
    token = out.strip()
    code, out, _ = run(capsys, "token", "ls", "--state-dir", str(tmp_path), "--user", "bob")
    assert code == 0
    rows = out.splitlines()[1:]
    assert len(rows) == 1 and token[:12] in rows[0]
    token_id = rows[0].split()[0]
    code, out, _ = run(capsys, "token", "revoke", "--state-dir", str(tmp_path), token_id)
    assert code == 0 and token_id in out
    with Store(tmp_path) as store:
        from rexecd.errors import Unauthorized

        with pytest.raises(Unauthorized):
            authenticate(store, token)
    code, _, err = run(capsys, "token", "revoke", "--state-dir", str(tmp_path), token_id)
    assert code == 125 and "no token" in err


def test_user_add_and_set_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "user", "add", "--state-dir", str(tmp_path), "cid", "--tier", "guest"
    )
    assert code == 0 and out.strip()
    code, out, _ = run(
        capsys, "user", "set-tier", "--state-dir", str(tmp_path), "cid", "enterprise"
    )
    assert code == 0 and out.strip() == "cid: enterprise"
    with Store(tmp_path) as store:
        user = store.get_user_by_name("cid")
        assert user is not None and user.tier == "enterprise"
    code, _, err = run(capsys, "user", "set-tier", "--state-dir", str(tmp_path), "cid", "gold")
    assert code == 125 and "unknown tier 'gold'" in err
    code, _, err = run(capsys, "user", "set-tier", "--state-dir", str(tmp_path), "nobody", "free")
    assert code == 125 and "no user" in err


def test_bad_config_is_named_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tiers:\n  free:\n    memory_mb: lots\n")
    code, _, err = run(capsys, "serve", "--config", str(cfg), "--state-dir", str(tmp_path))
    assert code == 2
    assert "tiers.free" in err and "Traceback" not in err
