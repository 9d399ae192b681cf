"""Where the demo's parties run: all on loopback, or each hospital on a host of its own.

On one machine every party can reach every other over 127.0.0.1, and a loopback-only
shortcut (a plaintext link, a port bound to 127.0.0.1, a health check that only works
locally) would go unnoticed. `NetnsHosts` removes that: each hospital's node daemon (and so its
SuperNode and ClientApp executor) runs in its own Linux network namespace with its own address
on a bridge this module creates, and the coordinator and the SuperLink listen on the bridge's
address. A hospital's 127.0.0.1 is then its own, so the only way to the coordinator is HTTPS
and the only way to the SuperLink is TLS with SuperNode authentication, as across real hosts.

It needs root and iproute2 (`ip netns`, `ip link`); the addresses are a /24 in 10.200.0.0/13
that no interface of the machine uses yet, and everything is removed by `close()`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"


class HostsError(RuntimeError):
    """The network could not be made (not root, no iproute2, an `ip` command failed)."""


@dataclass
class Loopback:
    """Every party on this machine's loopback (the demo's default)."""

    server_host: str = LOOPBACK

    @property
    def remote(self) -> bool:
        return False

    def hospital_host(self, hospital_id: str) -> str:
        return LOOPBACK

    def command_prefix(self, hospital_id: str) -> list[str]:
        return []

    def close(self) -> None:
        return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise HostsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def netns_available() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(cidr).network
            for cidr in re.findall(r"\binet (\S+)", _ip("-o", "-4", "addr", "show"))]
    pool = list(ipaddress.IPv4Network("10.200.0.0/13").subnets(new_prefix=24))
    for _ in range(64):
        candidate = pool[secrets.randbelow(len(pool))]
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise HostsError("no free /24 in 10.200.0.0/13 for the demo's network")


@dataclass
class NetnsHosts:
    """A bridge with the servers' address, and one network namespace per hospital."""

    subnet: ipaddress.IPv4Network
    bridge: str
    namespaces: dict[str, str] = field(default_factory=dict)  # hospital id -> namespace
    addresses: dict[str, str] = field(default_factory=dict)  # hospital id -> its address

    @property
    def remote(self) -> bool:
        return True

    @property
    def server_host(self) -> str:
        return str(self.subnet.network_address + 1)

    def hospital_host(self, hospital_id: str) -> str:
        return self.addresses[hospital_id]

    def command_prefix(self, hospital_id: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[hospital_id]]

    @classmethod
    def create(cls, hospitals: Sequence[str]) -> NetnsHosts:
        why = netns_available()
        if why is not None:
            raise HostsError(why)
        tag = secrets.token_hex(3)
        hosts = cls(_free_subnet(), f"hxb{tag}")
        try:
            _ip("link", "add", hosts.bridge, "type", "bridge")
            _ip("addr", "add", f"{hosts.server_host}/{hosts.subnet.prefixlen}", "dev", hosts.bridge)
            _ip("link", "set", hosts.bridge, "up")
            for index, hospital_id in enumerate(hospitals):
                namespace, outside, inside = f"hx{tag}-{index}", f"hxo{tag}{index}", f"hxi{tag}{index}"
                address = str(hosts.subnet.network_address + 10 + index)
                _ip("netns", "add", namespace)
                hosts.namespaces[hospital_id] = namespace
                hosts.addresses[hospital_id] = address
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                _ip("link", "set", outside, "master", hosts.bridge)
                _ip("link", "set", outside, "up")
                _ip("link", "set", inside, "netns", namespace)
                _ip("-n", namespace, "addr", "add", f"{address}/{hosts.subnet.prefixlen}", "dev", inside)
                _ip("-n", namespace, "link", "set", inside, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            hosts.close()
            raise
        return hosts

    def namespace_of(self, pid: int) -> str | None:
        """The named namespace a process runs in (`ip netns identify`), None for the root one."""
        with contextlib.suppress(HostsError):
            return _ip("netns", "identify", str(pid)).strip() or None
        return None

    def close(self) -> None:
        """Remove the namespaces (their veth ends go with them) and the bridge; never raises."""
        for namespace in self.namespaces.values():
            with contextlib.suppress(HostsError, OSError, subprocess.SubprocessError):
                _ip("netns", "delete", namespace)
        with contextlib.suppress(HostsError, OSError, subprocess.SubprocessError):
            _ip("link", "delete", self.bridge)
        self.namespaces.clear()


Placement = Loopback | NetnsHosts
