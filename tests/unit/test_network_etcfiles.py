"""Unit: /etc/hosts and /etc/resolv.conf rendering, host resolver parsing, symlink-safe writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rexecd.errors import InvalidRequest
from rexecd.runtime.network import render_hosts, render_resolv_conf, write_etc_files
from rexecd.runtime.network.etcfiles import host_resolv, parse_resolv_conf


def test_hosts_has_localhost_and_the_container() -> None:
    text = render_hosts("web-1", "10.88.0.5")
    assert text.splitlines() == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "10.88.0.5\tweb-1",
    ]
    assert render_hosts("web.example.org", "10.88.0.5").endswith("10.88.0.5\tweb.example.org web\n")


def test_hosts_accepts_container_names() -> None:
    assert render_hosts("my_box-", "10.88.0.5").endswith("10.88.0.5\tmy_box-\n")


@pytest.mark.parametrize("name", ["", "bad name", "-x", "a\nb", "x" * 64, "a..b", "a#b"])
def test_hosts_refuses_bad_hostnames(name: str) -> None:
    with pytest.raises(InvalidRequest):
        render_hosts(name, "10.88.0.5")


def test_resolv_conf_rendering() -> None:
    text = render_resolv_conf(["10.0.0.2", "10.0.0.3"], ["corp.example"], ["ndots:2"])
    assert text.splitlines()[1:] == [
        "nameserver 10.0.0.2",
        "nameserver 10.0.0.3",
        "search corp.example",
        "options ndots:2",
    ]
    assert "No usable nameserver" in render_resolv_conf([])
    with pytest.raises(InvalidRequest):
        render_resolv_conf(["10.0.0.2\nnameserver 6.6.6.6"])


def test_parse_drops_loopback_and_ipv6_servers() -> None:
    parsed = parse_resolv_conf(
        "# comment\nnameserver 127.0.0.53\nnameserver ::1\nnameserver fd00::1\n"
        "nameserver 10.1.1.1 ; trailing\nnameserver 10.1.1.1\noptions edns0 trust-ad\n"
        "domain a.example\nsearch b.example c.example\n"
    )
    assert parsed.nameservers == ["10.1.1.1"]
    assert parsed.search == ["b.example", "c.example"]
    assert parsed.options == ["edns0", "trust-ad"]


def test_host_resolv_falls_back_to_resolved_upstream(tmp_path: Path) -> None:
    stub = tmp_path / "resolv.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0\nsearch lan\n")
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("nameserver 192.0.2.53\n")
    found = host_resolv(str(stub), str(upstream))
    assert found.nameservers == ["192.0.2.53"]
    assert found.search == ["lan"] and found.options == ["edns0"]
    # Only stubs and no upstream file: no invented public resolver.
    assert host_resolv(str(stub), str(tmp_path / "missing")).nameservers == []


def test_write_replaces_symlinks_instead_of_following_them(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    victim = tmp_path / "host-file"
    victim.write_text("precious\n")
    (etc / "hosts").symlink_to(victim)
    (etc / "resolv.conf").symlink_to(victim)
    write_etc_files(etc, "box", "10.88.0.9", ["10.0.0.2"])
    assert victim.read_text() == "precious\n"
    assert not (etc / "hosts").is_symlink()
    assert (etc / "hosts").read_text().endswith("10.88.0.9\tbox\n")
    assert "nameserver 10.0.0.2\n" in (etc / "resolv.conf").read_text()
    assert oct((etc / "hosts").stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(etc)) == ["hosts", "resolv.conf"]


def test_write_creates_a_missing_etc(tmp_path: Path) -> None:
    write_etc_files(tmp_path / "etc", "box", "10.88.0.9", ["10.0.0.2"])
    assert sorted(os.listdir(tmp_path / "etc")) == ["hosts", "resolv.conf"]


def test_write_through_a_directory_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_etc_files(fd, "box", "10.88.0.9", ["10.0.0.2"])
    finally:
        os.close(fd)
    assert (tmp_path / "hosts").exists() and (tmp_path / "resolv.conf").exists()


def test_write_refuses_a_symlinked_etc(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "etc").symlink_to(real)
    with pytest.raises(Exception, match="write etc files"):
        write_etc_files(tmp_path / "etc", "box", "10.88.0.9", ["10.0.0.2"])
    assert os.listdir(real) == []
