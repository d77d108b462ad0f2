"""Hostile input against the API (fake service): every JSON body endpoint and both
multipart endpoints answer a body they cannot parse with a 400 and a stable code,
never a 500, and nothing reaches the service; the events socket survives any frame."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from rexecd.api.app import ENDPOINTS
from rexecd.api.wire import MAX_INT_DIGITS, decode_json
from rexecd.errors import InvalidJson
from tests.deadlines import scaled
from tests.unit.fakes.service import Harness, harness

DEEP = 5000
# Texts that json.loads either accepts (NaN, 1e999, lone surrogates) or fails on with
# something other than a JSONDecodeError (RecursionError, the int digit limit).
HOSTILE_JSON = {
    "deep_array": "[" * DEEP + "]" * DEEP,
    "deep_object": '{"a":' * DEEP + "1" + "}" * DEEP,
    "huge_int": '{"memory_mb": 1' + "0" * 5000 + "}",
    "long_int": '{"memory_mb": ' + "9" * (MAX_INT_DIGITS + 1) + "}",
    "lone_surrogate": '{"image": "busybox", "name": "\\ud800"}',
    "lone_low_surrogate_key": '{"labels": {"\\udc00": "x"}}',
    "nan": '{"memory_mb": NaN}',
    "infinity": '{"memory_mb": -Infinity}',
    "float_overflow": '{"memory_mb": 1e999}',
    "not_utf8": b'{"image": "\xff"}',
}

JSON_BODY_ROUTES = [(ep.method, ep.path) for ep in ENDPOINTS if isinstance(ep.body, type)]


def test_every_json_body_route_is_covered() -> None:
    # The hostile bodies go to each route whose body is a model: a new one is included.
    assert ("POST", "/api/containers") in JSON_BODY_ROUTES
    assert ("POST", "/api/containers/{id}/exec") in JSON_BODY_ROUTES
    assert len(JSON_BODY_ROUTES) >= 6


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_decode_json_refuses(name: str) -> None:
    with pytest.raises(InvalidJson) as info:
        decode_json(HOSTILE_JSON[name])
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_decode_json_keeps_what_is_valid() -> None:
    # An escaped surrogate pair is one valid character; an escaped backslash is not an escape.
    assert decode_json('"\\ud83d\\ude00"') == "\U0001f600"
    assert decode_json('"\\\\ud800"') == "\\ud800"
    assert decode_json("-" + "9" * MAX_INT_DIGITS) == -int("9" * MAX_INT_DIGITS)
    assert decode_json(b'{"a": [1.5e300, null, true]}') == {"a": [1.5e300, None, True]}
    nested = "[" * 200 + "]" * 200
    assert isinstance(decode_json(nested), list)


async def _post_raw(
    h: Harness, method: str, path: str, data: bytes, content_type: str, who: str = "alice"
) -> tuple[int, dict[str, object]]:
    headers = {**h.headers(who), "Content-Type": content_type}
    async with h.client.request(method, path, data=data, headers=headers) as resp:
        assert resp.content_type == "application/json", (path, resp.status, await resp.text())
        return resp.status, await resp.json()


@pytest.mark.parametrize(("method", "route"), JSON_BODY_ROUTES)
async def test_hostile_json_bodies_are_400_invalid_json(
    tmp_path: Path, method: str, route: str
) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        path = route.replace("{id}", rec.id)
        # Admin routes (an image pull) are reached with an admin token: the body is parsed.
        who = "root" if path.startswith("/api/images/") else "alice"
        before = {k: r.model_dump() for k, r in h.service.records.items()}
        for name, text in HOSTILE_JSON.items():
            raw = text if isinstance(text, bytes) else text.encode()
            status, body = await _post_raw(h, method, path, raw, "application/json", who)
            assert status == 400, (name, path, body)
            assert body["code"] == "invalid_json" and body["error"], (name, body)
        # Nothing was created, renamed or resized on the way.
        assert {k: r.model_dump() for k, r in h.service.records.items()} == before


# (name, body, Content-Type) of multipart bodies aiohttp's reader refuses.
B = "multipart/form-data; boundary=b"
HOSTILE_FORMS = [
    (
        "bad_header_line",
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n'
        b"Bad Header\r\n\r\nhello\r\n--b--\r\n",
        B,
    ),
    (
        "nul_in_name",
        b'--b\r\nContent-Disposition: form-data; name="fi\x00le"; filename="x"\r\n\r\n'
        b"hello\r\n--b--\r\n",
        B,
    ),
    (
        "nul_in_filename",
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x00b"\r\n\r\n'
        b"hello\r\n--b--\r\n",
        B,
    ),
    ("no_starting_boundary", b"just some bytes", B),
    ("truncated_headers", b"--b\r\n\r\n", B),
    (
        "no_closing_boundary",
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\nhel',
        B,
    ),
    (
        "path_field_without_boundary",
        b'--b\r\nContent-Disposition: form-data; name="path"\r\n\r\n/tmp',
        B,
    ),
    ("wrong_next_boundary", b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--c', B),
    ("no_boundary_parameter", b"--b\r\n\r\n", "multipart/form-data"),
    ("boundary_too_long", b"--" + b"b" * 80 + b"\r\n", "multipart/form-data; boundary=" + "b" * 80),
]


@pytest.mark.parametrize(
    ("name", "raw", "content_type"), HOSTILE_FORMS, ids=[f[0] for f in HOSTILE_FORMS]
)
async def test_malformed_multipart_is_400_invalid_multipart(
    tmp_path: Path, name: str, raw: bytes, content_type: str
) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        for who, path in (
            ("alice", f"/api/containers/{rec.id}/files"),
            ("root", "/api/images/import"),
        ):
            status, body = await _post_raw(h, "POST", path, raw, content_type, who)
            assert status == 400, (path, body)
            assert body["code"] == "invalid_multipart" and body["error"], (path, body)
        assert h.service.uploads == [] and h.service.imports == []


async def test_events_socket_survives_any_frame(tmp_path: Path) -> None:
    frames: list[str | bytes] = [
        *(t for t in HOSTILE_JSON.values() if isinstance(t, str)),
        '{"type": 5}',
        '{"type": "ping", "data": ' + "[" * DEEP + "]" * DEEP + "}",
        "[1, 2]",
        '"ping"',
        "5",
        b"\x00\xff binary",
    ]
    async with (
        harness(tmp_path) as h,
        h.client.ws_connect("/api/containers/events", headers=h.headers()) as ws,
    ):
        assert (await ws.receive_json())["type"] == "list"
        for frame in frames:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
        await ws.send_json({"type": "ping"})
        msg = await ws.receive(timeout=scaled(5))
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        assert msg.json() == {"type": "pong"}
        assert not ws.closed


async def test_an_empty_file_part_is_whole(tmp_path: Path) -> None:
    # The truncation check must not take an empty part, closed by its boundary, for one.
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        raw = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="empty"\r\n\r\n'
            b"\r\n--b--\r\n"
        )
        status, body = await _post_raw(h, "POST", f"/api/containers/{rec.id}/files", raw, B)
        assert status == 200, body
        assert h.service.uploads == [("/home/user", "empty", b"", 100 * 1024 * 1024)]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_its_content_encoding_is_400(
    tmp_path: Path, encoding: str
) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        for who, path, content_type in (
            ("alice", "/api/containers", "application/json"),
            ("alice", f"/api/containers/{rec.id}/files", B),
            ("root", "/api/images/import", "application/x-tar"),
        ):
            headers = {**h.headers(who), "Content-Type": content_type}
            headers["Content-Encoding"] = encoding
            async with h.client.post(path, data=b"not compressed", headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 400, (path, body)
                assert body["code"] == "invalid_body" and body["error"], (path, body)
        assert h.service.uploads == [] and h.service.imports == []
        assert len(h.service.records) == 1
