"""The REST API of a real ``rexecd serve``, driven like a client over TCP and the unix
socket: system endpoints, container lifecycle, volumes, settings, stats, images,
image import and tokens."""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.daemon import Daemon
from tests.integration.daemon_fixtures import (
    LAYERED_TAR,
    ApiClient,
    MiB,
    cgroup_dirs,
    cleaning,
    cpu_quota,
    leftovers,
    memory_limit_file,
    pid_alive,
    poll,
    running_daemon,
    unique,
    volume_image,
)

HEX64 = re.compile(r"^[0-9a-f]{64}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
CONTAINER_KEYS = {
    "id",
    "db_id",
    "user_id",
    "name",
    "image",
    "role",
    "status",
    "created_at",
    "last_used_at",
    "idle_seconds",
    "ip_address",
    "expires_at",
    "resources",
}
STATS_KEYS = {
    "cpu_percent",
    "cpu_usage_usec",
    "memory",
    "memory_limit",
    "pids",
    "disk_read",
    "disk_write",
    "disk_usage",
    "disk_limit",
    "net_rx",
    "net_tx",
    "oom_kills",
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory) as d:
        yield d


def check_container_object(c: dict[str, Any]) -> None:
    assert set(c) >= CONTAINER_KEYS, set(c) ^ CONTAINER_KEYS
    assert HEX64.match(c["id"]) and UUID.match(c["db_id"])
    assert RFC3339.match(c["created_at"]) and RFC3339.match(c["last_used_at"])
    assert set(c["resources"]) >= {"memory_mb", "cpu_shares", "disk_mb", "network_mbps"}
    assert c["status"] in ("creating", "configuring", "running", "stopped", "error", "expired")


# ------------------------------------------------------------------ system


def test_health_needs_no_token_and_version_openapi_do(daemon: Daemon) -> None:
    with urllib.request.urlopen(f"{daemon.url}/health", timeout=10) as r:
        health = json.loads(r.read())
    assert r.status == 200
    assert health["status"] == "ok"
    assert {"containers_total", "containers_running", "cgroup", "version"} <= set(health)
    assert health["cgroup"] in ("v1", "v2")
    tok = daemon.token(unique("sys"))
    req = urllib.request.Request(f"{daemon.url}/api/version")
    req.add_header("Authorization", f"Bearer {tok}")
    with urllib.request.urlopen(req, timeout=10) as r:
        version = json.loads(r.read())
    assert set(version) == {"version", "build"} and version["version"] == health["version"]
    # The unix socket is for root and the daemon's group only.
    assert daemon.sock.stat().st_mode & 0o777 == 0o660


async def test_openapi_documents_every_endpoint(daemon: Daemon) -> None:
    tok = daemon.token(unique("oapi"))
    async with ApiClient(daemon, tok, "unix") as c:
        doc = (await c.get("/api/openapi.json")).expect(200).body
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    want = {
        ("get", "/api/containers"),
        ("post", "/api/containers"),
        ("post", "/api/containers/stream"),
        ("get", "/api/containers/{id}"),
        ("delete", "/api/containers/{id}"),
        ("post", "/api/containers/{id}/start"),
        ("post", "/api/containers/{id}/stop"),
        ("post", "/api/containers/{id}/restart"),
        ("patch", "/api/containers/{id}/settings"),
        ("post", "/api/containers/{id}/exec"),
        ("get", "/api/containers/{id}/stats"),
        ("post", "/api/containers/{id}/files"),
        ("get", "/api/containers/{id}/files"),
        ("delete", "/api/containers/{id}/files"),
        ("get", "/api/containers/{id}/files/list"),
        ("post", "/api/containers/{id}/files/mkdir"),
        ("get", "/api/images"),
        ("get", "/api/roles"),
        ("post", "/api/images/import"),
        ("post", "/api/images/pull"),
        ("get", "/api/images/local"),
        ("delete", "/api/images/local/{ref}"),
        ("post", "/api/images/prune"),
        ("post", "/api/tokens"),
        ("get", "/api/tokens"),
        ("get", "/api/tokens/validate"),
        ("delete", "/api/tokens/{token_id}"),
        ("get", "/api/version"),
        ("get", "/health"),
        ("get", "/api/containers/events"),
    }
    have = {(m, p) for p, ops in paths.items() for m in ops}
    assert want <= have, want - have


async def test_health_counts_follow_containers(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("hc"))) as c, cleaning(c) as refs:
        before = (await c.get("/health", anonymous=True)).expect(200).body
        created = await c.create_running(unique())
        refs.append(created["id"])
        after = (await c.get("/health", anonymous=True)).expect(200).body
        assert after["containers_total"] == before["containers_total"] + 1
        assert after["containers_running"] == before["containers_running"] + 1


# ------------------------------------------------------------------ create, get, list


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_create_is_async_then_running_and_found_by_every_ref(
    daemon: Daemon, transport: str
) -> None:
    name = unique()
    async with ApiClient(daemon, daemon.token(unique("u")), transport) as c, cleaning(c) as refs:
        r = (await c.create(name, environment={"GREETING": "hi"}, labels={"k": "v"})).expect(202)
        refs.append(name)
        c0 = r.body
        check_container_object(c0)
        assert c0["async"] is True
        assert c0["status"] == "creating"
        assert c0["name"] == name and c0["image"] == "busybox"
        running = await c.wait_status(c0["id"], "running")
        check_container_object(running)
        assert "async" not in running
        assert ipaddress.ip_address(running["ip_address"]) in ipaddress.ip_network(daemon.subnet)
        for ref in (c0["id"], c0["db_id"], name):
            got = await c.container(ref)
            assert (got["id"], got["db_id"], got["name"]) == (c0["id"], c0["db_id"], name)
            assert got["status"] == "running"
        # The environment reached the container.
        assert await c.sh(name, "echo $GREETING") == "hi\n"
        # Real kernel objects exist while it runs.
        assert cgroup_dirs(daemon, c0["id"])


async def test_create_without_name_generates_one(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("gen"))) as c, cleaning(c) as refs:
        r = (await c.create(None)).expect(202)
        refs.append(r["id"])
        assert re.match(r"^[a-z]+-[a-z]+-\d\d$", r["name"]), r["name"]
        await c.wait_status(r["name"], "running")


async def test_list_is_newest_first_with_count_and_limit(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("list"))) as c, cleaning(c) as refs:
        empty = (await c.get("/api/containers")).expect(200).body
        assert empty == {"containers": [], "count": 0, "limit": 5}
        names = [unique("l") for _ in range(3)]
        for n in names:
            (await c.create(n)).expect(202)
            refs.append(n)
            await c.wait_status(n, "running")
        body = (await c.get("/api/containers")).expect(200).body
        assert body["count"] == 3 and body["limit"] == 5
        assert [x["name"] for x in body["containers"]] == names[::-1]
        for x in body["containers"]:
            check_container_object(x)
        stamps = [x["created_at"] for x in body["containers"]]
        assert stamps == sorted(stamps, reverse=True)
        # Another user sees none of them.
        async with ApiClient(daemon, daemon.token(unique("other"))) as other:
            assert (await other.get("/api/containers")).expect(200)["count"] == 0


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_stream_reports_every_stage_through_ready(daemon: Daemon, transport: str) -> None:
    name = unique("s")
    async with ApiClient(daemon, daemon.token(unique("sse")), transport) as c, cleaning(c) as refs:
        refs.append(name)
        status, headers, frames = await c.stream_create({"image": "busybox", "name": name})
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        stages = [f["stage"] for f in frames]
        order = ["validating", "pulling", "creating", "starting", "configuring", "ready"]
        assert stages == order, stages
        progress = [f["progress"] for f in frames]
        assert progress == sorted(progress) and progress[-1] == 100
        assert all(0 <= p <= 100 for p in progress)
        assert not any(f["complete"] for f in frames[:-1])
        last = frames[-1]
        assert last["complete"] is True and "error" not in last
        assert last["container"]["status"] == "running" and last["container"]["name"] == name
        assert last["container_id"] == last["container"]["id"]
        assert (await c.container(name))["status"] == "running"


async def test_stream_client_leaving_early_does_not_stop_the_create(daemon: Daemon) -> None:
    name = unique("gone")
    async with ApiClient(daemon, daemon.token(unique("gone"))) as c, cleaning(c) as refs:
        refs.append(name)
        assert c.session is not None
        async with c.session.post(
            c.base + "/api/containers/stream",
            json={"image": "busybox", "name": name},
            headers=c.auth(),
        ) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert first.startswith(b"data:")
            r.close()  # the client goes away after the first frame
        running = await c.wait_status(name, "running")
        assert await c.sh(name, "echo fine") == "fine\n"
        assert running["name"] == name


# ------------------------------------------------------------------ lifecycle


async def test_start_stop_restart_transitions_and_conflicts(daemon: Daemon) -> None:
    name = unique("life")
    async with ApiClient(daemon, daemon.token(unique("life"))) as c, cleaning(c) as refs:
        c0 = await c.create_running(name)
        refs.append(name)
        pid0 = _init_pid(daemon, c0["db_id"])
        assert pid_alive(pid0)

        r = (await c.post(f"/api/containers/{name}/start")).expect(409)
        assert r["error"] and r.body.get("status") == "running"

        r = (await c.post(f"/api/containers/{c0['id']}/stop")).expect(200)
        assert r.body == {
            "message": "container stopped",
            "id": c0["id"],
            "name": name,
            "status": "stopped",
        }
        assert (await c.container(name))["status"] == "stopped"
        assert not pid_alive(pid0)
        assert leftovers(daemon, c0, lease=False) == {}

        (await c.post(f"/api/containers/{name}/stop")).expect(409)
        (await c.exec(name, "true")).expect(409)

        r = (await c.post(f"/api/containers/{c0['db_id']}/start")).expect(200)
        assert r.body == {
            "message": "container started",
            "id": c0["id"],
            "name": name,
            "status": "running",
        }
        c1 = await c.container(name)
        assert c1["status"] == "running" and c1["id"] == c0["id"]
        assert c1["ip_address"] == c0["ip_address"]
        pid1 = _init_pid(daemon, c0["db_id"])
        assert pid1 != pid0
        assert await c.sh(name, "echo back") == "back\n"

        # Restart from running: a new init, still running.
        r = (await c.post(f"/api/containers/{name}/restart")).expect(200)
        assert r["status"] == "running" and r["id"] == c0["id"]
        pid2 = _init_pid(daemon, c0["db_id"])
        assert pid2 != pid1 and not pid_alive(pid1) and pid_alive(pid2)

        # Restart from stopped starts it; stop with an explicit timeout works too.
        (await c.post(f"/api/containers/{name}/stop?timeout=0")).expect(200)
        r = (await c.post(f"/api/containers/{name}/restart")).expect(200)
        assert r["status"] == "running"
        assert (await c.container(name))["status"] == "running"
        assert await c.sh(name, "echo again") == "again\n"


async def test_stop_kills_processes_that_ignore_sigterm(daemon: Daemon) -> None:
    name = unique("term")
    async with ApiClient(daemon, daemon.token(unique("term"))) as c, cleaning(c) as refs:
        c0 = await c.create_running(name)
        refs.append(name)
        await c.sh(name, "(trap '' TERM; exec sleep 1000) >/dev/null 2>&1 & echo started")
        r = (await c.post(f"/api/containers/{name}/stop?timeout=1")).expect(200)
        assert r["status"] == "stopped"
        assert leftovers(daemon, c0, lease=False) == {}


async def test_delete_keeps_home_volume_unless_asked(daemon: Daemon) -> None:
    name = unique("vol")
    async with ApiClient(daemon, daemon.token(unique("vol"))) as c, cleaning(c) as refs:
        refs.append(name)
        c0 = await c.create_running(name)
        await c.sh(name, "echo precious > /home/user/keep.txt && echo scratch > /tmp/x")
        r = (await c.delete(f"/api/containers/{name}")).expect(200)
        assert r.body == {
            "message": "container deleted",
            "id": c0["id"],
            "db_id": c0["db_id"],
            "name": name,
        }
        (await c.get(f"/api/containers/{name}")).expect(404)
        assert leftovers(daemon, c0) == {}
        assert volume_image(daemon, c0["user_id"], name).exists()  # the kept volume

        c1 = await c.create_running(name)
        assert c1["id"] != c0["id"]
        assert await c.sh(name, "cat /home/user/keep.txt") == "precious\n"
        # Only the home volume is kept, not the container's own layer.
        assert (await c.exec(name, "cat /tmp/x")).expect(200)["exit_code"] != 0

        image = volume_image(daemon, c1["user_id"], name)
        (await c.delete(f"/api/containers/{name}?volumes=true")).expect(200)
        assert leftovers(daemon, c1) == {}
        assert not image.exists()
        await c.create_running(name)
        r = (await c.exec(name, "ls -A /home/user")).expect(200)
        assert r["exit_code"] == 0 and r["stdout"] == ""


async def test_volume_belongs_to_its_user(daemon: Daemon) -> None:
    name = unique("shared")
    async with (
        ApiClient(daemon, daemon.token(unique("va"))) as a,
        ApiClient(daemon, daemon.token(unique("vb"))) as b,
        cleaning(a) as refs_a,
        cleaning(b) as refs_b,
    ):
        refs_a.append(name)
        refs_b.append(name)
        await a.create_running(name)
        await a.sh(name, "echo mine > /home/user/secret")
        (await a.delete(f"/api/containers/{name}")).expect(200)
        await b.create_running(name)
        assert await b.sh(name, "ls -A /home/user") == ""


# ------------------------------------------------------------------ settings and stats


async def test_settings_rename_and_resize_live(daemon: Daemon) -> None:
    name, new = unique("set"), unique("renamed")
    async with ApiClient(daemon, daemon.token(unique("set"))) as c, cleaning(c) as refs:
        refs.extend([name, new])
        c0 = await c.create_running(name, memory_mb=128, cpu_shares=500)
        assert c0["resources"]["memory_mb"] == 128 and c0["resources"]["cpu_shares"] == 500
        pid0 = _init_pid(daemon, c0["db_id"])
        mem_file = memory_limit_file(daemon, c0["id"])
        assert int(mem_file.read_text()) == 128 * MiB

        r = (await c.patch(f"/api/containers/{name}/settings", {"memory_mb": 96})).expect(200)
        assert r["message"] == "settings updated" and r["restarted"] is False
        assert r["container"]["resources"]["memory_mb"] == 96
        assert int(mem_file.read_text()) == 96 * MiB
        assert _init_pid(daemon, c0["db_id"]) == pid0 and pid_alive(pid0)

        r = (await c.patch(f"/api/containers/{c0['id']}/settings", {"cpu_shares": 1500})).expect(
            200
        )
        assert r["container"]["resources"]["cpu_shares"] == 1500
        quota = cpu_quota(daemon, c0["id"])
        if quota is not None:
            assert quota[0] * 1000 // quota[1] == 1500
        assert _init_pid(daemon, c0["db_id"]) == pid0

        # Past the tier maximum: clamped, not refused.
        r = (await c.patch(f"/api/containers/{name}/settings", {"memory_mb": 999999})).expect(200)
        assert r["container"]["resources"]["memory_mb"] == 2048
        assert int(mem_file.read_text()) == 2048 * MiB

        r = (await c.patch(f"/api/containers/{name}/settings", {"name": new})).expect(200)
        assert r["container"]["name"] == new and r["container"]["id"] == c0["id"]
        (await c.get(f"/api/containers/{name}")).expect(404)
        assert (await c.container(new))["status"] == "running"
        # A rename may restart the container (its volume is mounted under its name);
        # the answer says so, and the sizes set above survive it.
        assert (_init_pid(daemon, c0["db_id"]) != pid0) is r["restarted"]
        assert int(mem_file.read_text()) == 2048 * MiB

        # A stopped container takes new sizes for its next start.
        (await c.post(f"/api/containers/{new}/stop")).expect(200)
        r = (await c.patch(f"/api/containers/{new}/settings", {"memory_mb": 64})).expect(200)
        assert r["container"]["status"] == "stopped"
        (await c.post(f"/api/containers/{new}/start")).expect(200)
        assert int(memory_limit_file(daemon, c0["id"]).read_text()) == 64 * MiB


async def test_rename_keeps_home_volume(daemon: Daemon) -> None:
    """Data in /home/user survives a rename and the next start."""
    name, new = unique("rn"), unique("rn2")
    async with ApiClient(daemon, daemon.token(unique("rn"))) as c, cleaning(c) as refs:
        refs.extend([name, new])
        await c.create_running(name)
        await c.sh(name, "echo kept > /home/user/f")
        (await c.patch(f"/api/containers/{name}/settings", {"name": new})).expect(200)
        (await c.post(f"/api/containers/{new}/restart")).expect(200)
        r = (await c.exec(new, "cat /home/user/f")).expect(200)
        assert r["stdout"] == "kept\n", r.body
        # The volume went with the name: a new container with the old name starts empty.
        await c.create_running(name)
        assert await c.sh(name, "ls -A /home/user") == ""
        # A rename onto a live name or onto a kept volume's name is refused.
        r = (await c.patch(f"/api/containers/{new}/settings", {"name": name})).expect(409)
        assert r["error"] == "container with this name already exists"
        (await c.delete(f"/api/containers/{name}")).expect(200)  # its volume is kept
        (await c.patch(f"/api/containers/{new}/settings", {"name": name})).expect(409)
        assert (await c.container(new))["name"] == new
        assert await c.sh(new, "cat /home/user/f") == "kept\n"


async def test_disk_quota_is_enforced_and_grows_live(daemon: Daemon) -> None:
    name = unique("disk")
    async with ApiClient(daemon, daemon.token(unique("disk"))) as c, cleaning(c) as refs:
        refs.append(name)
        c0 = await c.create_running(name, disk_mb=32)
        assert c0["resources"]["disk_mb"] == 32
        s = (await c.get(f"/api/containers/{name}/stats")).expect(200).body
        assert s["disk_limit"] == 32 * MiB
        # Home and the writable root share the quota: 48 MB do not fit in either.
        for path in ("/home/user/big", "/tmp/big"):
            r = (await c.exec(name, f"dd if=/dev/zero of={path} bs=1M count=48")).expect(200)
            assert r["exit_code"] != 0 and "space" in r["stderr"].lower(), r.body
            await c.sh(name, f"rm -f {path}")
        await c.sh(name, "echo marker > /home/user/marker")
        r = (await c.patch(f"/api/containers/{name}/settings", {"disk_mb": 96})).expect(200)
        assert r["container"]["resources"]["disk_mb"] == 96
        assert (await c.container(name))["status"] == "running"
        # The volume grows online where the kernel lets the daemon, else at the next
        # start (this VM's daemon lacks CAP_SYS_RESOURCE): restart to be sure.
        (await c.post(f"/api/containers/{name}/restart")).expect(200)
        await c.sh(name, "dd if=/dev/zero of=/home/user/big bs=1M count=48 2>&1")
        assert await c.sh(name, "cat /home/user/marker") == "marker\n"
        s = (await c.get(f"/api/containers/{name}/stats")).expect(200).body
        assert s["disk_limit"] == 96 * MiB and s["disk_usage"] >= 48 * MiB
        # Shrinking is refused rather than losing data.
        (await c.patch(f"/api/containers/{name}/settings", {"disk_mb": 32})).expect(400)


async def test_stats_of_running_and_stopped(daemon: Daemon) -> None:
    name = unique("st")
    async with ApiClient(daemon, daemon.token(unique("st"))) as c, cleaning(c) as refs:
        refs.append(name)
        await c.create_running(name, memory_mb=200)
        await c.sh(name, "head -c 200000 /dev/zero > /home/user/blob")
        s = (await c.get(f"/api/containers/{name}/stats")).expect(200).body
        assert set(s) == STATS_KEYS
        assert s["memory"] > 0 and s["pids"] >= 1
        assert s["memory_limit"] == 200 * MiB
        assert s["cpu_usage_usec"] > 0
        assert s["disk_usage"] >= 200000 and s["disk_limit"] > 0
        for k in STATS_KEYS:
            assert isinstance(s[k], int | float) and s[k] >= 0, (k, s[k])
        (await c.post(f"/api/containers/{name}/stop")).expect(200)
        s = (await c.get(f"/api/containers/{name}/stats")).expect(200).body
        assert s["pids"] == 0 and s["memory"] == 0


# ------------------------------------------------------------------ images and roles


async def test_images_and_roles(daemon: Daemon) -> None:
    async with ApiClient(daemon, daemon.token(unique("img"), scopes="read")) as c:
        body = (await c.get("/api/images")).expect(200).body
        images = {i["name"]: i for i in body["images"]}
        keys = {"name", "display_name", "description", "category", "tags", "popular", "available"}
        for i in body["images"]:
            assert keys <= set(i), i
        # The test image fills the catalogue's busybox:latest (alias busybox).
        assert images["busybox:latest"]["available"] is True
        assert images["busybox:latest"]["local"] is True
        assert "busybox" in images["busybox:latest"]["aliases"]
        # Not local, and the test daemons never pull (registries.pull is off).
        assert images["debian:bookworm"]["available"] is False
        roles = (await c.get("/api/roles")).expect(200).body["roles"]
        assert roles
        for role in roles:
            assert {"id", "name", "description", "packages"} <= set(role)
            assert isinstance(role["packages"], list)


async def test_image_import_needs_admin_then_image_is_usable(daemon: Daemon) -> None:
    ref = f"{unique('imp')}:v1"
    data = LAYERED_TAR.read_bytes()
    writer = daemon.token(unique("w"))
    admin = daemon.token(unique("adm"), tier="pro", scopes="read,write,admin")
    async with ApiClient(daemon, writer) as c, cleaning(c) as refs:
        r = (await c.post("/api/images/import", params={"name": ref}, data=data)).expect(403)
        assert r["error"]
        r = (
            await c.post("/api/images/import", params={"name": ref}, data=data, token=admin)
        ).expect(201)
        assert r["name"] == ref and r["layers"] == 3
        assert r["digest"].startswith("sha256:") and r["size"] > 0
        images = (await c.get("/api/images")).expect(200).body["images"]
        assert ref in {i["name"] for i in images}

        name = unique("lay")
        refs.append(name)
        await c.create_running(name, image=ref)
        assert await c.sh(name, "cat /etc/replaceme; echo $LAYERED") == "new\n1\n"
        assert (await c.exec(name, "test -e /etc/deleteme")).expect(200)["exit_code"] == 1


# ------------------------------------------------------------------ tokens


async def test_token_create_list_validate_revoke(daemon: Daemon) -> None:
    user = unique("tok")
    first = daemon.token(user)
    async with ApiClient(daemon, first, "unix") as c:
        r = (await c.post("/api/tokens", {"name": "ci", "scopes": ["read"]})).expect(201)
        new = r.body
        assert {"token", "id", "name", "token_prefix", "scopes", "expires_at", "created_at"} <= set(
            new
        )
        assert re.match(r"^rexec_[0-9a-f]{48}$", new["token"])
        assert new["token"].startswith(new["token_prefix"])
        assert new["scopes"] == ["read"] and new["expires_at"] is None

        r = (await c.post("/api/tokens", {"name": "short", "expires_in": 1})).expect(201)
        assert r["expires_at"] is not None and RFC3339.match(r["expires_at"])

        listed = (await c.get("/api/tokens")).expect(200).body
        assert listed["count"] == len(listed["tokens"]) == 3
        assert new["id"] in {t["id"] for t in listed["tokens"]}
        assert all("token" not in t for t in listed["tokens"])  # the secret is shown once
        assert new["token"] not in json.dumps(listed)

        v = (await c.get("/api/tokens/validate", token=new["token"])).expect(200).body
        assert v["valid"] is True and v["user_name"] == user and v["tier"] == "free"
        assert v["scopes"] == ["read"] and v["token_id"] == new["id"]
        # The new read token works for reads but cannot create.
        (await c.get("/api/containers", token=new["token"])).expect(200)
        (await c.create(unique(), token=new["token"])).expect(403)

        r = (await c.delete(f"/api/tokens/{new['id']}")).expect(200)
        r = (await c.get("/api/tokens/validate", token=new["token"])).expect(401)
        assert r.body == {"error": "Invalid or expired API token", **_extra(r.body)}
        (await c.get("/api/containers", token=new["token"])).expect(401)
        # The token used for the revocation still works; another user's token id is 404.
        (await c.get("/api/tokens/validate")).expect(200)
    async with ApiClient(daemon, daemon.token(unique("tok2"))) as other:
        (await other.delete(f"/api/tokens/{v['token_id']}")).expect(404)


# ------------------------------------------------------------------ helpers


def _extra(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "error"}


def _init_pid(d: Daemon, db_id: str) -> int:
    from tests.integration.daemon_fixtures import db_rows

    rows = poll(
        lambda: db_rows(d, "SELECT pid FROM containers WHERE db_id = ?", db_id),
        what="container row",
    )
    pid = rows[0][0]
    assert pid is not None
    return int(pid)
