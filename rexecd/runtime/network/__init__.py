"""Container networking: bridge, veth pairs, bandwidth shaping, nftables isolation, NAT, IPAM."""

from .etcfiles import host_resolv, render_hosts, render_resolv_conf, write_etc_files
from .ipam import Ipam
from .models import Attachment, NetworkConfig, PortForward
from .naming import host_ifname, ifb_ifname
from .network import Network
from .portforward import PortForwarder

__all__ = [
    "Attachment",
    "Ipam",
    "Network",
    "NetworkConfig",
    "PortForward",
    "PortForwarder",
    "host_ifname",
    "host_resolv",
    "ifb_ifname",
    "render_hosts",
    "render_resolv_conf",
    "write_etc_files",
]
