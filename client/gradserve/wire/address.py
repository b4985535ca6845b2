"""Whether a gRPC address stays on this machine: both ends warn before a
bearer token crosses the network in plaintext."""
from __future__ import annotations

import ipaddress


def is_loopback(target: str) -> bool:
    """Whether a gRPC target or bind host (host, host:port, [v6]:port,
    unix:path) is this machine's loopback; 0.0.0.0 and :: are not."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.split("://", 1)[-1]
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
