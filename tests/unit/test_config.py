"""Config loading: the embedded default, strict validation with key paths, CLI overrides."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import pytest
import yaml

from rexecd.config import (
    Config,
    ConfigError,
    TcpListen,
    UnixListen,
    apply_overrides,
    default_config_text,
    load_config,
    parse_listen,
)

# The pro tier's required fields, inline YAML, for tiers written in a test file.
PRO = (
    "cpu_millicores: 4000, memory_mb: 4096, disk_mb: 20480, containers: 10,"
    " session_hours: null, network_mbps: 100"
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rexecd.yaml"
    path.write_text(text)
    return path


def test_embedded_default_is_package_data_and_equals_model_defaults() -> None:
    text = default_config_text()
    assert "tiers:" in text
    assert load_config(None) == Config()


def test_defaults_match_api_md() -> None:
    cfg = load_config(None)
    assert cfg.listen == ["unix:/run/rexecd/rexecd.sock"]
    assert cfg.state_dir == Path("/var/lib/rexecd")
    assert cfg.run_dir == Path("/run/rexecd")
    assert cfg.network.bridge == "rexec0"
    assert cfg.network.subnet == IPv4Network("10.88.0.0/16")
    assert cfg.cgroup.parent == "rexecd"
    table = {
        "guest": (500, 512, 2048, 1, 50),
        "free": (2000, 2048, 10240, 5, 50),
        "pro": (4000, 4096, 20480, 10, None),
        "enterprise": (8000, 8192, 51200, 20, None),
    }
    for tier, (cpu, mem, disk, count, hours) in table.items():
        t = cfg.tiers.get(tier)
        assert (t.cpu_millicores, t.memory_mb, t.disk_mb, t.containers, t.session_hours) == (
            cpu, mem, disk, count, hours,
        )  # fmt: skip
    assert (cfg.minimums.memory_mb, cfg.minimums.cpu_millicores, cfg.minimums.disk_mb) == (
        256, 250, 1024,
    )  # fmt: skip
    rl = cfg.rate_limits
    assert (rl.create_per_min, rl.ops_per_min, rl.read_per_min) == (10, 60, 120)
    assert cfg.terminal.idle_timeout_s == 600 and cfg.terminal.scrollback_bytes == 262144
    assert cfg.exec.default_timeout_s == 60 and cfg.exec.max_timeout_s == 300
    assert cfg.exec.output_cap_bytes == 1 << 20
    assert cfg.stop_timeout_s == 10
    assert cfg.limits.pids_max == 512
    disk = {t: (cfg.tiers.get(t).disk_mbps, cfg.tiers.get(t).disk_iops) for t in table}
    assert disk == {
        "guest": (20, 500), "free": (50, 1000), "pro": (100, 2000), "enterprise": (200, 5000),
    }  # fmt: skip
    names = {i.name for i in cfg.images.catalogue}
    assert {"ubuntu:24.04", "debian:bookworm", "alpine:latest", "archlinux:latest"} <= names
    assert "custom" in names
    aliases = {a for i in cfg.images.catalogue for a in i.aliases}
    assert {"ubuntu", "ubuntu-24", "debian", "alpine", "arch", "archlinux", "busybox"} <= aliases
    assert cfg.registries.pull and not cfg.registries.mirrors and not cfg.registries.insecure
    assert [r.id for r in cfg.roles] == ["node", "python", "go", "rust", "devops", "barebone"]


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    # A mistyped --config used to warn and start on the defaults.
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_tls_needs_cert_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls_cert and http\.tls_key go together"):
        load_config(write(tmp_path, "http: {tls_cert: /etc/rexecd/cert.pem}\n"))


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "minimums: {memory_mb: 16}\nstop_timeout_s: 2\n"))
    assert cfg.minimums.memory_mb == 16
    assert cfg.minimums.disk_mb == 1024
    assert cfg.stop_timeout_s == 2
    assert cfg.tiers == Config().tiers


def test_disk_throttle_and_pids_cap_are_configurable(tmp_path: Path) -> None:
    text = f"tiers:\n  pro: {{{PRO}, disk_mbps: 4, disk_iops: null}}\nlimits: {{pids_max: 64}}\n"
    cfg = load_config(write(tmp_path, text))
    assert (cfg.tiers.pro.disk_mbps, cfg.tiers.pro.disk_iops) == (4, None)
    assert cfg.limits.pids_max == 64
    assert cfg.tiers.free == Config().tiers.free


def test_tier_written_without_disk_keys_is_not_throttled(tmp_path: Path) -> None:
    # A tier block from before the disk keys existed keeps working, unthrottled as it was.
    cfg = load_config(write(tmp_path, f"tiers:\n  pro: {{{PRO}}}\n"))
    assert (cfg.tiers.pro.disk_mbps, cfg.tiers.pro.disk_iops) == (None, None)
    assert cfg.tiers.pro.network_mbps == 100


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tiers:\n  free: {cpu_millicores: 1, memory_mb: abc, disk_mb: 1, containers: 1,"
            " session_hours: null, network_mbps: 1}\nminimums: {memory_mb: 1, cpu_millicores: 1,"
            " disk_mb: 1}\n",
            "tiers.free.memory_mb: Input should be a valid integer",
        ),
        ("network: {bogus: 1}\n", "network.bogus: Extra inputs are not permitted"),
        ("nonsense: 1\n", "nonsense: Extra inputs are not permitted"),
        ("tiers: {free: {memory_mb: 1}}\n", "tiers.free.cpu_millicores: Field required"),
        ("network: {subnet: 10.0.0.1/8}\n", "network.subnet: '10.0.0.1/8'"),
        ("network: {subnet: 10.0.0.0/31}\n", "too small"),
        ("network: {bridge: a-very-long-bridge-name}\n", "network.bridge:"),
        ("network: {mode_default: host}\n", "network.mode_default:"),
        ("cgroup: {parent: /}\n", "cgroup.parent:"),
        ("cgroup: {parent: a/../b}\n", "cgroup.parent:"),
        ("listen: [http://x]\n", "listen: listen address 'http://x'"),
        ("listen: []\n", "at least one listen address"),
        ("listen: ['tcp:127.0.0.1:99999']\n", "port out of range"),
        ("state_dir: relative/dir\n", "state_dir: 'relative/dir' must be an absolute path"),
        ("terminal: {scrollback_bytes: 1024}\n", "terminal.scrollback_bytes:"),
        ("minimums: {memory_mb: 1000}\n", "tiers.guest.memory_mb (512) is below minimums"),
        ("roles: [{id: x, name: X, description: d}, {id: x, name: Y, description: e}]\n",
         "duplicate role id 'x'"),
        ("rate_limits: {create_per_min: 0}\n", "rate_limits.create_per_min:"),
        ("limits: {pids_max: 4}\n", "limits.pids_max: Input should be greater than or equal to 16"),
        ("limits: {bogus: 1}\n", "limits.bogus: Extra inputs are not permitted"),
        (f"tiers: {{pro: {{{PRO}, disk_mbps: 0}}}}\n", "tiers.pro.disk_mbps: Input should be"),
        (f"tiers: {{pro: {{{PRO}, disk_iops: -1}}}}\n", "tiers.pro.disk_iops: Input should be"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_yaml_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate key 'listen'"):
        load_config(write(tmp_path, "listen: [unix:/a]\nlisten: [unix:/b]\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "listen: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_default_yaml_round_trips_through_dump(tmp_path: Path) -> None:
    dumped = yaml.safe_dump(Config().model_dump(mode="json"))
    assert load_config(write(tmp_path, dumped)) == Config()


def test_parse_listen() -> None:
    assert parse_listen("unix:/run/x.sock") == UnixListen(Path("/run/x.sock"))
    assert parse_listen("tcp:127.0.0.1:8080") == TcpListen("127.0.0.1", 8080)
    assert parse_listen("tcp:[::1]:0") == TcpListen("::1", 0)
    assert parse_listen("tcp:localhost:1") == TcpListen("localhost", 1)
    for bad in ("unix:", "tcp:host", "tcp::80", "tcp:h:x", "udp:1:2", "foo", "tcp:[1.2.3.4]:1"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    with pytest.raises(ValueError, match="longer than"):
        parse_listen("unix:/" + "a" * 120)


def test_apply_overrides() -> None:
    cfg = Config()
    out = apply_overrides(
        cfg,
        state_dir="/tmp/s",
        run_dir=Path("/tmp/r"),
        listen=["unix:/tmp/r/a.sock", "tcp:127.0.0.1:0"],
        subnet="10.99.0.0/24",
        bridge="rxt1",
    )
    assert out.state_dir == Path("/tmp/s") and out.run_dir == Path("/tmp/r")
    assert out.listen == ["unix:/tmp/r/a.sock", "tcp:127.0.0.1:0"]
    assert out.network.subnet == IPv4Network("10.99.0.0/24")
    assert out.network.bridge == "rxt1"
    assert cfg == Config(), "the input config is left untouched"
    assert apply_overrides(cfg) == cfg
    assert apply_overrides(cfg, listen=[]) == cfg


def test_apply_overrides_relative_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert apply_overrides(Config(), state_dir="st").state_dir == tmp_path / "st"


def test_apply_overrides_validates() -> None:
    with pytest.raises(ConfigError, match=r"network\.subnet"):
        apply_overrides(Config(), subnet="not-a-subnet")
    with pytest.raises(ConfigError, match=r"network\.bridge"):
        apply_overrides(Config(), bridge="bad/name")
    with pytest.raises(ConfigError, match="listen"):
        apply_overrides(Config(), listen=["bogus"])


def test_assignment_is_validated() -> None:
    cfg = Config()
    cfg.minimums.memory_mb = 16
    assert cfg.minimums.memory_mb == 16
    with pytest.raises(ValueError):
        cfg.minimums.memory_mb = "lots"  # type: ignore[assignment]


def test_unknown_tier_lookup() -> None:
    with pytest.raises(KeyError):
        Config().tiers.get("platinum")


def test_cgroup_parent_may_be_absolute(tmp_path: Path) -> None:
    # The systemd unit keeps containers outside the service's own cgroup.
    assert load_config(write(tmp_path, "cgroup: {parent: /rexecd}\n")).cgroup.parent == "/rexecd"
    assert apply_overrides(Config(), cgroup_parent="/a/b").cgroup.parent == "/a/b"
