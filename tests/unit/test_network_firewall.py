"""Unit: the nft ruleset we render, and the validation in front of it (no kernel involved)."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from rexecd.errors import InvalidRequest
from rexecd.runtime.network import NetworkConfig
from rexecd.runtime.network.firewall import Firewall, check_table, firewall_for
from rexecd.runtime.network.shaping import MAX_MBPS, check_mbps, tbf_params


def _fw(**kw: object) -> Firewall:
    return firewall_for(
        NetworkConfig(bridge="rexec7", subnet="10.77.0.0/16", nft_table="rx7", **kw)
    )


def test_ruleset_is_confined_to_our_tables_bridge_and_subnet() -> None:
    text = _fw().render()
    for line in text.splitlines():
        assert line.split()[3] == "rx7", line
    assert 'oifname != "rexec7" ip saddr 10.77.0.0/16 masquerade' in text
    assert 'iifname "rexec7" drop' in text  # container -> host, default deny
    assert 'iifname "rexec7" ip daddr 127.0.0.0/8 drop' in text
    assert "iifname @names drop" in text  # port to port, default deny
    assert "policy drop" not in text  # never override other tables' verdicts


def test_gateway_ports_are_the_only_host_openings() -> None:
    assert "dport" not in _fw().render().split("chain inet rx7 input")[1].split("forward")[0]
    text = _fw(gateway_tcp_ports=(53, 8053), gateway_udp_ports=(53,)).render()
    assert 'iifname "rexec7" ip daddr 10.77.0.1 tcp dport { 53, 8053 } accept' in text
    assert 'iifname "rexec7" ip daddr 10.77.0.1 udp dport { 53 } accept' in text


def test_rendering_keeps_sets_and_flushes_chains() -> None:
    text = _fw().render()
    assert "delete" not in text
    for chain in ("prerouting", "forward", "input", "output_nat", "postrouting"):
        assert f"flush chain inet rx7 {chain}\n" in text
    for chain in ("prerouting", "forward"):
        assert f"flush chain bridge rx7 {chain}\n" in text


@pytest.mark.parametrize("name", ["", "1abc", "has-dash", "x" * 33, "semi;colon"])
def test_table_names_are_validated(name: str) -> None:
    with pytest.raises(InvalidRequest):
        check_table(name)


def test_bad_bridge_name_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        Firewall(
            "t",
            'br"0',
            ipaddress.IPv4Network("10.0.0.0/24"),
            ipaddress.IPv4Address("10.0.0.1"),
            "02:00:00:00:00:01",
        )


def test_config_validates_ports() -> None:
    with pytest.raises(ValidationError):
        NetworkConfig(gateway_tcp_ports=(0,))


def test_tbf_params_and_limits() -> None:
    assert tbf_params(10) == {"rate": "10mbit", "burst": 16384, "latency": "50ms"}
    assert tbf_params(1000)["burst"] == 1_250_000
    check_mbps(None)
    check_mbps(MAX_MBPS)
    for bad in (0, -1, MAX_MBPS + 1):
        with pytest.raises(InvalidRequest):
            check_mbps(bad)
