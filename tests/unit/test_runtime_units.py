"""Pure parts of the runtime and service layers: specs, sync messages, users, events,
scrollback, env merging. No root, no kernel side effects."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from rexecd.errors import InvalidRequest
from rexecd.models import ContainerRecord, ContainerResources, Event
from rexecd.runtime import sync
from rexecd.runtime.container import merge_env
from rexecd.runtime.spec import ContainerSpec, ExecSpec, ProcessSpec, RootfsSpec
from rexecd.runtime.users import Identity, resolve_user
from rexecd.service.events import QUEUE_BOUND, EventBus
from rexecd.service.terminals import Scrollback


def _spec() -> ContainerSpec:
    return ContainerSpec(
        id="c1",
        hostname="h",
        rootfs=RootfsSpec(lowerdirs=["/l"], upperdir="/u", workdir="/w", target="/t"),
        process=ProcessSpec(args=["sh"], env=["A=1"]),
    )


def test_spec_round_trips_through_dict() -> None:
    spec = _spec()
    assert ContainerSpec.from_dict(spec.to_dict()) == spec


def test_spec_rejects_unknown_fields() -> None:
    data = _spec().to_dict()
    data["process"]["evil"] = 1
    with pytest.raises(ValueError, match="unknown fields"):
        ContainerSpec.from_dict(data)


def test_exec_spec_needs_a_command() -> None:
    with pytest.raises(ValueError, match="needs a command"):
        ExecSpec(container_pid=1, process=ProcessSpec(args=[]))


def test_sync_messages_carry_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        sync.send(a, sync.ChildError(step="mount", errno=2, message="gone"), [r])
        msg, fds = sync.recv(b)
        assert msg == sync.ChildError(step="mount", errno=2, message="gone")
        assert len(fds) == 1
        os.close(fds[0])
        a.close()
        assert sync.recv(b) == (None, [])
    finally:
        b.close()
        os.close(r)
        os.close(w)


def test_sync_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown sync message"):
        sync.decode(b'{"type": "boom"}')


def test_exit_status_maps_signals() -> None:
    assert sync.exit_status(3 << 8) == 3
    assert sync.exit_status(9) == 128 + 9


def test_merge_env_overrides_and_keeps_path() -> None:
    assert merge_env(["A=1", "B=2"], ["B=3", "C=4"]) == ["A=1", "B=3", "C=4", merge_env([], [])[0]]
    assert any(e.startswith("PATH=") for e in merge_env([], []))


def _layer(tmp: Path, passwd: str, group: str = "") -> Path:
    (tmp / "etc").mkdir(parents=True, exist_ok=True)
    (tmp / "etc" / "passwd").write_text(passwd)
    (tmp / "etc" / "group").write_text(group)
    return tmp


def test_resolve_user_by_name_uid_and_group(tmp_path: Path) -> None:
    layer = _layer(
        tmp_path,
        "root:x:0:0::/root:/bin/sh\nuser:x:1000:1001::/home/user:/bin/sh\n",
        "root:x:0:\nusers:x:1001:\nwheel:x:10:user\n",
    )
    u = resolve_user("user", [layer])
    assert (u.uid, u.gid, u.additional_gids, u.home) == (1000, 1001, [10], "/home/user")
    assert resolve_user("", [layer]).uid == 0
    assert resolve_user("1000:0", [layer]).gid == 0
    assert resolve_user("4242", [layer]).gid == 4242  # numeric, not in passwd
    assert resolve_user("user:wheel", [layer]).gid == 10
    with pytest.raises(InvalidRequest, match="not found"):
        resolve_user("nobody", [layer])
    with pytest.raises(InvalidRequest, match="group"):
        resolve_user("user:nogroup", [layer])
    # (uid_t)-1 means "unchanged" to setresuid: it would leave the process root.
    for spec in ("4294967295", "0:4294967295", "99999999999999999999"):
        with pytest.raises(InvalidRequest, match="not a valid id"):
            resolve_user(spec, [layer])
    with pytest.raises(InvalidRequest, match="not found"):
        resolve_user("\u00b2", [layer])  # a digit to str.isdigit, not to int()


def test_resolve_user_upper_layer_wins_and_links_stay_in_layer(tmp_path: Path) -> None:
    low = _layer(tmp_path / "low", "user:x:1:1::/:/bin/sh\n")
    high = _layer(tmp_path / "high", "user:x:2:2::/:/bin/sh\n")
    assert resolve_user("user", [low, high]).uid == 2
    # An absolute link is resolved inside the layer, never to the host's /etc/passwd.
    evil = tmp_path / "evil"
    (evil / "etc").mkdir(parents=True)
    (evil / "etc" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidRequest):
        resolve_user("root", [evil])


def test_scrollback_keeps_the_tail() -> None:
    sb = Scrollback(10)
    sb.append(b"0123456789")
    sb.append(b"abc")
    assert sb.snapshot() == b"3456789abc"


def _event(user: str, n: int) -> tuple[str, Event]:
    rec = ContainerRecord(
        user_id=user,
        name=f"c{n}",
        image="busybox",
        resources=ContainerResources(memory_mb=1, cpu_shares=1, disk_mb=1, network_mbps=1),
    )
    return user, Event.model_validate({"type": "created", "container": rec.to_out()})


async def test_event_bus_filters_by_user_and_keeps_order() -> None:
    bus = EventBus()
    it = bus.subscribe("alice")
    for n in range(3):
        bus.publish(*_event("alice", n))
        bus.publish(*_event("bob", n))
    got = [await anext(it) for _ in range(3)]
    assert [e.container.name for e in got if e.container] == ["c0", "c1", "c2"]
    bus.close()
    with pytest.raises(StopAsyncIteration):
        await anext(it)


async def test_event_bus_drops_a_stalled_subscriber() -> None:
    bus = EventBus()
    it = bus.subscribe("alice")
    for n in range(QUEUE_BOUND + 5):
        bus.publish(*_event("alice", n))
    drained = 0
    async for _ in it:
        drained += 1
    assert drained < QUEUE_BOUND  # ended instead of growing without bound
    await asyncio.sleep(0)


def test_spec_to_dict_is_asdict_without_shared_lists() -> None:
    """to_dict (no deep copy of each string) gives what dataclasses.asdict gives, and
    its lists are the caller's own: changing them leaves the spec alone."""
    from dataclasses import asdict

    from rexecd.runtime.spec import BindMount, UsernsSpec

    spec = ContainerSpec(
        id="c1",
        hostname="h",
        rootfs=RootfsSpec(lowerdirs=["/l1", "/l2"], upperdir="/u", workdir="/w", target="/t"),
        process=ProcessSpec(args=["sh"], env=["A=1"], seccomp=["AAAA", "BBBB"]),
        mounts=[BindMount("/s", "/d", readonly=True)],
        userns=UsernsSpec(100_000, 65_536),
    )
    data = spec.to_dict()
    assert data == asdict(spec)
    data["rootfs"]["lowerdirs"].append("/evil")
    data["process"]["env"].append("B=2")
    data["mounts"][0]["readonly"] = False
    assert spec.rootfs.lowerdirs == ["/l1", "/l2"]
    assert spec.process.env == ["A=1"]
    assert spec.mounts[0].readonly


def test_sync_encode_is_the_fields_as_json() -> None:
    from dataclasses import asdict

    body = _spec().to_dict()
    for msg in (
        sync.Request(op="run", rid=7, body=body),
        sync.Reply(rid=7, pid=None, error="x"),
        sync.ChildError(step="mount", errno=2, message="m"),
        sync.Holder(pid=3, reaped=True),
    ):
        raw = sync.encode(msg)
        assert raw == json_compact(asdict(msg))
        assert sync.decode(raw) == msg
    with pytest.raises(TypeError, match="not JSON serializable"):
        sync.encode(sync.Request(op="run", rid=1, body={"x": object()}))


def json_compact(data: object) -> bytes:
    import json

    return json.dumps(data, separators=(",", ":")).encode()


def test_runtime_resolves_an_image_user_once_per_layer_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typing import Any, cast

    from rexecd.runtime import container
    from rexecd.runtime.users import Identity

    calls: list[tuple[str, list[Path]]] = []

    def fake(user: str, layers: list[Path]) -> Identity:
        calls.append((user, layers))
        return Identity(uid=len(calls), gid=1, additional_gids=[5], home="/")

    monkeypatch.setattr(container, "resolve_user", fake)
    rt = container.Runtime(tmp_path / "s", tmp_path / "r", None, cast(Any, object()))
    a, b = [tmp_path / "a"], [tmp_path / "a", tmp_path / "b"]
    first = rt.image_user("u", a)
    assert rt.image_user("u", list(a)) == first
    assert len(calls) == 1
    assert rt.image_user("u", b).uid == 2  # another layer set
    assert rt.image_user("v", a).uid == 3  # another user
    assert len(calls) == 3


def test_remove_tree_empty_layout_and_tenant_files(tmp_path: Path) -> None:
    """The plain rmdirs take a container that wrote nothing; anything else falls to
    rmtree, which follows no link out of the tree."""
    from rexecd.runtime.container import _remove_tree

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    for name, wrote in (("empty", False), ("used", True)):
        base = tmp_path / name
        for rel in ("upper", "work/work", "rootfs"):
            (base / rel).mkdir(parents=True)
        if wrote:
            (base / "upper" / "file").write_text("data")
            (base / "upper" / "link").symlink_to(outside)
            (base / "upper" / "dir").mkdir()
        _remove_tree(base)
        assert not base.exists()
    assert (outside / "keep").read_text() == "x"
    _remove_tree(tmp_path / "absent")  # nothing there: no error


def test_drop_bounding_keeps_exactly_the_named_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    from rexecd.runtime import capabilities

    got: list[tuple[int, int]] = []
    monkeypatch.setattr(
        capabilities.n, "capbset_drop_except", lambda keep, last: got.append((keep, last))
    )
    capabilities.drop_bounding(["chown", "net_bind_service", "kill"], 40)
    assert got == [((1 << 0) | (1 << 10) | (1 << 5), 40)]
    with pytest.raises(ValueError, match="unknown capability"):
        capabilities.drop_bounding(["nonsense"], 40)


def test_an_id_outside_the_user_namespace_is_the_callers_mistake() -> None:
    Identity(65535, 65535, [65535], "/").require_mapped(65536)
    for uid, gid, groups in ((65536, 0, []), (0, 70000, []), (0, 0, [5, 1 << 20])):
        with pytest.raises(InvalidRequest, match="outside the container's user namespace"):
            Identity(uid, gid, groups, "/").require_mapped(65536)
