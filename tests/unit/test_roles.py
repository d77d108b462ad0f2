"""Roles that install (no root): the role model, the (base image, role) cache key, the
install script, the upper-dir diff writer, and role layers in the image store."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from rexecd.config import Config, RoleConfig, load_config
from rexecd.errors import ImageError, InvalidRequest
from rexecd.runtime.images import ImageStore
from rexecd.runtime.images.diff import write_diff
from rexecd.service.roles import (
    NO_MANAGER_STATUS,
    _last_line,
    install_script,
    installs_nothing,
    role_key,
)
from tests.unit.fakes.images import LAYER, layer, oci_archive, reg
from tests.unit.fakes.images import base_image as base


def role(**kw: object) -> RoleConfig:
    doc: dict[str, object] = {
        "id": "python",
        "name": "Python",
        "description": "d",
        "packages": ["python3"],
        "install": {"apt": ["python3"], "apk": ["python3"]},
    }
    doc.update(kw)
    return RoleConfig.model_validate(doc)


# --- the role model and its key ------------------------------------------------------


def test_shipped_roles_install_per_manager_and_barebone_adds_nothing() -> None:
    roles = {r.id: r for r in Config().roles}
    assert set(roles) >= {"node", "python", "go", "rust", "devops", "barebone"}
    assert installs_nothing(roles["barebone"])
    for rid in ("node", "python", "go", "rust", "devops"):
        assert not installs_nothing(roles[rid])
        assert {"apt", "apk", "dnf", "pacman"} <= set(roles[rid].install), rid
    assert "python3" in roles["python"].install["apt"]


def test_role_model_refuses_unknown_managers_and_bad_ids() -> None:
    with pytest.raises(ValidationError):
        role(install={"brew": ["python"]})
    with pytest.raises(ValidationError):
        role(id="Python!")
    assert installs_nothing(role(install={"apt": []}, setup=[]))
    assert not installs_nothing(role(install={}, setup=["true"]))


def test_key_depends_on_base_content_and_install_definition_only() -> None:
    k = role_key(base(), role())
    assert len(k) == 64 and int(k, 16) >= 0
    assert role_key(base(), role()) == k  # stable
    # What the install depends on changes the key...
    assert role_key(base(digest="sha256:" + "3" * 64), role()) != k
    assert role_key(base(layers=(LAYER, "sha256:" + "4" * 64)), role()) != k
    assert role_key(base(), role(install={"apt": ["python3", "git"]})) != k
    assert role_key(base(), role(setup=["echo hi"])) != k
    assert role_key(base(), role(id="py")) != k
    # ...what is only shown to users does not; nor the order managers are listed in.
    assert role_key(base(), role(name="Other", description="x", packages=[])) == k
    swapped = role(install={"apk": ["python3"], "apt": ["python3"]})
    assert role_key(base(), swapped) == k


def test_key_changes_with_the_mirrors_the_role_installs_through() -> None:
    # An admin who replaces a broken or compromised mirror must not keep getting layers
    # built through the old one: a mirror change is a new key, so a fresh build.
    k = role_key(base(), role(), {})
    old = role_key(base(), role(), {"apt": ["http://old.example/debian"]})
    new = role_key(base(), role(), {"apt": ["http://new.example/debian"]})
    assert len({k, old, new}) == 3
    # A mirror for a manager the role does not use changes nothing.
    assert role_key(base(), role(install={"apt": ["x"]}), {"pacman": ["http://m"]}) == role_key(
        base(), role(install={"apt": ["x"]}), {}
    )
    # yum installs through dnf's mirror.
    yum = role(install={"yum": ["x"]})
    assert role_key(base(), yum, {"dnf": ["http://m"]}) != role_key(base(), yum, {})
    # The image's name is not part of it: a re-tag keeps the cache, a re-pull does not.
    renamed = base().model_copy(update={"name": "mine", "tag": "x"})
    assert role_key(renamed, role()) == k


def test_package_mirror_config_is_per_manager_and_one_line_each() -> None:
    cfg = Config.model_validate({"packages": {"mirrors": {"apt": ["deb http://m/ ./"]}}})
    assert cfg.packages.mirrors == {"apt": ["deb http://m/ ./"]}
    assert load_config(None).packages.mirrors == {}  # default.yaml: none
    with pytest.raises(ValidationError, match="one non-empty line"):
        Config.model_validate({"packages": {"mirrors": {"apt": ["deb x\ndeb y"]}}})
    with pytest.raises(ValidationError, match="brew"):
        Config.model_validate({"packages": {"mirrors": {"brew": ["x"]}}})


# --- the install script --------------------------------------------------------------


def test_script_quotes_everything_and_tries_managers_in_order() -> None:
    r = role(install={"apk": ["a b"], "apt": ["py;rm -rf /", "$(x)"]}, setup=["echo done"])
    script = install_script(r, {"apt": ["deb [trusted=yes] http://10.0.0.1:80/ ./"]})
    assert script.index("command -v apt-get") < script.index("command -v apk")
    assert "'py;rm -rf /'" in script and "'$(x)'" in script and "'a b'" in script
    assert "'deb [trusted=yes] http://10.0.0.1:80/ ./'" in script
    assert "Dir::Etc::SourceList" in script  # the mirror replaces the image's sources
    assert script.rstrip().splitlines()[-2] == "echo done"
    assert f"exit {NO_MANAGER_STATUS}" in script
    # Parsed by a real shell: well-formed.
    subprocess.run(["sh", "-n", "-c", script], check=True)


def _run(script: str, tmp_path: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path, "TMPDIR": str(tmp_path)}
    return subprocess.run(
        ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )


def test_script_without_a_known_manager_fails_clearly(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mktemp", "rm"):
        found = shutil.which(tool)
        assert found
        os.symlink(found, bin_dir / tool)
    res = _run(install_script(role(), {}), tmp_path, str(bin_dir))
    assert res.returncode == NO_MANAGER_STATUS
    assert "none of the package managers role python installs with (apt, apk)" in res.stderr


def test_script_runs_the_first_manager_it_finds_with_the_mirror(tmp_path: Path) -> None:
    # Only a fake apk on PATH (never the host's own package manager): it records how
    # it was called and what the mirror file it was given holds.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mktemp", "rm", "cat", "mkdir"):
        found = shutil.which(tool)
        assert found
        os.symlink(found, bin_dir / tool)
    fake = bin_dir / "apk"
    fake.write_text(
        '#!/bin/sh\necho "apk $*"\n'
        'for a; do [ -f "$a" ] && echo "file $a" && cat "$a"; done\nexit 0\n'
    )
    fake.chmod(0o755)
    script = install_script(role(setup=["echo set-up ran"]), {"apk": ["http://m/alpine/main"]})
    res = _run(script, tmp_path, str(bin_dir))
    assert res.returncode == 0, res.stderr
    assert "rexecd: using apk" in res.stdout and "using apt" not in res.stdout
    assert "add --no-cache --repositories-file" in res.stdout and "python3" in res.stdout
    assert "http://m/alpine/main" in res.stdout
    assert "set-up ran" in res.stdout
    # The temporary dir with the mirror file is gone: no install-time file stays.
    mirror_file = next(x for x in res.stdout.splitlines() if x.startswith("file ")).split()[1]
    assert not os.path.exists(mirror_file)


def test_progress_lines_carry_no_terminal_escapes() -> None:
    chunk = b"Get:1 http://m ./ python3\r\n\x1b]0;pwned\x07Setting up \x1b[31mpython3\x1b[0m\n\n"
    line = _last_line(chunk)
    assert "\x1b" not in line and "\x07" not in line
    assert line.startswith("]0;pwnedSetting up") and line.endswith("python3[0m")
    assert _last_line(b"\n \n") == ""
    assert len(_last_line(b"x" * 1000)) == 200


# --- the diff writer ------------------------------------------------------------------


def _members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_diff_writes_files_links_and_leaves_out_excluded_paths(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    (up / "usr/bin").mkdir(parents=True)
    (up / "usr/bin/python3").write_bytes(b"\x7fELF...")
    os.link(up / "usr/bin/python3", up / "usr/bin/python3.11")
    os.symlink("/etc/shadow", up / "usr/bin/evil")  # stored as a link, never followed
    os.mkfifo(up / "fifo")
    (up / "etc").mkdir()
    (up / "etc/hosts").write_text("10.0.0.2 first-users-container\n")
    (up / "etc/keep").write_text("k")
    buf = io.BytesIO()
    stats = write_diff(up, buf, ("etc/hosts",))
    m = _members(buf.getvalue())
    assert set(m) == {
        "usr", "usr/bin", "usr/bin/python3", "usr/bin/python3.11", "usr/bin/evil",
        "fifo", "etc", "etc/keep",
    }  # fmt: skip
    assert m["usr/bin/python3"].isreg() and m["usr/bin/python3"].size == 7
    assert m["usr/bin/python3.11"].islnk() and m["usr/bin/python3.11"].linkname == "usr/bin/python3"
    assert m["usr/bin/evil"].issym() and m["usr/bin/evil"].linkname == "/etc/shadow"
    assert m["fifo"].isfifo()
    names = list(m)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/python3")
    assert stats.file_bytes == 7 + 1  # python3 and etc/keep; the link adds none


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted.* xattrs need root")
def test_diff_turns_overlay_whiteouts_and_opaque_dirs_into_oci_markers(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    (up / "etc/apt").mkdir(parents=True)
    os.mknod(up / "etc/gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(up / "etc/apt", "trusted.overlay.opaque", b"y")
    os.mknod(up / "etc/tty9", 0o600 | 0o020000, os.makedev(4, 9))  # a real device: left out
    buf = io.BytesIO()
    stats = write_diff(up, buf)
    m = _members(buf.getvalue())
    assert set(m) == {"etc", "etc/apt", "etc/apt/.wh..wh..opq", "etc/.wh.gone"}
    assert stats.skipped == 1


# --- role layers in the store ---------------------------------------------------------


def test_role_layer_goes_through_the_unpacker_and_is_reference_counted(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", durable=False)
    src = tmp_path / "img.tar"
    src.write_bytes(oci_archive([layer(reg("base", b"base\n"))], ref="debian:bookworm"))
    img = store.import_archive(src)
    key = "a" * 64
    up = tmp_path / "upper"
    (up / "usr/bin").mkdir(parents=True)
    (up / "usr/bin/python3").write_text("py")
    assert store.role_image(key) is None
    rec = store.add_role_layer(key, img, lambda out: write_diff(up, out))
    assert rec.layers[:-1] == img.layers and rec.digest == img.digest and rec.ref == img.ref
    assert store.role_image(key) == rec
    top = store.layer_paths(rec)[-1]
    assert (top / "usr/bin/python3").read_text() == "py"
    # Content-addressed: the same content again is the same layer directory.
    again = store.add_role_layer("b" * 64, img, lambda out: write_diff(up, out))
    assert again.layers == rec.layers
    # A role record keeps its layer through gc; a lease keeps it after the record goes.
    assert store.gc() == []
    store.pin("c1", rec)
    assert store.prune(all_unused=True).layers == []  # in use by c1: nothing goes
    assert store.role_image(key) == rec
    store.unpin("c1")
    out = store.prune(all_unused=True)
    assert rec.layers[-1] in out.layers
    assert store.role_image(key) is None


def test_role_layer_from_a_failing_writer_leaves_nothing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", durable=False)
    src = tmp_path / "img.tar"
    src.write_bytes(oci_archive([layer(reg("base", b"base\n"))], ref="debian:bookworm"))
    img = store.import_archive(src)

    def broken(out: object) -> None:
        raise OSError("upper dir changed")

    with pytest.raises(ImageError):
        store.add_role_layer("a" * 64, img, broken)
    assert store.role_image("a" * 64) is None
    assert list(store.tmp_dir.iterdir()) == []
    with pytest.raises(InvalidRequest):
        store.role_image("../x")


def test_role_layer_owners_are_written_as_the_build_container_saw_them(tmp_path: Path) -> None:
    """A build in a user namespace leaves host ids in its upper dir: the layer records
    the ids inside (base -> 0), and a file of an id outside the range as nobody's."""
    import io
    import tarfile

    from rexecd.runtime.images.diff import write_diff
    from rexecd.runtime.spec import UsernsSpec

    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "mine").write_text("x")
    (upper / "etc" / "daemons").write_text("y")
    ids = UsernsSpec(base=3_000_000, size=65536)
    os.chown(upper / "etc", ids.base, ids.base)
    os.chown(upper / "etc" / "mine", ids.base + 33, ids.base + 34)
    os.chown(upper / "etc" / "daemons", 0, 0)
    out = io.BytesIO()
    write_diff(upper, out, ids=ids)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        owners = {m.name: (m.uid, m.gid) for m in tar.getmembers()}
    assert owners == {"etc": (0, 0), "etc/mine": (33, 34), "etc/daemons": (65534, 65534)}
