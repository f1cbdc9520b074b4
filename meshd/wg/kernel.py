"""The kernel backend: a ``wireguard`` link driven over generic netlink (pyroute2
``AsyncWireGuard``) and rtnetlink (``AsyncIPRoute``).

Support is detected by trying to add a link of kind wireguard: errno 95
(EOPNOTSUPP) means the module is missing. A device dump that does not fit one netlink
message is split by the kernel across several, and one peer may continue in the next
message with the rest of its allowed IPs: :func:`merge_dump` stitches them together by
public key. Keys are base64 on this interface (hex on UAPI, raw bytes inside meshd).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from meshd.core.crypto import WireGuardKey
from meshd.core.wgplan import (
    AddPeer,
    PeerOp,
    PeerStatus,
    RemovePeer,
    endpoint_or_none,
    normalize_cidr,
)
from meshd.core.wire import format_hostport
from meshd.wg import link
from meshd.wg.base import BackendUnavailable, InterfaceConfig, WireGuardBackend, WireGuardError
from meshd.wg.uapi import DeviceState, device_changes


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(value: Any) -> bytes | None:
    if value is None:
        return None
    raw = base64.b64decode(value)
    return raw if any(raw) else None


async def kernel_support(netns: str | None = None) -> tuple[bool, str]:
    """(True, "") when a wireguard link can be created here, else (False, why)."""
    try:
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return False, "the Python package pyroute2 is missing"
    probe = f"wgprobe{os.getpid() % 100_000}"
    try:
        async with link.iproute(netns) as ipr:
            try:
                await ipr.link("add", ifname=probe, kind="wireguard")
            except NetlinkError as exc:
                if exc.code == errno.EOPNOTSUPP:
                    return False, "the kernel has no WireGuard module (errno 95 creating a link)"
                if exc.code == errno.EPERM:
                    return False, "creating a WireGuard link needs root (CAP_NET_ADMIN)"
                if exc.code != errno.EEXIST:
                    return False, f"creating a WireGuard link failed: {exc}"
            await link.delete_link(ipr, probe)
    except (OSError, WireGuardError) as exc:
        return False, f"netlink is not usable: {exc}"
    return True, ""


def _peer_attrs(peer: Any) -> dict[str, Any]:
    return {name: value for name, value in peer.get("attrs", [])} if peer else {}


def merge_dump(messages: Iterable[Any]) -> DeviceState:
    """One device state from a (possibly split) WG_CMD_GET_DEVICE dump."""
    dev = DeviceState()
    keys: list[bytes] = []
    ips: dict[bytes, set[str]] = {}
    fields: dict[bytes, dict[str, Any]] = {}
    for msg in messages:
        priv = msg.get_attr("WGDEVICE_A_PRIVATE_KEY")
        if priv is not None:
            dev.private_key = _unb64(priv)
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT")
        if port is not None:
            dev.listen_port = int(port)
        mark = msg.get_attr("WGDEVICE_A_FWMARK")
        if mark is not None:
            dev.fwmark = int(mark)
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = _unb64(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            if key is None:
                continue
            if key not in fields:
                keys.append(key)
                fields[key] = {}
                ips[key] = set()
            f = fields[key]
            ep = peer.get_attr("WGPEER_A_ENDPOINT")
            if ep is not None and ep.get("addr") and ep.get("port"):
                f["endpoint"] = endpoint_or_none(format_hostport((ep["addr"], ep["port"])))
            hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            if hs is not None:
                sec, nsec = hs.get("tv_sec", 0), hs.get("tv_nsec", 0)
                f["last_handshake"] = (sec + nsec / 1e9) if sec or nsec else None
            for name, attr in (
                ("rx_bytes", "WGPEER_A_RX_BYTES"),
                ("tx_bytes", "WGPEER_A_TX_BYTES"),
                ("keepalive", "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"),
            ):
                value = peer.get_attr(attr)
                if value is not None:
                    f[name] = int(value)
            for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                addr = ip.get("addr")
                if addr:
                    ips[key].add(normalize_cidr(addr))
    for key in keys:
        f = fields[key]
        dev.peers[key] = PeerStatus(
            public_key=key,
            endpoint=f.get("endpoint"),
            allowed_ips=frozenset(ips[key]),
            keepalive=f.get("keepalive", 0),
            last_handshake=f.get("last_handshake"),
            rx_bytes=f.get("rx_bytes", 0),
            tx_bytes=f.get("tx_bytes", 0),
        )
    return dev


def peer_request(op: PeerOp) -> dict[str, Any]:
    """pyroute2's ``peer`` dict for one operation."""
    if isinstance(op, RemovePeer):
        return {"public_key": _b64(op.public_key), "remove": True}
    if isinstance(op, AddPeer):
        key, endpoint = op.peer.public_key, op.peer.endpoint
        ips: frozenset[str] | None = op.peer.allowed_ips
        keepalive: int | None = op.peer.keepalive
        req: dict[str, Any] = {"public_key": _b64(key)}
    else:
        key, endpoint, ips, keepalive = op.public_key, op.endpoint, op.allowed_ips, op.keepalive
        req = {"public_key": _b64(key), "update_only": True}
    if endpoint is not None:
        from meshd.core.wire import split_hostport

        host, port = split_hostport(endpoint)
        req["endpoint_addr"], req["endpoint_port"] = host, port
    if keepalive is not None:
        req["persistent_keepalive"] = keepalive
    if ips is not None:
        req["replace_allowed_ips"] = True
        req["allowed_ips"] = sorted(ips)
    return req


class KernelBackend(WireGuardBackend):
    kind = "kernel"

    def __init__(self, interface: str, *, netns: str | None = None) -> None:
        super().__init__(interface)
        self.netns = netns
        self.config: InterfaceConfig | None = None
        self.created = False

    @asynccontextmanager
    async def _wg(self) -> AsyncIterator[Any]:
        try:
            from pyroute2 import AsyncWireGuard
        except ImportError:
            raise BackendUnavailable("the Python package pyroute2 is missing") from None
        wg = AsyncWireGuard(netns=self.netns) if self.netns else AsyncWireGuard()
        async with wg:
            yield wg

    async def _dump(self) -> DeviceState:
        async with self._wg() as wg:
            msgs = await wg.info(self.interface)
            if not isinstance(msgs, list):
                msgs = [m async for m in msgs]
        return merge_dump(msgs)

    async def open(self, config: InterfaceConfig) -> None:
        self.config = config
        async with link.iproute(self.netns) as ipr:
            if await link.link_index(ipr, self.interface) is None:
                try:
                    await ipr.link("add", ifname=self.interface, kind="wireguard")
                except OSError as exc:
                    if link.netlink_error_code(exc) == errno.EOPNOTSUPP:
                        raise BackendUnavailable(
                            "the kernel has no WireGuard module; use --wg-backend userspace"
                        ) from None
                    raise WireGuardError(f"cannot create {self.interface}: {exc}") from None
                self.stats.link_writes += 1
                self.created = True
        await self.configure(config)

    async def configure(self, config: InterfaceConfig) -> int:
        self.config = config
        key, port = device_changes(await self._dump(), config)
        change: dict[str, Any] = {}
        if key is not None:
            change["private_key"] = _b64(key)
        if port is not None:
            change["listen_port"] = port
        writes = 0
        if change:
            async with self._wg() as wg:
                await wg.set(self.interface, **change)
            self.stats.device_writes += 1
            writes = 1
        return writes + await link.configure_link(self.netns, config, self.stats)

    async def peers(self) -> dict[bytes, PeerStatus]:
        return (await self._dump()).peers

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        if not ops:
            return
        try:
            async with self._wg() as wg:
                for op in ops:
                    await wg.set(self.interface, peer=peer_request(op))
        except OSError as exc:
            self.stats.errors += 1
            raise WireGuardError(f"the kernel refused a peer change: {exc}") from None
        self.stats.device_writes += len(ops)
        self.stats.peer_ops += len(ops)

    async def public_key(self) -> bytes | None:
        dev = await self._dump()
        return None if dev.private_key is None else WireGuardKey(dev.private_key).public

    async def close(self) -> None:
        with contextlib.suppress(OSError, WireGuardError):
            async with link.iproute(self.netns) as ipr:
                await link.delete_link(ipr, self.interface)
