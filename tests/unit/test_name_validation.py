"""Every name check matches the whole string: "x\\n" (where "$" would match before the
newline) is refused wherever "x" is accepted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from rexecd.config import CgroupConfig, NetworkConfig
from rexecd.errors import InvalidRequest
from rexecd.models import ContainerCreate, ExecRequest, SettingsPatch
from rexecd.runtime.cgroups import check_name as check_cgroup_name
from rexecd.runtime.images.models import parse_reference
from rexecd.runtime.network.etcfiles import check_hostname
from rexecd.runtime.network.firewall import check_table
from rexecd.runtime.network.naming import check_container_id, check_ifname
from rexecd.runtime.storage.volume import check_component
from rexecd.service.auth import create_token

CHECKS: dict[str, Callable[[str], Any]] = {
    "container name": lambda v: ContainerCreate(image="busybox", name=v),
    "rename": lambda v: SettingsPatch(name=v),
    "environment key": lambda v: ContainerCreate(image="busybox", environment={v: "1"}),
    "exec env key": lambda v: ExecRequest(command="true", env=[f"{v}=1"]),
    "image name": lambda v: parse_reference(v),
    "image tag": lambda v: parse_reference(f"busybox:{v}"),
    "volume component": lambda v: check_component("name", v),
    "cgroup name": check_cgroup_name,
    "container id": check_container_id,
    "ifname": check_ifname,
    "nft table": check_table,
    "hostname": check_hostname,
    "cgroup parent": lambda v: CgroupConfig(parent=v),
    "bridge": lambda v: NetworkConfig(bridge=v),
    # Refused before the store is touched.
    "user name": lambda v: create_token(None, v),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("what", sorted(CHECKS))
def test_trailing_newline_is_refused_where_the_name_is_accepted(what: str) -> None:
    check = CHECKS[what]
    if what != "user name":
        check("x")
    for bad in ("x\n", "x\n\n", "\nx"):
        with pytest.raises((InvalidRequest, ValidationError, ValueError)):
            check(bad)

