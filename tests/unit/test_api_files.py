"""File transfer endpoints, the image catalogue, roles and image import."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest

from rexecd.api import files
from tests.unit.fakes.service import harness


def _form(data: bytes, filename: str = "notes.txt", path: str | None = None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if path is not None:
        form.add_field("path", path)
    form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return form


async def test_upload_download_list_delete(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        base = f"/api/containers/{rec.id}/files"
        payload = bytes(range(256)) * 1000
        resp = await h.client.post(f"{base}?path=/tmp", data=_form(payload), headers=h.headers())
        assert resp.status == 200
        body = await resp.json()
        assert body["message"] == "file uploaded"
        assert body["path"] == "/tmp/notes.txt" and body["size"] == len(payload)
        assert h.service.uploads[-1][3] == files.UPLOAD_MAX_BYTES
        # The directory may come as a form field; no directory means the home volume.
        await h.client.post(base, data=_form(b"x", path="/srv"), headers=h.headers())
        await h.client.post(base, data=_form(b"y", "C:\\Users\\me\\a.txt"), headers=h.headers())
        assert [u[:2] for u in h.service.uploads[1:]] == [
            ("/srv", "notes.txt"),
            ("/home/user", "a.txt"),
        ]

        resp = await h.client.get(f"{base}?path=/tmp/notes.txt", headers=h.headers())
        assert resp.status == 200
        assert await resp.read() == payload
        assert resp.headers["X-File-Size"] == str(len(payload))
        assert resp.headers["X-File-Mode"] == "-rw-r--r--"
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["Content-Disposition"].startswith('attachment; filename="notes.txt"')
        assert "X-RateLimit-Limit" in resp.headers

        resp = await h.client.get(f"{base}/list?path=/tmp", headers=h.headers())
        listing = await resp.json()
        assert listing["path"] == "/tmp" and listing["count"] == 1
        assert listing["files"][0]["name"] == "notes.txt"
        assert listing["files"][0]["mod_time"] == "2024-05-01T12:00:00Z"
        # The path may come in a JSON body instead of the query.
        resp = await h.client.get(f"{base}/list", json={"path": "/srv"}, headers=h.headers())
        assert (await resp.json())["count"] == 1

        resp = await h.client.delete(base, json={"path": "/tmp/notes.txt"}, headers=h.headers())
        assert await resp.json() == {"message": "file deleted", "path": "/tmp/notes.txt"}
        resp = await h.client.get(f"{base}?path=/tmp/notes.txt", headers=h.headers())
        assert resp.status == 404
        assert (await resp.json())["error"] == "file not found"


async def test_mkdir_and_path_errors(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        base = f"/api/containers/{rec.id}/files"
        resp = await h.client.post(f"{base}/mkdir?path=/tmp/new", headers=h.headers())
        body = await resp.json()
        assert body["message"] == "directory created" and body["is_dir"] is True
        for method, url in (("POST", f"{base}/mkdir"), ("GET", base), ("DELETE", base)):
            resp = await h.client.request(method, url, headers=h.headers())
            assert resp.status == 400
            assert "path is required" in (await resp.json())["error"]
        resp = await h.client.delete(base, json={"path": ""}, headers=h.headers())
        assert resp.status == 400
        stopped = h.service.add(h.user_id(), "off", status="stopped")
        resp = await h.client.get(
            f"/api/containers/{stopped.id}/files/list?path=/", headers=h.headers()
        )
        assert resp.status == 409
        resp = await h.client.get(f"/api/containers/{rec.id}/files/list", headers=h.headers("bob"))
        assert resp.status == 404


async def test_upload_errors(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        base = f"/api/containers/{rec.id}/files"
        resp = await h.client.post(base, json={"path": "/tmp"}, headers=h.headers())
        assert resp.status == 400
        assert "multipart" in (await resp.json())["error"]
        form = aiohttp.FormData()
        form.add_field("other", b"x", filename="x")
        resp = await h.client.post(base, data=form, headers=h.headers())
        assert resp.status == 400
        assert (await resp.json())["error"] == "multipart field 'file' is required"
        resp = await h.client.post(base, data=_form(b"x", filename=".."), headers=h.headers())
        assert resp.status == 400


async def test_upload_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "UPLOAD_MAX_BYTES", 1000)
    monkeypatch.setattr(files, "_MULTIPART_SLACK", 500)
    async with harness(tmp_path) as h:
        rec = h.service.add(h.user_id(), "box")
        base = f"/api/containers/{rec.id}/files"
        # Told up front by Content-Length.
        resp = await h.client.post(base, data=_form(b"a" * 5000), headers=h.headers())
        assert resp.status == 413
        assert "too large" in (await resp.json())["error"]

        # No Content-Length (chunked): stopped while counting.
        async def body() -> AsyncIterator[bytes]:
            yield b"--XyZ\r\n"
            yield b'Content-Disposition: form-data; name="file"; filename="big"\r\n\r\n'
            for _ in range(10):
                yield b"b" * 500
            yield b"\r\n--XyZ--\r\n"

        resp = await h.client.post(
            base,
            data=body(),
            headers={**h.headers(), "Content-Type": "multipart/form-data; boundary=XyZ"},
        )
        assert resp.status == 413
        assert h.service.uploads == []
        resp = await h.client.post(base, data=_form(b"a" * 1000), headers=h.headers())
        assert resp.status == 200


async def test_content_disposition_is_safe() -> None:
    header = files._content_disposition('we"ird näme.txt')
    assert header.startswith('attachment; filename="we_ird n_me.txt"')
    assert unquote(header.split("UTF-8''", 1)[1]) == 'we"ird näme.txt'


async def test_images_and_roles(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        resp = await h.client.get("/api/images", headers=h.headers("alice-ro"))
        body = await resp.json()
        assert body["count"] == 2
        assert body["images"][0] == {
            "name": "ubuntu",
            "display_name": "Ubuntu",
            "description": "ubuntu image",
            "category": "linux",
            "tags": ["ubuntu"],
            "popular": True,
            "available": True,
            "aliases": [],
            "reference": None,
            "local": False,
        }
        resp = await h.client.get("/api/roles", headers=h.headers())
        assert await resp.json() == {
            "roles": [
                {"id": "dev", "name": "Developer", "description": "tools", "packages": ["git"]}
            ]
        }


async def test_image_import(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        tarball = b"\0" * (3 * 1024 * 1024 + 17)
        resp = await h.client.post(
            "/api/images/import?name=mine:1", data=io.BytesIO(tarball), headers=h.headers("root")
        )
        assert resp.status == 201
        assert await resp.json() == {
            "name": "mine:1",
            "digest": "sha256:0",
            "size": len(tarball),
            "layers": 1,
        }
        assert h.service.imports == [(tarball, "mine:1")]
        # Spooled under the state dir, and gone afterwards.
        tmp = h.cfg.state_dir / "tmp"
        assert tmp.is_dir() and list(tmp.iterdir()) == []
        assert tmp.stat().st_mode & 0o777 == 0o700
        # curl -F style.
        resp = await h.client.post(
            "/api/images/import", data=_form(b"tar"), headers=h.headers("root")
        )
        assert resp.status == 201
        assert h.service.imports[-1] == (b"tar", None)
        resp = await h.client.post("/api/images/import", data=b"", headers=h.headers("root"))
        assert resp.status == 400


async def test_image_store_routes_need_admin(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        pull = {"reference": "debian:bookworm", "name": "debian:12"}
        for method, path, kw in (
            ("post", "/api/images/pull", {"json": pull}),
            ("delete", "/api/images/local/free:1", {}),
            ("post", "/api/images/prune", {}),
            ("post", "/api/images/import?rootfs=true&name=r:1", {"data": b"x"}),
        ):
            resp = await getattr(h.client, method)(path, headers=h.headers(), **kw)
            assert resp.status == 403, path
            assert (await resp.json())["required_scope"] == "admin"
        assert h.service.pulls == [] and h.service.imports == []
        assert "free:1" in h.service.local

        resp = await h.client.post("/api/images/pull", json=pull, headers=h.headers("root"))
        assert resp.status == 201
        body = await resp.json()
        assert body["name"] == "debian:12" and body["layers_fetched"] == 1
        assert h.service.pulls == [("debian:bookworm", "debian:12")]
        resp = await h.client.post(
            "/api/images/pull", json={"reference": "missing:1"}, headers=h.headers("root")
        )
        assert resp.status == 404
        resp = await h.client.post("/api/images/pull", json={}, headers=h.headers("root"))
        assert resp.status == 400

        resp = await h.client.get("/api/images/local", headers=h.headers("alice-ro"))
        body = await resp.json()
        assert body["count"] == 3 and body["images"][0]["containers"] == 1

        # A name with a slash and a colon is one path parameter.
        resp = await h.client.delete("/api/images/local/team/tool:2", headers=h.headers("root"))
        assert resp.status == 200 and (await resp.json())["name"] == "team/tool:2"
        resp = await h.client.delete("/api/images/local/used:1", headers=h.headers("root"))
        assert resp.status == 409 and "in use" in (await resp.json())["error"]
        resp = await h.client.delete("/api/images/local/nope:1", headers=h.headers("root"))
        assert resp.status == 404

        resp = await h.client.post("/api/images/prune?all=maybe", headers=h.headers("root"))
        assert resp.status == 400
        resp = await h.client.post("/api/images/prune?all=true", headers=h.headers("root"))
        assert (await resp.json())["images_removed"] == ["free:1"]
        assert h.service.local == ["used:1"]

        resp = await h.client.post(
            "/api/images/import?rootfs=true&name=deb:1", data=b"tar", headers=h.headers("root")
        )
        assert resp.status == 201 and h.service.imports[-1] == (b"tar", "rootfs deb:1")
