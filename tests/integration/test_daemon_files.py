"""The file endpoints of a real daemon: upload, download, list, delete, mkdir, and
symlinks made inside a container that must never lead the daemon to a host file."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import ApiClient
from tests.integration.files_fixtures import F, box, daemon, form, upload

__all__ = ["box", "daemon"]  # fixtures used here


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_upload_download_list_delete_mkdir(
    daemon: Daemon, box: tuple[ApiClient, str], transport: str
) -> None:
    c0, name = box
    async with ApiClient(daemon, c0.token, transport) as c:
        r = (await c.post(F.format(name) + "/mkdir", params={"path": "/home/user/a/b"})).expect(200)
        assert r["is_dir"] is True and r["path"] == "/home/user/a/b"
        assert r["mode"].startswith("d")

        payload = secrets.token_bytes(300_000) + b"\0\n\xff"
        r = (await upload(c, name, "/home/user/a", payload, "blob.bin")).expect(200)
        assert r["name"] == "blob.bin" and r["path"] == "/home/user/a/blob.bin"
        assert r["size"] == len(payload) and r["is_dir"] is False
        # The container sees exactly those bytes.
        digest = hashlib.sha256(payload).hexdigest()
        assert (await c.sh(name, "sha256sum /home/user/a/blob.bin")).split()[0] == digest

        r = (await c.get(F.format(name), params={"path": "/home/user/a/blob.bin"})).expect(200)
        assert r.raw == payload
        assert r.headers["X-File-Size"] == str(len(payload))
        assert r.headers["X-File-Mode"] == "-rw-r--r--"
        disposition = r.headers["Content-Disposition"]
        assert disposition.startswith("attachment") and 'filename="blob.bin"' in disposition

        # A file made inside the container downloads too; the multipart "path" field and
        # the default directory (/home/user) work for uploads.
        await c.sh(name, "printf 'from inside' > /home/user/a/inside.txt")
        r = (await c.get(F.format(name), params={"path": "/home/user/a/inside.txt"})).expect(200)
        assert r.raw == b"from inside"
        (
            await c.post(F.format(name), data=form(b"field\n", "f.txt", path="/home/user/a/b"))
        ).expect(200)
        assert await c.sh(name, "cat /home/user/a/b/f.txt") == "field\n"
        (await upload(c, name, None, b"home\n", "h.txt")).expect(200)
        assert await c.sh(name, "cat /home/user/h.txt") == "home\n"
        # Re-upload replaces.
        (await upload(c, name, None, b"second\n", "h.txt")).expect(200)
        assert await c.sh(name, "cat /home/user/h.txt") == "second\n"

        listing = (await c.get(F.format(name) + "/list", params={"path": "/home/user/a"})).expect(
            200
        )
        body = listing.body
        assert body["path"] == "/home/user/a" and body["count"] == len(body["files"]) == 3
        entries = {e["name"]: e for e in body["files"]}
        assert set(entries) == {"b", "blob.bin", "inside.txt"}
        for e in body["files"]:
            assert {"name", "path", "size", "mode", "mod_time", "is_dir"} <= set(e)
        assert entries["b"]["is_dir"] is True and entries["blob.bin"]["size"] == len(payload)
        home = (await c.get(F.format(name) + "/list")).expect(200).body
        assert {"a", "h.txt"} <= {e["name"] for e in home["files"]}

        (await c.delete(F.format(name), params={"path": "/home/user/a/blob.bin"})).expect(200)
        (await c.get(F.format(name), params={"path": "/home/user/a/blob.bin"})).expect(404)
        # The path may come as a JSON body as well; a directory goes with its contents.
        (await c.request("DELETE", F.format(name), {"path": "/home/user/a"})).expect(200)
        assert await c.sh(name, "ls -A /home/user") == "h.txt\n"


async def test_file_errors(box: tuple[ApiClient, str]) -> None:
    c, name = box
    (await c.get(F.format(name), params={"path": "/nope"})).expect(404)
    (await c.get(F.format(name), params={"path": "/tmp"})).expect(400)  # a directory
    (await c.get(F.format(name))).expect(400)  # no path
    (await c.get(F.format(name) + "/list", params={"path": "/nope"})).expect(404)
    (await c.delete(F.format(name), params={"path": "/nope"})).expect(404)
    (await upload(c, name, "/nope", b"x", "x")).expect(404)
    (await c.post(F.format(name), data=b"not multipart")).expect(400)
    await c.sh(name, "echo x > /home/user/plain")
    (await c.post(F.format(name) + "/mkdir", params={"path": "/home/user/plain"})).expect(409)
    (await c.delete(F.format(name), params={"path": "/"})).expect(400)


async def test_proc_and_sys_through_the_files_api(box: tuple[ApiClient, str]) -> None:
    """The daemon (host root) reads and writes as the container sees things: no host
    process's /proc, no writable kernel knobs, no cgroup tree."""
    c, name = box
    f = F.format(name)
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_bytes()
    for path in ("/proc/self/environ", "/proc/thread-self/environ", "/proc/self/root/etc/passwd"):
        r = await c.get(f, params={"path": path})
        assert b"PYTHONUNBUFFERED" not in r.raw and r.status in (400, 404), (path, r.status)
    for path in ("/proc/1/root/etc/passwd", "/proc/1/cwd", "/proc/1/exe"):
        r = await c.get(f, params={"path": path})
        assert r.status in (400, 404), (path, r.status)
    # Not even the container's own init: /proc is refused as a whole (see below).
    r = await c.get(f, params={"path": "/proc/1/environ"})
    assert r.status == 400 and b"HOSTNAME=" not in r.raw, (r.status, r.raw[:200])
    for directory, fname in (("/proc/sys/kernel", "core_pattern"), ("/proc", "sysrq-trigger")):
        r = await upload(c, name, directory, b"|/tmp/rexecd-evil %p", fname)
        assert r.status in (400, 404, 409), (directory, r.status, r.raw[:200])
    r = await c.delete(f, params={"path": "/proc/sys/kernel/core_pattern"})
    assert r.status in (400, 404, 409), r.raw[:200]
    r = await c.post(f + "/mkdir", params={"path": "/sys/fs/cgroup/rexecd-evil"})
    assert r.status in (400, 404, 409), r.raw[:200]
    assert Path("/proc/sys/kernel/core_pattern").read_bytes() == core_pattern


async def test_kernel_files_are_refused_however_the_path_reaches_them(
    box: tuple[ApiClient, str],
) -> None:
    """The daemon reads as host root: through the container's /proc and /sys it would
    see what the container cannot (real kernel addresses in /proc/kallsyms, /proc/iomem,
    other tasks' kernel stacks). Paths on proc or sysfs are refused, whether named,
    reached through a symlink made inside, or through ``..``."""
    c, name = box
    f = F.format(name)
    # What the container itself sees: zeroed addresses (it lacks CAP_SYSLOG).
    inside = await c.sh(name, "head -n 3 /proc/kallsyms")
    assert all(ln.split()[0].strip("0") == "" for ln in inside.splitlines()), inside
    await c.sh(name, "ln -s /proc /home/user/p && ln -s /sys/kernel /home/user/k")
    for path in (
        "/proc/kallsyms",
        "/proc/iomem",
        "/proc/1/stack",
        "/proc/version",
        "/sys/kernel/notes",
        "/sys/kernel/vmcoreinfo",
        "/sys/class/net/lo/address",
        "/home/user/p/kallsyms",
        "/home/user/p/1/stack",
        "/home/user/k/notes",
        "/home/user/../../proc/iomem",
        "/tmp/../proc/kallsyms",
    ):
        r = await c.get(f, params={"path": path})
        assert r.status == 400, (path, r.status, r.raw[:200])
        assert "kernel file system" in r.body["error"], (path, r.body)
    for path in ("/proc", "/proc/1", "/sys", "/sys/kernel", "/home/user/p", "/home/user/k"):
        r = await c.get(f + "/list", params={"path": path})
        assert r.status == 400, (path, r.status, r.raw[:200])
    # The rest of the container is served as before.
    listing = (await c.get(f + "/list", params={"path": "/"})).expect(200).body
    assert {"proc", "sys", "etc"} <= {e["name"] for e in listing["files"]}
    (await c.get(f, params={"path": "/etc/passwd"})).expect(200)


async def test_unicode_names_and_recursive_delete_of_links(
    box: tuple[ApiClient, str], tmp_path: Path
) -> None:
    c, name = box
    f = F.format(name)
    fname = 'résumé "ü" 1.txt'
    (await upload(c, name, "/home/user", b"uni\n", fname)).expect(200)
    r = (await c.get(f, params={"path": f"/home/user/{fname}"})).expect(200)
    assert r.raw == b"uni\n"
    disposition = r.headers["Content-Disposition"]
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9" in disposition, disposition
    names = {e["name"] for e in (await c.get(f + "/list")).expect(200).body["files"]}
    assert fname in names

    # Deleting a directory that holds links to host paths removes the links only.
    host_dir = tmp_path / "victim"
    host_dir.mkdir()
    (host_dir / "keep").write_text("keep\n")
    await c.sh(name, f"mkdir -p /home/user/d/e && ln -s {host_dir} /home/user/d/e/link")
    await c.sh(name, "ln -s ../../.. /home/user/d/up && ln -s /etc/passwd /home/user/d/pw")
    listing = (await c.get(f + "/list", params={"path": "/home/user/d"})).expect(200).body
    modes = {e["name"]: e["mode"] for e in listing["files"]}
    assert modes["up"].startswith("l") and modes["pw"].startswith("l")
    (await c.delete(f, params={"path": "/home/user/d"})).expect(200)
    assert (host_dir / "keep").read_text() == "keep\n"
    assert await c.sh(name, "cat /etc/passwd | head -1") == "root:x:0:0:root:/root:/bin/sh\n"
    assert Path("/etc/passwd").exists()


async def test_upload_over_100_mb_is_refused_before_reading(
    daemon: Daemon, box: tuple[ApiClient, str]
) -> None:
    """A Content-Length past the cap is answered 413 at once, without sending the body."""
    c, name = box
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        head = (
            f"POST /api/containers/{name}/files?path=/tmp HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {c.token}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\n"
            f"Content-Length: {200 * 1024 * 1024}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 15)
        assert status_line.split()[1] == b"413", status_line
    finally:
        writer.close()
    assert await c.sh(name, "ls -A /tmp") == ""


async def test_files_need_a_running_container(box: tuple[ApiClient, str]) -> None:
    c, name = box
    (await c.post(f"/api/containers/{name}/stop")).expect(200)
    for r in (
        await c.get(F.format(name) + "/list"),
        await c.get(F.format(name), params={"path": "/etc/passwd"}),
        await upload(c, name, None, b"x", "x"),
        await c.post(F.format(name) + "/mkdir", params={"path": "/home/user/d"}),
        await c.delete(F.format(name), params={"path": "/etc/passwd"}),
    ):
        r.expect(409)


def _fingerprint(p: Path) -> tuple[int, int, int, str]:
    st = p.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()


async def test_symlinks_inside_the_container_never_reach_the_host(
    box: tuple[ApiClient, str], tmp_path: Path
) -> None:
    c, name = box
    shadow = Path("/etc/shadow")
    shadow_before = _fingerprint(shadow)
    # A host file the container's links aim at, in a host directory the container
    # also has (/tmp): a resolution outside the container's root would find it.
    canary_name = f"rexecd-canary-{secrets.token_hex(4)}"
    canary = Path("/tmp") / canary_name
    canary.write_bytes(b"host canary\n")
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    (host_dir / "keep").write_text("keep\n")
    try:
        await c.sh(
            name,
            " && ".join(
                [
                    "cd /home/user",
                    "ln -s /etc/shadow shadow",
                    "ln -s ../../.. up",
                    "ln -s ../../../../../../../.. way-up",
                    "ln -s /etc etclink",
                    f"ln -s /tmp/{canary_name} canary",
                    f"ln -s {host_dir} hostdir",
                    "ln -s /proc/1/root procroot",
                ]
            ),
        )
        f = F.format(name)

        # Downloads: never the host's bytes.
        for path in (
            "/home/user/shadow",
            "/home/user/up/etc/shadow",
            "/home/user/way-up/etc/shadow",
            "/home/user/etclink/shadow",
            "/../../../etc/shadow",
            "/home/user/canary",
            f"/home/user/up/tmp/{canary_name}",
            f"/home/user/way-up/tmp/{canary_name}",
            "/home/user/hostdir/keep",
            "/home/user/procroot/etc/shadow",
        ):
            r = await c.get(f, params={"path": path})
            assert r.status in (400, 404), (path, r.status, r.raw[:200])
            assert b"host canary" not in r.raw and b"root:" not in r.raw

        # Listing through a link shows the container's directory, not the host's.
        r = (await c.get(f + "/list", params={"path": "/home/user/way-up/etc"})).expect(200)
        names = {e["name"] for e in r.body["files"]}
        assert "passwd" in names and "shadow" not in names and "debian_version" not in names
        r = (await c.get(f + "/list", params={"path": "/home/user/way-up/tmp"})).expect(200)
        assert canary_name not in {e["name"] for e in r.body["files"]}
        r = await c.get(f + "/list", params={"path": "/home/user/hostdir"})
        assert r.status in (400, 404), r.raw[:200]

        # Uploads through a linked directory land inside the container.
        (await upload(c, name, "/home/user/way-up/tmp", b"pwned\n", canary_name)).expect(200)
        (await upload(c, name, "/home/user/etclink", b"pwned\n", "rexecd-escape")).expect(200)
        assert not Path("/etc/rexecd-escape").exists()
        assert await c.sh(name, "cat /etc/rexecd-escape") == "pwned\n"
        r = await upload(c, name, "/home/user/hostdir", b"pwned\n", "keep")
        assert r.status in (400, 404), r.raw[:200]
        r = await upload(c, name, "/home/user/procroot/tmp", b"pwned\n", canary_name)
        assert r.status in (400, 404), r.raw[:200]
        # Uploading onto the link itself replaces the link, not its target.
        (await upload(c, name, "/home/user", b"pwned\n", "canary")).expect(200)

        # mkdir through links stays inside too.
        mk = f"rexecd-mk-{secrets.token_hex(3)}"
        (await c.post(f + "/mkdir", params={"path": f"/home/user/way-up/tmp/{mk}"})).expect(200)
        assert not (Path("/tmp") / mk).exists()
        r = await c.post(f + "/mkdir", params={"path": f"/home/user/hostdir/{mk}"})
        assert r.status in (400, 404) and not (host_dir / mk).exists()

        # Deletes through links never remove a host file; deleting a link removes the link.
        for path in (
            f"/home/user/up/tmp/{canary_name}",
            "/home/user/way-up/etc/shadow",
            "/home/user/hostdir/keep",
            "/home/user/procroot/etc/shadow",
        ):
            r = await c.delete(f, params={"path": path})
            if r.status == 200:  # only the container's own copy may go
                assert path.endswith(canary_name), path
            else:
                assert r.status in (400, 404), (path, r.status)
        (await c.delete(f, params={"path": "/home/user/shadow"})).expect(200)
        (await c.delete(f, params={"path": "/home/user/hostdir"})).expect(200)
        (await c.delete(f, params={"path": "/home/user/etclink"})).expect(200)
        assert await c.sh(name, "ls /etc/passwd") == "/etc/passwd\n"

        assert _fingerprint(shadow) == shadow_before
        assert canary.read_bytes() == b"host canary\n"
        assert (host_dir / "keep").read_text() == "keep\n"
        assert sorted(os.listdir(host_dir)) == ["keep"]
    finally:
        canary.unlink(missing_ok=True)
