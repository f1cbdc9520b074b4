"""The one interface every WireGuard backend implements, and the types it speaks.

A backend owns one interface: it creates (or adopts) it, configures the device
(private key, listen port) and the link (MTU, addresses, routes, up), reads peers back
with their counters, applies peer operations computed by :mod:`meshd.core.wgplan`, and
removes everything it created on :meth:`WireGuardBackend.close`.

Every method is a coroutine, and every method is idempotent: ``configure`` against an
interface that already looks right writes nothing, which is what lets the reconciler
and a restarted agent run it as often as they like.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshd.core.wgplan import PeerOp, PeerStatus

DEFAULT_MTU = 1420
DEFAULT_LISTEN_PORT = 51820
MAX_IFNAME = 15


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel a helper task and wait until it has ended.

    Re-cancels until the task is done (a cancellation that races with a finishing
    await can be lost), and never swallows a cancellation of the caller itself."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()


class WireGuardError(Exception):
    """A backend could not do what it was asked; the message is one operator sentence."""


class BackendUnavailable(WireGuardError):
    """The requested backend cannot run on this machine (module, binary or privilege missing)."""


def check_ifname(name: str) -> str:
    """A Linux interface name: 1-15 characters, no '/', whitespace or ':'."""
    if (
        not 0 < len(name) <= MAX_IFNAME
        or name in (".", "..")
        or any(c in name for c in "/: \t\n")
        or not name.isprintable()
    ):
        raise WireGuardError(f"interface name {name!r} is invalid (1-15 characters, no '/' or ':')")
    return name


@dataclass(frozen=True)
class InterfaceConfig:
    """Everything about the interface except its peers.

    ``ipv4``/``ipv6`` are this node's overlay addresses (installed as /32 and /128);
    ``cidr4``/``cidr6`` are the overlay networks, routed into the interface."""

    name: str
    private_key: bytes
    listen_port: int
    ipv4: str
    ipv6: str
    cidr4: str
    cidr6: str
    mtu: int = DEFAULT_MTU

    def __post_init__(self) -> None:
        check_ifname(self.name)
        if len(self.private_key) != 32:
            raise WireGuardError("a WireGuard private key is 32 bytes")
        if not 0 <= self.listen_port < 65536:
            raise WireGuardError(f"listen port {self.listen_port} is out of range")
        if not 1280 <= self.mtu <= 65535:
            raise WireGuardError(f"MTU {self.mtu} is out of range (1280-65535: IPv6 needs 1280)")
        for what, value, version in (
            ("ipv4", self.ipv4, 4),
            ("ipv6", self.ipv6, 6),
            ("cidr4", self.cidr4, 4),
            ("cidr6", self.cidr6, 6),
        ):
            try:
                parsed = (
                    ipaddress.ip_network(value, strict=False)
                    if what.startswith("cidr")
                    else ipaddress.ip_address(value)
                )
            except ValueError:
                raise WireGuardError(f"{what} {value!r} is not an IP address/network") from None
            if parsed.version != version:
                raise WireGuardError(f"{what} {value!r} is not IPv{version}")

    @property
    def routes(self) -> tuple[str, str]:
        return (
            str(ipaddress.ip_network(self.cidr4, strict=False)),
            str(ipaddress.ip_network(self.cidr6, strict=False)),
        )


@dataclass
class BackendStats:
    """Write counters: the idempotence tests compare them before and after a run."""

    device_writes: int = 0  # UAPI ``set`` transactions or WireGuard netlink sets
    link_writes: int = 0  # rtnetlink changes (link, address, route)
    peer_ops: int = 0
    restarts: int = 0
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        return self.device_writes + self.link_writes


class WireGuardBackend(abc.ABC):
    """One WireGuard interface. Subclasses: memory, userspace (wireguard-go), kernel."""

    #: "memory", "userspace" or "kernel"
    kind: str = ""

    def __init__(self, interface: str) -> None:
        self.interface = check_ifname(interface)
        self.stats = BackendStats()
        #: Called (synchronously) when the device lost its state underneath us, e.g. a
        #: restarted wireguard-go: the reconciler re-adds every peer at once.
        self.on_reset: list[Callable[[], None]] = []

    @abc.abstractmethod
    async def open(self, config: InterfaceConfig) -> None:
        """Create or adopt the interface and bring it to ``config``."""

    @abc.abstractmethod
    async def configure(self, config: InterfaceConfig) -> int:
        """Bring device and link to ``config``; return the number of writes (0 if it was
        already right)."""

    @abc.abstractmethod
    async def peers(self) -> dict[bytes, PeerStatus]:
        """Every peer the device has, with handshake time and counters."""

    @abc.abstractmethod
    async def apply(self, ops: Sequence[PeerOp]) -> None:
        """Carry out peer operations (in order); WireGuardError if the device refused."""

    @abc.abstractmethod
    async def public_key(self) -> bytes | None:
        """The device's public key (None if it has no private key yet)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Remove the interface and stop whatever serves it. Safe to call twice."""

    def describe(self) -> dict[str, object]:
        """For /v1/status."""
        return {"backend": self.kind, "interface": self.interface}

    def _reset(self) -> None:
        for cb in list(self.on_reset):
            cb()
