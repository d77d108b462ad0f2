"""The ``rexec`` CLI: each command's request, table and --json output, errors, exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rexecd.client.cli import _age, build_parser, describe_error, main, table
from rexecd.client.sdk import ApiError
from tests.unit.fakes.daemon import TOKEN, FakeDaemon, Override, ServerThread


@pytest.fixture(params=["tcp", "unix"])
def daemon(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    fake.polls_until_running = 1
    fake.events_linger = False
    unix_path = tmp_path / "d.sock" if request.param == "unix" else None
    with ServerThread(fake, unix_path) as host:
        monkeypatch.setenv("REXEC_HOST", host)
        monkeypatch.setenv("REXEC_TOKEN", TOKEN)
        yield fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def test_table_alignment() -> None:
    text = table(("NAME", "STATUS"), [["a", "running"], ["longer-name", "x"]])
    assert text == "NAME         STATUS\na            running\nlonger-name  x\n"
    assert table(("A", "B"), []) == "A  B\n"


def test_age() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert _age(now - timedelta(seconds=5), now) == "5s ago"
    assert _age(now - timedelta(minutes=3), now) == "3m ago"
    assert _age(now - timedelta(hours=2), now) == "2h ago"
    assert _age(now - timedelta(days=4), now) == "4d ago"
    assert _age(None, now) == "-"


def test_ls_table_and_json(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.add("one")
    daemon.add("two", status="stopped")
    code, out, err = run(capsys, "ls")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "ID",
        "IMAGE",
        "STATUS",
        "CPU",
        "MEMORY",
        "DISK",
        "IP",
        "CREATED",
    ]
    assert rows(out)[1][:8] == [
        "two",
        daemon.containers["two"]["id"][:12],
        "ubuntu",
        "stopped",
        "500m",
        "512M",
        "2048M",
        "10.88.0.2",
    ]
    # Columns line up: every STATUS cell starts where the header does.
    col = lines[0].index("STATUS")
    assert [line[col:].split()[0] for line in lines[1:]] == ["stopped", "running"]

    for argv in (("ls", "--json"), ("--json", "ls")):
        code, out, _ = run(capsys, *argv)
        data = json.loads(out)
        assert code == 0
        assert [c["name"] for c in data["containers"]] == ["two", "one"]
        assert data["count"] == 2 and data["limit"] == 5
        assert data["containers"][0]["created_at"] == "2024-05-01T12:00:00Z"


def test_host_and_token_flags_override_env(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    host = os.environ["REXEC_HOST"]
    monkeypatch.setenv("REXEC_HOST", "unix:/nonexistent/rexecd.sock")
    monkeypatch.setenv("REXEC_TOKEN", "rexec_wrong")
    code, out, _ = run(capsys, "--host", host, "ls", "--token", TOKEN)
    assert code == 0 and out.startswith("NAME")
    assert daemon.last().headers["Authorization"] == f"Bearer {TOKEN}"


def test_create(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "create",
        "ubuntu",
        "--name",
        "web",
        "--memory",
        "1024",
        "--cpu",
        "1500",
        "--disk",
        "4096",
        "-e",
        "A=1",
        "-e",
        "B=x=y",
    )
    assert code == 0
    assert daemon.last().body == {
        "image": "ubuntu",
        "name": "web",
        "memory_mb": 1024,
        "cpu_shares": 1500,
        "disk_mb": 4096,
        "environment": {"A": "1", "B": "x=y"},
    }
    assert rows(out)[1][:4] == ["web", daemon.containers["web"]["id"][:12], "ubuntu", "creating"]
    assert rows(out)[1][4:7] == ["1500m", "1024M", "4096M"]

    code, out, _ = run(capsys, "create", "alpine", "--name", "w2", "--wait", "--json")
    assert code == 0
    assert json.loads(out)["status"] == "running"
    assert daemon.calls("GET", f"/api/containers/{daemon.containers['w2']['id']}")

    code, out, err = run(capsys, "create", "broken", "--name", "bad", "--wait")
    assert code == 1
    assert "error" in rows(out)[1]
    assert err == "rexec: container bad failed: image failed to start\n"


def test_create_bad_env_is_a_usage_error(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["create", "ubuntu", "-e", "NOEQUALS"])
    assert info.value.code == 2
    assert "expected K=V" in capsys.readouterr().err


def test_actions(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    web = daemon.add("web", status="stopped")
    code, out, _ = run(capsys, "start", "web")
    assert code == 0
    assert rows(out) == [
        ["NAME", "ID", "STATUS", "MESSAGE"],
        ["web", web["id"][:12], "running", "container", "started"],
    ]
    code, out, _ = run(capsys, "stop", "web", "--timeout", "3")
    assert daemon.last().query == {"timeout": "3"}
    assert rows(out)[1][2] == "stopped"
    code, out, _ = run(capsys, "restart", "web", "--json")
    assert json.loads(out) == {
        "message": "container restarted",
        "id": web["id"],
        "name": "web",
        "status": "running",
    }
    code, out, _ = run(capsys, "rm", "web", "--volumes")
    assert code == 0
    assert (daemon.last().method, daemon.last().query) == ("DELETE", {"volumes": "true"})
    assert rows(out)[1][:2] == ["web", web["id"][:12]]
    assert "web" not in daemon.containers


def test_update_and_inspect(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.add("web")
    code, out, _ = run(capsys, "update", "web", "--memory", "1024", "--disk", "4096")
    assert code == 0
    assert daemon.last().body == {"memory_mb": 1024, "disk_mb": 4096}
    assert "restarted" in out
    code, out, _ = run(capsys, "inspect", "web")
    fields = {r[0]: r[1:] for r in rows(out)[1:]}
    assert fields["name"] == ["web"]
    assert fields["resources.memory_mb"] == ["1024"]
    assert fields["last_used_at"] == ["-"]
    code, out, _ = run(capsys, "inspect", "web", "--json")
    assert json.loads(out)["resources"]["disk_mb"] == 4096


def test_exec_prints_and_propagates_exit_code(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.add("web")
    code, out, err = run(capsys, "exec", "web", "--", "ls", "-l", "--stderr")
    assert code == 0
    assert daemon.last().body == {"cmd": ["ls", "-l", "--stderr"]}
    assert out == "ls -l --stderr\n"
    assert err == "to stderr\n"

    code, out, _ = run(capsys, "exec", "web", "--", "exit", "3")
    assert code == 3
    assert out == "exit 3\n"

    code, out, _ = run(
        capsys, "exec", "--json", "-w", "/tmp", "-e", "K=V", "web", "--", "exit", "7"
    )
    assert code == 7
    assert json.loads(out)["exit_code"] == 7
    assert daemon.last().body == {"cmd": ["exit", "7"], "workdir": "/tmp", "env": ["K=V"]}

    code, out, err = run(capsys, "exec", "web", "--", "sleep", "100")
    assert code == 1
    assert out == "partial\n"
    assert err == (
        "rexec: command timed out (504); give a longer --timeout (at most 300 s), "
        "or use -i for no deadline\n"
    )

    code, _, err = run(capsys, "exec", "web")
    assert code == 2 and "needs a command" in err


def test_stats(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.add("web")
    code, out, _ = run(capsys, "stats", "web")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "CPU", "MEMORY", "MEM%"]
    assert "12.5%" in row and "64.0MiB / 512.0MiB" in row and "12.5%" in row
    code, out, _ = run(capsys, "stats", "web", "--json")
    assert json.loads(out)["pids"] == 3


def test_images_roles(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "images")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[0] == "NAME"
    assert lines[1].startswith("ubuntu") and lines[1].rstrip().endswith("yes")
    assert lines[2].startswith("alpine") and lines[2].rstrip().endswith("no")
    code, out, _ = run(capsys, "images", "--json")
    assert [i["name"] for i in json.loads(out)["images"]] == ["ubuntu", "alpine"]
    code, out, _ = run(capsys, "roles")
    assert rows(out)[1] == ["python", "Python", "2", "Python", "dev"]
    code, out, _ = run(capsys, "roles", "--json")
    assert json.loads(out)["roles"][0]["id"] == "python"


def test_import_image(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    archive = tmp_path / "i.tar"
    archive.write_bytes(b"x" * 2048)
    code, out, _ = run(capsys, "import-image", str(archive), "--name", "mine:1")
    assert code == 0
    assert rows(out)[1][0] == "mine:1" and rows(out)[1][2] == "2.0KiB"


def test_tokens(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "tokens", "create", "ci", "--scopes", "read", "--expires-in", "30")
    assert code == 0
    assert daemon.last().body == {"name": "ci", "scopes": ["read"], "expires_in": 30}
    assert rows(out)[1][:3] == ["tok-1", "ci", "read"]
    assert rows(out)[1][-1] == "rexec_" + "cd" * 24
    assert "not shown again" in err
    code, out, _ = run(capsys, "tokens", "create", "other", "--json")
    assert json.loads(out)["token"].startswith("rexec_")
    code, out, _ = run(capsys, "tokens", "ls")
    assert [r[0] for r in rows(out)[1:]] == ["tok-1", "tok-2"]
    assert "never" in out
    code, out, _ = run(capsys, "tokens", "ls", "--json")
    assert "token" not in json.loads(out)["tokens"][0]
    code, out, _ = run(capsys, "tokens", "rm", "tok-1")
    assert code == 0 and rows(out)[1] == ["tok-1", "token", "revoked"]
    assert (daemon.last().method, daemon.last().path) == ("DELETE", "/api/tokens/tok-1")
    code, _, err = run(capsys, "tokens", "rm", "tok-1")
    assert (code, err) == (1, "rexec: token not found (404)\n")


def test_daemon_info_commands(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "health")
    assert code == 0 and rows(out)[1] == ["ok", "0.1.0", "0", "0", "v2"]
    code, out, _ = run(capsys, "version", "--json")
    assert json.loads(out) == {"version": "0.1.0", "build": "test"}
    code, out, _ = run(capsys, "whoami")
    assert rows(out)[1][:4] == ["alice", "user-1", "free", "read,write"]


def test_events(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.add("one")
    code, out, _ = run(capsys, "events")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "-  list  1 containers"
    assert lines[1] == "2024-05-01T12:00:00Z  started  web  running"
    code, out, _ = run(capsys, "events", "--json")
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["list", "started"]


def test_api_errors(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "start", "ghost")
    assert (code, out, err) == (1, "", "rexec: container not found (404)\n")

    daemon.override = Override(429, {"error": "rate limit exceeded", "retry_after": 7})
    code, _, err = run(capsys, "ls")
    assert (code, err) == (1, "rexec: rate limit exceeded (429), retry after 7s\n")

    daemon.override = Override(
        403, {"error": "container limit reached", "current": 5, "limit": 5, "tier": "free"}
    )
    code, _, err = run(capsys, "create", "ubuntu")
    assert err == "rexec: container limit reached (403): 5 of 5 on tier free\n"

    code, _, err = run(capsys, "create", "bogus")
    assert err == (
        "rexec: unsupported image type (400): supported: ubuntu, alpine; rexec images lists "
        "them, an admin adds one with rexec import-image FILE\n"
    )

    daemon.override = Override(
        400,
        {
            "error": "invalid request body",
            "details": [{"loc": ["body", "name"], "msg": "String should match pattern"}],
        },
    )
    code, _, err = run(capsys, "create", "ubuntu", "--name=-x")
    assert err == "rexec: invalid request body (400): body.name: String should match pattern\n"


def test_missing_token_hint(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REXEC_TOKEN")
    code, _, err = run(capsys, "ls")
    assert code == 1
    assert err == (
        "rexec: Authorization token required (401); set REXEC_TOKEN or pass --token "
        "(make a token on the daemon's host with: rexecd token create --user NAME)\n"
    )


def test_unreachable_daemon(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REXEC_TOKEN", TOKEN)
    code, _, err = run(capsys, "--host", f"unix:{tmp_path}/none.sock", "ls")
    assert code == 1
    assert err.startswith(f"rexec: cannot reach the daemon at unix:{tmp_path}/none.sock: ")


def test_bad_host_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--host", "ftp://x", "ls"])
    assert info.value.code == 2
    assert "REXEC_HOST must be" in capsys.readouterr().err


def test_connect_refused_before_raw_mode(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "connect", "ghost")
    assert (code, err) == (1, "rexec: container not found (404)\n")


def test_json_errors(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--json", "connect", "ghost")
    assert (code, out) == (1, "")
    body = json.loads(err)
    assert body["status"] == 404 and body["error"] == "container not found (404)"


def test_describe_error_plain() -> None:
    assert describe_error(ApiError(500, {"error": "internal error"})) == "internal error (500)"


def test_parser_lists_every_command() -> None:
    help_text = build_parser().format_help()
    for name in (
        "ls",
        "create",
        "start",
        "stop",
        "restart",
        "rm",
        "exec",
        "connect",
        "stats",
        "images",
        "roles",
        "tokens",
    ):
        assert name in help_text


def test_create_with_progress(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "create", "custom", "--custom-image", "team/tool:2", "--name", "p1", "--progress"
    )
    assert code == 0, err
    assert daemon.last().path == "/api/containers/stream"
    assert daemon.last().body == {"image": "custom", "custom_image": "team/tool:2", "name": "p1"}
    assert rows(out)[1][0] == "p1" and rows(out)[1][3] == "running"
    # Not a terminal: plain lines, the first stage and the last (100%) at least.
    lines = err.splitlines()
    assert lines[0].strip().startswith("0% validating") and lines[-1].startswith("100% ready")

    code, out, err = run(capsys, "create", "broken", "--name", "p2", "--progress")
    assert code == 1 and "image failed to start" in err
