"""Unit tests of the storage vocabulary: validation, paths, the dirs inside a volume and
the generic reconcile, on plain tmp dirs (no mounts, no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from rexecd.errors import InvalidRequest
from rexecd.runtime.storage import MAX_SIZE_MB, MIN_SIZE_MB, Storage, Volume
from rexecd.runtime.storage.volume import (
    Layout,
    check_component,
    check_size,
    make_dirs,
    sweep,
    wipe_dirs,
)

USER = "2f1c0b5e-8a6d-4c1e-9d3f-0a1b2c3d4e5f"


def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "state", tmp_path / "run")


@pytest.mark.parametrize("value", ["web", "a", "my_box-2", USER, "x" * 128])
def test_component_accepts_names_and_uuids(value: str) -> None:
    assert check_component("name", value) == value


@pytest.mark.parametrize(
    "value", ["", ".", "..", "../x", "a/b", ".img", "a.img", "-x", "_x", "x" * 129, "a b", "é"]
)
def test_component_refuses_what_could_escape_or_collide(value: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid volume name"):
        check_component("name", value)


def test_component_refuses_non_strings() -> None:
    with pytest.raises(InvalidRequest):
        check_component("user id", 5)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [MIN_SIZE_MB, 1024, MAX_SIZE_MB])
def test_size_in_range(size: int) -> None:
    assert check_size(size) == size


@pytest.mark.parametrize("size", [0, -1, MIN_SIZE_MB - 1, MAX_SIZE_MB + 1])
def test_size_out_of_range_names_the_range(size: int) -> None:
    with pytest.raises(InvalidRequest, match=f"{MIN_SIZE_MB}..{MAX_SIZE_MB} MB") as err:
        check_size(size)
    assert err.value.extra == {"min_mb": MIN_SIZE_MB, "max_mb": MAX_SIZE_MB}


@pytest.mark.parametrize("size", [True, 64.0, "64", None])
def test_size_must_be_an_int(size: object) -> None:
    with pytest.raises(InvalidRequest, match="whole number"):
        check_size(size)  # type: ignore[arg-type]


def test_layout_paths(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    vol = lay.volume(USER, "web", 64)
    assert vol.image == tmp_path / "state" / "volumes" / USER / "web.img"
    assert vol.mountpoint == tmp_path / "run" / "volumes" / USER / "web"
    assert lay.partial(USER, "web") == tmp_path / "state" / "volumes" / USER / "web.img.part"
    assert vol.upper == vol.mountpoint / "upper"
    assert vol.work == vol.mountpoint / "work"
    assert vol.home == vol.mountpoint / "home"
    assert vol.size_mb == 64


def test_layout_validates(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        layout(tmp_path).volume("..", "web", 64)
    with pytest.raises(InvalidRequest):
        layout(tmp_path).volume(USER, "a/b", 64)


def test_volume_is_frozen(tmp_path: Path) -> None:
    vol = layout(tmp_path).volume(USER, "web", 64)
    with pytest.raises(ValidationError):
        vol.size_mb = 1  # type: ignore[misc]


def test_key_of_only_matches_volume_mount_points(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    mounts = tmp_path / "run" / "volumes"
    assert lay.key_of(mounts / USER / "web") == (USER, "web")
    assert lay.key_of(mounts / USER) is None
    assert lay.key_of(mounts / USER / "web" / "home") is None
    assert lay.key_of(tmp_path / "elsewhere" / USER / "web") is None
    assert lay.key_of(mounts / USER / "web.img") is None
    assert lay.key_of(mounts / ".." / "web") is None


def fake_volume(tmp_path: Path) -> Volume:
    vol = layout(tmp_path).volume(USER, "web", 64)
    vol.mountpoint.mkdir(parents=True)
    return vol


def me() -> tuple[int, int]:
    return os.getuid(), os.getgid()


def test_make_dirs_modes_and_owner(tmp_path: Path) -> None:
    vol = fake_volume(tmp_path)
    make_dirs(vol, me())
    assert vol.upper.stat().st_mode & 0o777 == 0o755
    assert vol.work.stat().st_mode & 0o777 == 0o700
    assert vol.home.stat().st_mode & 0o777 == 0o755
    assert (vol.home.stat().st_uid, vol.home.stat().st_gid) == me()
    (vol.home / "keep").write_text("x")
    make_dirs(vol, me())  # idempotent
    assert (vol.home / "keep").read_text() == "x"


def test_wipe_dirs_empties_root_keeps_home(tmp_path: Path) -> None:
    vol = fake_volume(tmp_path)
    make_dirs(vol, me())
    (vol.upper / "etc").mkdir()
    (vol.upper / "etc" / "passwd").write_text("root")
    (vol.upper / "link").symlink_to(vol.home)  # must not be followed
    (vol.work / "work").mkdir(mode=0)
    (vol.home / "notes").write_text("mine")
    wipe_dirs(vol)
    assert list(vol.upper.iterdir()) == []
    assert list(vol.work.iterdir()) == []
    assert vol.upper.stat().st_mode & 0o777 == 0o755
    assert vol.work.stat().st_mode & 0o777 == 0o700
    assert (vol.home / "notes").read_text() == "mine"
    assert sorted(p.name for p in vol.mountpoint.iterdir()) == ["home", "upper", "work"]


def test_sweep_removes_what_an_interrupted_wipe_left(tmp_path: Path) -> None:
    vol = fake_volume(tmp_path)
    make_dirs(vol, me())
    trash = vol.mountpoint / ".wipe-upper-abc"
    (trash / "deep").mkdir(parents=True)
    (trash / "deep" / "f").write_text("x")
    sweep(vol)
    assert not trash.exists()
    assert vol.home.exists()


class FakeStorage(Storage):
    """Only what the generic reconcile uses."""

    def __init__(self, tmp_path: Path, keys: list[tuple[str, str]]) -> None:
        self.lay = layout(tmp_path)
        self.active = [self.lay.volume(u, n, 64) for u, n in keys]
        self.released: list[str] = []

    def ensure(
        self, user_id: str, name: str, size_mb: int, owner: tuple[int, int] = (0, 0)
    ) -> Volume:
        raise NotImplementedError

    def volume(self, user_id: str, name: str) -> Volume:
        return self.lay.volume(user_id, name, 0)

    def rename(self, user_id: str, old: str, new: str) -> None:
        raise NotImplementedError

    def release(self, vol: Volume) -> None:
        self.released.append(vol.name)

    def wipe_root(self, vol: Volume) -> None:
        raise NotImplementedError

    def destroy(self, user_id: str, name: str) -> None:
        raise NotImplementedError

    def resize(self, vol: Volume, size_mb: int) -> Volume:
        raise NotImplementedError

    def usage(self, vol: Volume) -> tuple[int, int]:
        raise NotImplementedError

    def space(self, vol: Volume) -> tuple[int, int]:
        raise NotImplementedError

    def mounted(self) -> list[Volume]:
        return self.active

    def stored(self) -> list[tuple[str, str]]:
        return [(v.user_id, v.name) for v in self.active]


def test_reconcile_releases_all_but_keep(tmp_path: Path) -> None:
    st = FakeStorage(tmp_path, [("u1", "a"), ("u1", "b"), ("u2", "a")])
    assert st.reconcile({("u1", "a"), ("u9", "z")}) == ["u1/b", "u2/a"]
    assert st.released == ["b", "a"]
