"""The exec stream in the OpenAPI document: its start frame and every JSON frame kind are
components equal to the pydantic models, and the 101 answer says what each side's text
and binary frames are (the README's protocol), without a change to the wire."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from rexecd.api.openapi import REF_TEMPLATE
from rexecd.errors import ExecTimeout, InvalidRequest
from rexecd.models import ExecStreamFrame, ExecStreamStart
from tests.unit.fakes.service import harness

PATH = "/api/containers/{id}/exec/stream"


async def _doc(tmp_path: Path) -> dict[str, Any]:
    async with harness(tmp_path) as h:
        resp = await h.client.get("/api/openapi.json", headers=h.headers())
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(mode="validation", ref_template=REF_TEMPLATE)


def _model(ref: dict[str, str]) -> str:
    return ref["$ref"].rpartition("/")[2]


async def test_the_start_frame_is_a_component_the_101_points_to(tmp_path: Path) -> None:
    doc = await _doc(tmp_path)
    assert doc["components"]["schemas"]["ExecStreamStart"] == _schema(ExecStreamStart)
    ok = doc["paths"][PATH]["get"]["responses"]["101"]
    assert _model(ok["x-websocket"]["client"]["first"]) == "ExecStreamStart"
    # The server's output is binary, not JSON: the document must not say otherwise.
    assert "channel (1 stdout, 2 stderr" in ok["x-websocket"]["server"]["binary"]["description"]
    assert "stdin" in ok["x-websocket"]["client"]["binary"]["description"]
    assert _model(ok["x-websocket-frames"]) == "ExecStreamFrame"


async def test_each_frame_kind_is_a_component_equal_to_its_model(tmp_path: Path) -> None:
    from rexecd import models

    doc = await _doc(tmp_path)
    schemas = doc["components"]["schemas"]
    ws = doc["paths"][PATH]["get"]["responses"]["101"]["x-websocket"]
    kinds: dict[str, set[str]] = {}
    for side in ("client", "server"):
        text = ws[side]["text"]
        assert text["discriminator"] == {"propertyName": "type"}
        for ref in text["oneOf"]:
            name = _model(ref)
            model = getattr(models, name)
            assert schemas[name] == _schema(model), name
            kinds.setdefault(side, set()).add(schemas[name]["properties"]["type"]["const"])
    # Together the kinds are exactly what ExecStreamFrame (the wire model) allows.
    wire = set(typing.get_args(ExecStreamFrame.model_fields["type"].annotation))
    assert kinds["client"] | kinds["server"] == wire
    assert kinds == {
        "client": {"eof", "resize", "signal", "ping"},
        "server": {"started", "pong", "exit", "error"},
    }


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "started"},
        {"type": "pong"},
        {"type": "exit", "exit_code": 137},
        # What the handler sends at the deadline and for a bad start frame.
        {"type": "error", **ExecTimeout("command timed out after 5 s").to_json()},
        {"type": "error", **InvalidRequest("bad", details=[{"loc": ["cmd"]}]).to_json()},
        {"type": "eof"},
        {"type": "resize", "cols": 120, "rows": 40},
        {"type": "signal", "signal": "INT"},
        {"type": "signal", "signal": 15},
        {"type": "ping"},
    ],
)
def test_the_frames_of_the_protocol_validate_against_their_kind(frame: dict[str, Any]) -> None:
    from rexecd.models import EXEC_STREAM_CLIENT_FRAMES, EXEC_STREAM_SERVER_FRAMES

    by_type = {
        m.model_fields["type"].annotation.__args__[0]: m  # type: ignore[union-attr]
        for m in (*EXEC_STREAM_CLIENT_FRAMES, *EXEC_STREAM_SERVER_FRAMES)
    }
    by_type[frame["type"]].model_validate(frame)
    ExecStreamFrame.model_validate(frame)  # and the wire model takes it as before
