"""Which address a volunteer should give `enshuffle node --connect`, given what the coordinator bound.

ZeroMQ reports a socket with IPv6 enabled that listens on IPv4 as `tcp://[::ffff:0.0.0.0]:PORT`
(or `[::ffff:127.0.0.1]`): neither is an address another machine can use. This module turns the
bound endpoint into addresses a volunteer can connect to: the host itself when it is a concrete
address, else this machine's own addresses (or a THIS_HOST placeholder when none can be found).
"""

from __future__ import annotations

import ipaddress
import socket

PLACEHOLDER = "THIS_HOST"


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """'tcp://[::ffff:1.2.3.4]:5555' -> ('1.2.3.4', '5555'); brackets and the v4-mapped prefix go."""
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    if host.lower().startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return host, port


def _join(host: str, port: str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def machine_addresses() -> list[str]:
    """This machine's non-loopback IP addresses, IPv4 first; no packet is sent."""
    found: list[str] = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:  # a UDP "connect" only picks the outgoing interface: the address a peer would see
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP):
            found.append(str(info[4][0]))
    except OSError:
        pass
    result = []
    for text in found:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if ip.is_loopback or ip.is_unspecified or ip.is_link_local or str(ip) in result:
            continue
        result.append(str(ip))
    return sorted(result, key=lambda a: ":" in a)


def volunteer_addresses(endpoint: str, local: list[str] | None = None) -> list[str]:
    """Addresses for `enshuffle node --connect`, best first; THIS_HOST stands in when unknown.

    A concrete bound host is given as is (a loopback bind serves this machine only); a wildcard
    bind (0.0.0.0, ::, *) is reachable at each of this machine's addresses."""
    host, port = split_endpoint(endpoint)
    if host not in ("0.0.0.0", "::", "*", ""):
        return [_join(host, port)]
    addresses = machine_addresses() if local is None else local
    if host == "0.0.0.0":
        addresses = [a for a in addresses if ":" not in a]
    return [_join(a, port) for a in addresses] or [_join(PLACEHOLDER, port)]
