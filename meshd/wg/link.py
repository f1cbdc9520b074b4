"""Link, address and route setup over rtnetlink (pyroute2 ``AsyncIPRoute``), shared by
the userspace and kernel backends.

Read first, write only the difference: an interface that already has the MTU, the
overlay addresses (/32 and /128), the routes for both overlay CIDRs and is up gets no
write at all. Addresses that are not ours (other than IPv6 link-local) are removed,
so an address change after a re-join converges too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from meshd.wg.base import BackendStats, InterfaceConfig, WireGuardError

IFF_UP = 0x1
MAIN_TABLE = 254
RTN_UNICAST = 1
#: Routes we install are tagged "static" (RTPROT_STATIC) like `ip route add` does.
RTPROT_STATIC = 4


def _pyroute2() -> Any:
    try:
        import pyroute2
    except ImportError:  # pragma: no cover - a dependency, but say so clearly
        raise WireGuardError(
            "the Python package pyroute2 is missing (pip install pyroute2)"
        ) from None
    return pyroute2


def netlink_error_code(exc: BaseException) -> int | None:
    from pyroute2.netlink.exceptions import NetlinkError

    return exc.code if isinstance(exc, NetlinkError) else None


@asynccontextmanager
async def iproute(netns: str | None = None) -> AsyncIterator[Any]:
    """An ``AsyncIPRoute`` (in ``netns`` if given), closed on exit."""
    pr = _pyroute2()
    ipr = pr.AsyncIPRoute(netns=netns) if netns else pr.AsyncIPRoute()
    try:
        async with ipr:
            yield ipr
    except OSError as exc:
        code = netlink_error_code(exc)
        if code == errno.EPERM:
            raise WireGuardError(
                "configuring network interfaces needs root (CAP_NET_ADMIN)"
            ) from None
        raise


async def link_index(ipr: Any, name: str) -> int | None:
    found = await ipr.link_lookup(ifname=name)
    return found[0] if found else None


async def delete_link(ipr: Any, name: str) -> bool:
    """Remove the interface if it exists; True if it did."""
    index = await link_index(ipr, name)
    if index is None:
        return False
    try:
        await ipr.link("del", index=index)
    except OSError as exc:
        if netlink_error_code(exc) != errno.ENODEV:
            raise
        return False
    return True


async def setup_link(ipr: Any, config: InterfaceConfig) -> int:
    """Bring the link to ``config``; return how many rtnetlink writes that took."""
    index = await link_index(ipr, config.name)
    if index is None:
        raise WireGuardError(f"interface {config.name} does not exist")
    writes = 0

    # Addresses first: a link that comes up with its addresses in place never answers
    # from a half-configured state.
    want_addrs = {
        ipaddress.ip_interface(f"{config.ipv4}/32"),
        ipaddress.ip_interface(f"{config.ipv6}/128"),
    }
    have_addrs = set()
    async for msg in await ipr.get_addr(index=index):
        addr = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
        if addr is None:
            continue
        iface = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
        if iface.ip.is_link_local:
            continue
        have_addrs.add(iface)
    for iface in sorted(have_addrs - want_addrs, key=str):
        await ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        writes += 1
    for iface in sorted(want_addrs - have_addrs, key=str):
        await ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        writes += 1

    (link,) = await ipr.link("get", index=index)
    change: dict[str, Any] = {}
    if link.get("IFLA_MTU") != config.mtu:
        change["mtu"] = config.mtu
    if not link["flags"] & IFF_UP:
        change["state"] = "up"
    if change:
        await ipr.link("set", index=index, **change)
        writes += 1

    want_routes = {ipaddress.ip_network(r) for r in config.routes}
    have_routes = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        async for msg in await ipr.get_routes(family=family, table=MAIN_TABLE):
            if msg.get("RTA_OIF") != index or msg["type"] != RTN_UNICAST:
                continue
            dst = msg.get("RTA_DST")
            if dst is None:
                continue
            have_routes.add(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
    for net in sorted(want_routes - have_routes, key=str):
        # "replace": the overlay CIDR is ours; a stale route through another device
        # (a previous interface name) must not block it.
        await ipr.route("replace", dst=str(net), oif=index, proto=RTPROT_STATIC)
        writes += 1
    return writes


async def configure_link(netns: str | None, config: InterfaceConfig, stats: BackendStats) -> int:
    """:func:`setup_link` in ``netns`` over a fresh rtnetlink socket, counted in ``stats``."""
    async with iproute(netns) as ipr:
        n = await setup_link(ipr, config)
    stats.link_writes += n
    return n
