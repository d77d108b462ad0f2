"""Wire models: request validation (400 on bad or unknown fields) and response shapes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from rexecd.models import (
    ActionResult,
    ContainerCreate,
    ContainerList,
    ContainerOut,
    ContainerRecord,
    ContainerResources,
    ErrorBody,
    Event,
    ExecRequest,
    FileInfo,
    SettingsPatch,
    StreamProgress,
    TerminalFrame,
    TokenCreate,
    TokenCreated,
    TokenOut,
    format_rfc3339,
)

RES = ContainerResources(memory_mb=512, cpu_shares=1000, disk_mb=2048, network_mbps=10)
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def record(**kw: object) -> ContainerRecord:
    fields: dict[str, object] = {
        "user_id": "u1",
        "name": "box",
        "image": "ubuntu",
        "resources": RES,
        "created_at": T0,
    }
    fields.update(kw)
    return ContainerRecord.model_validate(fields)


# --- requests --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A9", "my-box_1", "x" * 64, "9lives"])
def test_create_accepts_good_names(name: str) -> None:
    assert ContainerCreate(image="ubuntu", name=name).name == name


@pytest.mark.parametrize("name", ["", "-a", "_a", "a b", "a.b", "x" * 65, "ü", "a/b"])
def test_create_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        ContainerCreate(image="ubuntu", name=name)
    assert info.value.errors()[0]["loc"] == ("name",)


def test_create_requires_image_and_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError) as info:
        ContainerCreate.model_validate({"name": "x", "shell": "zsh"})
    locs = {e["loc"] for e in info.value.errors()}
    assert locs == {("image",), ("shell",)}


def test_create_full_body() -> None:
    body = ContainerCreate.model_validate(
        {
            "image": "custom",
            "custom_image": "myorg/tool:1.2",
            "name": "n",
            "role": "python",
            "memory_mb": 1024,
            "cpu_shares": 500,
            "disk_mb": 0,
            "environment": {"FOO": "bar", "_X1": ""},
            "labels": {"team": "a", "app.kubernetes.io/name": "x"},
            "network_mode": "none",
        }
    )
    assert body.environment == {"FOO": "bar", "_X1": ""}
    assert body.network_mode == "none"
    assert body.disk_mb == 0


@pytest.mark.parametrize(
    "patch",
    [
        {"environment": {"1BAD": "x"}},
        {"environment": {"A": "nul\x00"}},
        {"environment": {"A": 1}},
        {"labels": {"": "x"}},
        {"memory_mb": -1},
        {"network_mode": "host"},
        {"image": ""},
        {"image": "has space"},
    ],
)
def test_create_refuses_bad_values(patch: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ContainerCreate.model_validate({"image": "ubuntu", **patch})


def test_settings_patch() -> None:
    assert SettingsPatch.model_validate({}).model_dump(exclude_none=True) == {}
    assert SettingsPatch(name="new-name", memory_mb=256).memory_mb == 256
    with pytest.raises(ValidationError):
        SettingsPatch.model_validate({"name": "-x"})
    with pytest.raises(ValidationError):
        SettingsPatch.model_validate({"image": "ubuntu"})


def test_exec_request_exactly_one_of_command_and_cmd() -> None:
    assert ExecRequest(command="echo hi").argv() == ["/bin/sh", "-c", "echo hi"]
    assert ExecRequest(cmd=["ls", "-l"]).argv() == ["ls", "-l"]
    with pytest.raises(ValidationError, match="exactly one"):
        ExecRequest()
    with pytest.raises(ValidationError, match="exactly one"):
        ExecRequest(command="x", cmd=["y"])
    with pytest.raises(ValidationError):
        ExecRequest(cmd=[])
    with pytest.raises(ValidationError):
        ExecRequest(cmd=[""])


def test_exec_request_fields() -> None:
    req = ExecRequest.model_validate(
        {"command": "x", "workdir": "/srv", "env": ["A=1", "B=", "C=x=y"], "user": "root"}
    )
    assert req.timeout_seconds == 60
    assert req.env == ["A=1", "B=", "C=x=y"]
    for bad in ({"env": ["NOEQUALS"]}, {"env": ["1A=x"]}, {"workdir": "relative"},
                {"timeout_seconds": -5}, {"bogus": 1}, {"command": "a\x00b"}):  # fmt: skip
        with pytest.raises(ValidationError):
            ExecRequest.model_validate({"command": "x", **bad})


def test_exec_timeout_default_and_cap() -> None:
    assert ExecRequest(command="x", timeout_seconds=0).timeout_seconds == 60
    assert (
        ExecRequest.model_validate({"command": "x", "timeout_seconds": None}).timeout_seconds == 60
    )
    assert ExecRequest(command="x", timeout_seconds=5).timeout_seconds == 5
    assert ExecRequest(command="x", timeout_seconds=3000).timeout_seconds == 300


def test_token_create() -> None:
    body = TokenCreate.model_validate({"name": "ci", "scopes": ["read"], "expires_in": 30})
    assert body.scopes == ["read"]
    for bad in ({"name": ""}, {"name": "x", "scopes": ["root"]}, {"name": "x", "expires_in": 0}):
        with pytest.raises(ValidationError):
            TokenCreate.model_validate(bad)


# --- responses -------------------------------------------------------------------------


def test_timestamps_are_rfc3339_utc_with_z() -> None:
    assert format_rfc3339(T0) == "2024-05-01T12:00:00Z"
    plus2 = timezone(timedelta(hours=2))
    assert format_rfc3339(datetime(2024, 5, 1, 14, 0, tzinfo=plus2)) == "2024-05-01T12:00:00Z"
    assert format_rfc3339(datetime(2024, 5, 1, 12, 0)) == "2024-05-01T12:00:00Z"


def test_container_out_has_exactly_the_api_keys() -> None:
    out = record().to_out(T0 + timedelta(seconds=90))
    data = json.loads(out.model_dump_json())
    assert set(data) == {
        "id", "db_id", "user_id", "name", "image", "role", "status", "created_at",
        "last_used_at", "idle_seconds", "ip_address", "expires_at", "resources",
    }  # fmt: skip
    assert data["created_at"] == "2024-05-01T12:00:00Z"
    assert data["idle_seconds"] == 90
    assert data["resources"] == {
        "memory_mb": 512, "cpu_shares": 1000, "disk_mb": 2048, "network_mbps": 10,
    }  # fmt: skip
    assert len(data["id"]) == 64 and len(data["db_id"]) == 36


def test_container_out_async_and_error_message() -> None:
    data = record().to_out(async_=True).model_dump(mode="json")
    assert data["async"] is True and data["status"] == "creating"
    failed = record(status="error", error_message="mount failed").to_out()
    assert failed.model_dump(mode="json")["error_message"] == "mount failed"
    # A stale message on a container that recovered is not shown.
    assert (
        "error_message" not in record(status="running", error_message="old").to_out().model_dump()
    )
    # A stopped container says why it stopped (the last exit's cause).
    oom = record(status="stopped", error_message="init was killed by the out-of-memory killer")
    assert oom.to_out().model_dump(mode="json")["error_message"].endswith("out-of-memory killer")


def test_container_out_round_trips_from_json() -> None:
    out = record(last_used_at=T0, expires_at=T0 + timedelta(hours=50)).to_out(async_=True)
    back = ContainerOut.model_validate(json.loads(out.model_dump_json()))
    assert back.async_ is True
    assert back.expires_at == datetime(2024, 5, 3, 14, 0, tzinfo=UTC)


def test_idle_seconds_uses_last_used() -> None:
    rec = record(last_used_at=T0 + timedelta(seconds=50))
    assert rec.idle_seconds(T0 + timedelta(seconds=60)) == 10
    assert rec.idle_seconds(T0) == 0


def test_record_defaults_and_id_validation() -> None:
    a, b = record(), record()
    assert a.db_id != b.db_id and a.id != b.id
    assert a.status == "creating" and a.network_mode == "default"
    with pytest.raises(ValidationError):
        record(id="ABC")
    with pytest.raises(ValidationError):
        a.status = "exploded"  # type: ignore[assignment]


def test_container_list_and_action_result() -> None:
    lst = ContainerList(containers=[record().to_out()], count=1, limit=5)
    assert lst.model_dump(mode="json")["count"] == 1
    act = ActionResult(message="container started", id="x", name="n", status="running")
    assert act.model_dump() == {
        "message": "container started", "id": "x", "name": "n", "status": "running",
    }  # fmt: skip


def test_token_out_and_created() -> None:
    out = TokenOut(
        id="t", name="n", token_prefix="rexec_abcdef", scopes=["read", "write"],
        expires_at=None, created_at=T0,
    )  # fmt: skip
    assert "last_used_at" not in out.model_dump()
    created = TokenCreated(token="rexec_" + "0" * 48, **out.model_dump())
    data = created.model_dump(mode="json")
    assert set(data) == {
        "token",
        "id",
        "name",
        "token_prefix",
        "scopes",
        "expires_at",
        "created_at",
    }


def test_event_frames_leave_out_absent_keys() -> None:
    assert Event(type="pong").model_dump(mode="json") == {"type": "pong"}
    listed = Event(type="list", containers=[]).model_dump(mode="json")
    assert listed == {"type": "list", "containers": []}
    ev = Event(type="started", container=record().to_out(), timestamp=T0).model_dump(mode="json")
    assert ev["timestamp"] == "2024-05-01T12:00:00Z" and ev["container"]["name"] == "box"
    with pytest.raises(ValidationError):
        Event(type="exploded")


def test_stream_progress() -> None:
    frame = StreamProgress(stage="pulling", message="unpacking", progress=20)
    assert frame.model_dump(mode="json") == {
        "stage": "pulling", "message": "unpacking", "progress": 20, "complete": False,
    }  # fmt: skip
    with pytest.raises(ValidationError):
        StreamProgress(stage="pulling", message="x", progress=101)
    done = StreamProgress(
        stage="ready", message="ok", progress=100, complete=True, container_id="abc"
    )
    assert done.model_dump()["container_id"] == "abc"


def test_terminal_frames() -> None:
    frame = TerminalFrame.model_validate_json('{"type":"input","data":"ls\\r","ts":1}')
    assert frame.type == "input" and frame.data == "ls\r"
    assert TerminalFrame(type="resize", cols=120, rows=40).to_wire() == (
        '{"type":"resize","cols":120,"rows":40}'
    )
    assert TerminalFrame(type="pong").to_wire() == '{"type":"pong"}'
    with pytest.raises(ValidationError):
        TerminalFrame.model_validate({"type": "resize", "cols": -1, "rows": 1})
    with pytest.raises(ValidationError):
        TerminalFrame.model_validate({"type": "nope"})


def test_error_body_allows_extra_keys() -> None:
    body = ErrorBody.model_validate({"error": "container limit reached", "limit": 5})
    assert body.model_dump(exclude_none=True) == {"error": "container limit reached", "limit": 5}


def test_file_info() -> None:
    info = FileInfo(name="a", path="/a", size=1, mode="-rw-r--r--", mod_time=T0, is_dir=False)
    assert info.model_dump(mode="json")["mod_time"] == "2024-05-01T12:00:00Z"
