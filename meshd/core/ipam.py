"""Overlay address plan, block leases (leader side) and address assignment (holder side).

The IPv4 CIDR is cut into equal blocks; the IPv6 CIDR mirrors it offset for offset,
so 10.200.0.5 pairs with fd00:200::5 and block i of one with block i of the other.
The leader leases whole blocks; a block's holder assigns single addresses from it,
so any member can admit joiners and no address is ever handed out twice.

Everything here is pure: callers pass the time in, and every choice is deterministic
(lowest free block, lowest free offset) so that replicas and tests agree.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType

DEFAULT_CIDR4 = "10.200.0.0/16"
DEFAULT_CIDR6 = "fd00:200::/48"
DEFAULT_BLOCK_PREFIX4 = 28
MIN_BLOCK_PREFIX4 = 16
MAX_BLOCK_PREFIX4 = 30
# A /31 or /32 leaves no address once the network and broadcast offsets are reserved.
MAX_CIDR_PREFIX4 = 30

_V4_FORBIDDEN: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(n), what)
    for n, what in (
        ("0.0.0.0/8", "'this network'"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved/broadcast"),
    )
)
_V6_FORBIDDEN: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(n), what)
    for n, what in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
_DEFAULT_AVOID_LABEL = "advertise/underlay address"
_NO_ASSIGNMENTS: Mapping[str, int] = MappingProxyType({})


class IpamError(ValueError):
    """Base; ``str()`` is one clear sentence for the operator."""


class InvalidCidr(IpamError):
    """A nonsensical address configuration (the caller's fault)."""


class NoAvailableBlocks(IpamError):
    """The leader has leased every block of the plan."""


class NoAvailableIps(IpamError):
    """A holder's blocks are full."""


class UnknownLease(IpamError):
    """Release or lookup of a block or address not held."""


def _is_int(value: object) -> bool:
    """bool is an int subclass, but True is never a meaningful block or offset."""
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> float | None:
    """The value as a finite float, or None: times come from JSON and may be anything."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class AddressPlan:
    """The cluster's overlay CIDRs and block size; validated on construction."""

    cidr4: IPv4Network
    cidr6: IPv6Network
    block_prefix4: int = DEFAULT_BLOCK_PREFIX4

    def __post_init__(self) -> None:
        """Reject plans no cluster could run on, whichever way they were built."""
        if not isinstance(self.cidr4, IPv4Network):
            raise InvalidCidr(f"cidr4 must be an IPv4 network, not {type(self.cidr4).__name__}")
        if not isinstance(self.cidr6, IPv6Network):
            raise InvalidCidr(f"cidr6 must be an IPv6 network, not {type(self.cidr6).__name__}")
        bp = self.block_prefix4
        if not _is_int(bp):
            raise InvalidCidr(f"block prefix length must be an integer, not {type(bp).__name__}")
        if not MIN_BLOCK_PREFIX4 <= bp <= MAX_BLOCK_PREFIX4:
            raise InvalidCidr(
                f"block prefix /{bp} is out of range; use /{MIN_BLOCK_PREFIX4} to "
                f"/{MAX_BLOCK_PREFIX4} ({1 << (32 - MIN_BLOCK_PREFIX4)} to "
                f"{1 << (32 - MAX_BLOCK_PREFIX4)} addresses per block)"
            )
        net4, net6 = self.cidr4, self.cidr6
        if net4.prefixlen > MAX_CIDR_PREFIX4:
            raise InvalidCidr(
                f"IPv4 CIDR {net4} has no room for a mesh; use /{MAX_CIDR_PREFIX4} or larger "
                f"(for example {DEFAULT_CIDR4})"
            )
        if net4.prefixlen > bp:
            raise InvalidCidr(
                f"IPv4 CIDR {net4} is smaller than one /{bp} block; "
                f"use a larger CIDR or a smaller block size"
            )
        for bad4, what4 in _V4_FORBIDDEN:
            if net4.overlaps(bad4):
                raise InvalidCidr(f"IPv4 CIDR {net4} overlaps the {what4} range {bad4}")
        for bad6, what6 in _V6_FORBIDDEN:
            if net6.overlaps(bad6):
                raise InvalidCidr(f"IPv6 CIDR {net6} overlaps the {what6} range {bad6}")
        if net6.num_addresses < net4.num_addresses:
            need = 128 - (32 - net4.prefixlen)
            raise InvalidCidr(
                f"IPv6 CIDR {net6} is too small to mirror {net4} "
                f"({net4.num_addresses} addresses); use a /{need} or larger"
            )

    @classmethod
    def parse(
        cls,
        cidr4: str = DEFAULT_CIDR4,
        cidr6: str = DEFAULT_CIDR6,
        block_prefix4: int = DEFAULT_BLOCK_PREFIX4,
        avoid: Sequence[str] | Mapping[str, str] = (),
    ) -> AddressPlan:
        """Validate an operator's CIDRs strictly; InvalidCidr names what is wrong.

        ``avoid`` lists underlay addresses or networks (``ADDR``, ``ADDR:PORT``,
        ``[V6]:PORT``, ``NET/LEN``) the overlay must not contain, since routing them into
        the tunnel would cut the node off. A mapping gives each a label for the message.
        Host names are skipped: resolving them is I/O.
        """
        net4 = _parse_net(cidr4, 4)
        net6 = _parse_net(cidr6, 6)
        assert isinstance(net4, IPv4Network) and isinstance(net6, IPv6Network)
        plan = cls(net4, net6, block_prefix4)
        if isinstance(avoid, str):
            avoid = (avoid,)
        if isinstance(avoid, Mapping):
            items = [(k, v) for k, v in avoid.items()]
        elif isinstance(avoid, Iterable):
            items = [(k, _DEFAULT_AVOID_LABEL) for k in avoid]
        else:
            raise InvalidCidr("the addresses to avoid must be a list of strings")
        for item, label in items:
            _check_avoid(net4, net6, item, label)
        return plan

    def to_dict(self) -> dict[str, object]:
        """JSON-able form; ``from_dict`` validates it again."""
        return {
            "cidr4": str(self.cidr4),
            "cidr6": str(self.cidr6),
            "block_prefix4": self.block_prefix4,
        }

    @classmethod
    def from_dict(cls, d: object) -> AddressPlan:
        """Rebuild from ``to_dict`` output; anything else raises InvalidCidr."""
        if not isinstance(d, Mapping):
            raise InvalidCidr("address plan is not a mapping")
        c4, c6, bp = d.get("cidr4"), d.get("cidr6"), d.get("block_prefix4")
        if not isinstance(c4, str) or not isinstance(c6, str):
            raise InvalidCidr("address plan needs cidr4 and cidr6 strings")
        if not _is_int(bp):
            raise InvalidCidr("address plan needs an integer block_prefix4")
        assert isinstance(bp, int)
        return cls.parse(c4, c6, bp)

    @property
    def block_size(self) -> int:
        """Addresses per block (IPv4 and IPv6 alike)."""
        return 1 << (32 - self.block_prefix4)

    @property
    def num_blocks(self) -> int:
        return self.cidr4.num_addresses // self.block_size

    @property
    def size(self) -> int:
        """Number of offsets in the plan (the IPv4 CIDR's size)."""
        return self.cidr4.num_addresses

    def _check_offset(self, offset: int) -> None:
        if not _is_int(offset) or not 0 <= offset < self.size:
            raise IpamError(f"offset {offset!r} is outside {self.cidr4} (0..{self.size - 1})")

    def _check_block(self, index: int) -> None:
        if not _is_int(index) or not 0 <= index < self.num_blocks:
            raise IpamError(f"block {index!r} is outside the plan (0..{self.num_blocks - 1})")

    def block(self, index: int) -> tuple[IPv4Network, IPv6Network]:
        """The IPv4 block and its IPv6 mirror."""
        self._check_block(index)
        start = index * self.block_size
        v4 = IPv4Network((int(self.cidr4.network_address) + start, self.block_prefix4))
        v6 = IPv6Network((int(self.cidr6.network_address) + start, 96 + self.block_prefix4))
        return v4, v6

    def offsets(self, block: int) -> range:
        """Every offset of a block, reserved ones included."""
        self._check_block(block)
        start = block * self.block_size
        return range(start, start + self.block_size)

    def address(self, offset: int) -> tuple[IPv4Address, IPv6Address]:
        self._check_offset(offset)
        return (
            IPv4Address(int(self.cidr4.network_address) + offset),
            IPv6Address(int(self.cidr6.network_address) + offset),
        )

    def offset_of(self, addr: IPv4Address | IPv6Address | str) -> int:
        """Offset of an overlay address, IPv4 or its IPv6 mirror."""
        if isinstance(addr, str):
            try:
                ip: IPv4Address | IPv6Address = ipaddress.ip_address(addr.strip())
            except ValueError:
                raise IpamError(f"{addr!r} is not an IP address") from None
        elif isinstance(addr, IPv4Address | IPv6Address):
            ip = addr
        else:
            raise IpamError(f"{addr!r} is not an IP address")
        if isinstance(ip, IPv4Address):
            if ip not in self.cidr4:
                raise IpamError(f"{ip} is outside the overlay {self.cidr4}")
            return int(ip) - int(self.cidr4.network_address)
        offset = int(ip) - int(self.cidr6.network_address)
        if not 0 <= offset < self.size:
            raise IpamError(f"{ip} is outside the part of {self.cidr6} that mirrors {self.cidr4}")
        return offset

    def block_of_offset(self, offset: int) -> int:
        self._check_offset(offset)
        return offset // self.block_size

    def is_reserved(self, offset: int) -> bool:
        """Offset 0 (network / subnet-router anycast) and the IPv4 broadcast are never used."""
        self._check_offset(offset)
        return offset == 0 or offset == self.size - 1

    def usable_in_block(self, block: int) -> int:
        """How many addresses of a block can be handed out."""
        self._check_block(block)
        reserved = (block == 0) + (block == self.num_blocks - 1)
        return self.block_size - reserved


def _parse_net(text: object, version: int) -> IPv4Network | IPv6Network:
    what = f"IPv{version} CIDR"
    example = DEFAULT_CIDR4 if version == 4 else DEFAULT_CIDR6
    if not isinstance(text, str):
        raise InvalidCidr(f"{what} must be a string such as {example}")
    s = text.strip()
    if "%" in s:
        raise InvalidCidr(
            f"{what} {s!r} carries a scope id; give a plain network such as {example}"
        )
    if "/" not in s:
        raise InvalidCidr(f"{what} {s!r} has no prefix length; give a network such as {example}")
    try:
        loose = ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise InvalidCidr(
            f"{what} {s!r} is not a valid network (expected e.g. {example})"
        ) from None
    if loose.version != version:
        raise InvalidCidr(f"{what} {s!r} is an IPv{loose.version} network, not IPv{version}")
    try:
        return ipaddress.ip_network(s, strict=True)
    except ValueError:
        raise InvalidCidr(f"{s} has host bits set; did you mean {loose}?") from None


def _avoid_net(item: str) -> IPv4Network | IPv6Network | None:
    """The address or network in an avoid entry; None for host names and junk."""
    host = item.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # ADDR:PORT; IPv6 has at least two colons
        host = host.partition(":")[0]
    host = host.partition("%")[0]
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        return None


def _check_avoid(net4: IPv4Network, net6: IPv6Network, item: object, label: object) -> None:
    if not isinstance(item, str) or not isinstance(label, str):
        raise InvalidCidr("the addresses to avoid must be strings")
    other = _avoid_net(item)
    if other is None:
        return
    net: IPv4Network | IPv6Network = net4 if other.version == 4 else net6
    if net.overlaps(other):
        shown = str(other.network_address) if other.num_addresses == 1 else str(other)
        extra = "" if item.strip() == shown else f" {item.strip()}"
        raise InvalidCidr(
            f"overlay CIDR {net} overlaps {shown} ({label}{extra}); "
            f"choose an overlay CIDR that does not contain it"
        )


@dataclass(frozen=True)
class BlockLease:
    """One block leased to one member, as the leader records it."""

    block: int
    holder: str
    granted_by: str
    granted_at: float
    expires: float | None  # None: until released

    def __post_init__(self) -> None:
        """Leases are persisted and exchanged, so a malformed one must fail loudly here."""
        if not _is_int(self.block) or self.block < 0:
            raise IpamError(f"lease block must be a non-negative integer, not {self.block!r}")
        if not isinstance(self.holder, str) or not self.holder:
            raise IpamError("lease holder must be a non-empty string")
        if not isinstance(self.granted_by, str):
            raise IpamError("lease granted_by must be a string")
        if _finite(self.granted_at) is None:
            raise IpamError("lease granted_at must be a finite number")
        if self.expires is not None and _finite(self.expires) is None:
            raise IpamError("lease expires must be a finite number or null")

    def to_dict(self) -> dict[str, object]:
        return {
            "block": self.block,
            "holder": self.holder,
            "granted_by": self.granted_by,
            "granted_at": self.granted_at,
            "expires": self.expires,
        }

    @classmethod
    def from_dict(cls, d: object) -> BlockLease:
        """Strict: a missing or mistyped field raises IpamError."""
        if not isinstance(d, Mapping):
            raise IpamError("lease entry is not a mapping")
        block, holder, by = d.get("block"), d.get("holder"), d.get("granted_by")
        at, exp = _finite(d.get("granted_at")), d.get("expires")
        if not _is_int(block):
            raise IpamError("lease block must be an integer")
        if not isinstance(holder, str) or not isinstance(by, str):
            raise IpamError("lease holder and granted_by must be strings")
        if at is None:
            raise IpamError("lease granted_at must be a finite number")
        until = None if exp is None else _finite(exp)
        if exp is not None and until is None:
            raise IpamError("lease expires must be a finite number or null")
        assert isinstance(block, int)
        return cls(block, holder, by, at, until)


class LeaseTable:
    """Leader side: which member holds which block. Deterministic: lowest free block first."""

    def __init__(self, plan: AddressPlan, leases: Iterable[BlockLease] = ()) -> None:
        self.plan = plan
        self._leases: dict[int, BlockLease] = {}
        for lease in leases:
            if not isinstance(lease, BlockLease):
                raise IpamError("lease table entries must be block leases")
            if lease.block >= plan.num_blocks:
                raise IpamError(
                    f"lease for block {lease.block} is outside the plan (0..{plan.num_blocks - 1})"
                )
            if lease.block in self._leases:
                raise IpamError(f"block {lease.block} is leased twice")
            self._leases[lease.block] = lease

    def grant(
        self, holder: str, granted_by: str, now: float, ttl: float | None = None
    ) -> BlockLease:
        """Lease the lowest free block; NoAvailableBlocks when every block is taken."""
        if len(self._leases) < self.plan.num_blocks:
            for block in range(self.plan.num_blocks):
                if block not in self._leases:
                    return self.grant_block(block, holder, granted_by, now, ttl)
        raise NoAvailableBlocks(
            f"all {self.plan.num_blocks} address blocks of {self.plan.cidr4} are leased; "
            f"release unused members or use a larger CIDR"
        )

    def grant_block(
        self, block: int, holder: str, granted_by: str, now: float, ttl: float | None = None
    ) -> BlockLease:
        """Lease one specific free block (the leader adopting a released block)."""
        self.plan._check_block(block)
        if block in self._leases:
            raise IpamError(f"block {block} is already leased to {self._leases[block].holder}")
        if ttl is not None and (_finite(ttl) is None or ttl <= 0):
            raise IpamError(f"lease ttl must be a positive number of seconds, not {ttl!r}")
        if _finite(now) is None:
            raise IpamError(f"lease time must be a finite number, not {now!r}")
        lease = BlockLease(block, holder, granted_by, now, None if ttl is None else now + ttl)
        self._leases[block] = lease
        return lease

    def release(self, block: int, holder: str) -> BlockLease:
        """Only the holder may give a block back: a stale member must not free another's."""
        lease = self._leases.get(block)
        if lease is None:
            raise UnknownLease(f"block {block!r} is not leased")
        if lease.holder != holder:
            raise UnknownLease(f"block {block} is leased to {lease.holder}, not {holder}")
        return self._leases.pop(block)

    def release_holder(self, holder: str) -> list[BlockLease]:
        return [self.release(x.block, holder) for x in self.held_by(holder)]

    def expire(self, now: float) -> list[BlockLease]:
        """Drop leases whose time is up (``expires <= now``)."""
        gone = [x for x in self.leases() if x.expires is not None and x.expires <= now]
        for x in gone:
            del self._leases[x.block]
        return gone

    def leases(self) -> list[BlockLease]:
        return [self._leases[b] for b in sorted(self._leases)]

    def held_by(self, holder: str) -> list[BlockLease]:
        return [x for x in self.leases() if x.holder == holder]

    def holder_of(self, block: int) -> str | None:
        lease = self._leases.get(block)
        return lease.holder if lease is not None else None

    def to_list(self) -> list[dict[str, object]]:
        return [x.to_dict() for x in self.leases()]

    @classmethod
    def from_list(cls, plan: AddressPlan, items: object) -> LeaseTable:
        """Rebuild from ``to_list`` output; anything else raises IpamError."""
        if not isinstance(items, list):
            raise IpamError("lease table is not a list")
        return cls(plan, [BlockLease.from_dict(x) for x in items])


class BlockAllocator:
    """Holder side: hands out addresses (as offsets) from this member's blocks, none twice.

    Deterministic: lowest free non-reserved offset first. Keyed by assignee, so assigning
    again returns the same offset: a join retry never burns an address.
    """

    def __init__(
        self,
        plan: AddressPlan,
        blocks: Iterable[int] = (),
        assignments: Mapping[str, int] = _NO_ASSIGNMENTS,
    ) -> None:
        self.plan = plan
        self._blocks: set[int] = set()
        self._by_who: dict[str, int] = {}
        self._who_at: dict[int, str] = {}
        self._used: dict[int, int] = {}  # block -> addresses assigned in it
        for block in blocks:
            self.add_block(block)
        for who, offset in assignments.items():
            self._adopt(who, offset)

    def _adopt(self, who: object, offset: object) -> None:
        if not isinstance(who, str) or not who:
            raise IpamError(f"assignee {who!r} must be a non-empty string")
        if not _is_int(offset):
            raise IpamError(f"offset {offset!r} of {who} must be an integer")
        assert isinstance(offset, int)
        if who in self._by_who:
            raise IpamError(f"{who} has two addresses")
        try:
            block = self.plan.block_of_offset(offset)
        except IpamError:
            raise IpamError(f"offset {offset} of {who} is outside {self.plan.cidr4}") from None
        if block not in self._blocks:
            raise IpamError(f"offset {offset} of {who} is not in a block this node holds")
        if self.plan.is_reserved(offset):
            raise IpamError(f"offset {offset} of {who} is reserved and cannot be assigned")
        if offset in self._who_at:
            raise IpamError(f"offset {offset} is assigned to both {self._who_at[offset]} and {who}")
        self._take(who, offset, block)

    def _take(self, who: str, offset: int, block: int) -> None:
        self._by_who[who] = offset
        self._who_at[offset] = who
        self._used[block] = self._used.get(block, 0) + 1

    def add_block(self, block: int) -> None:
        """Start handing out a newly leased block; adding a held block again is a no-op."""
        self.plan._check_block(block)
        self._blocks.add(block)

    def remove_block(self, block: int) -> list[str]:
        """Give a block up; returns the assignees that lost their address."""
        if block not in self._blocks:
            raise UnknownLease(f"block {block!r} is not held by this node")
        self._blocks.discard(block)
        lost = [w for o, w in sorted(self._who_at.items()) if o // self.plan.block_size == block]
        for w in lost:
            del self._who_at[self._by_who.pop(w)]
        self._used.pop(block, None)
        return lost

    def blocks(self) -> list[int]:
        return sorted(self._blocks)

    def assign(self, assignee: str) -> int:
        """Offset for ``assignee`` (the same one again if it already has one)."""
        if not isinstance(assignee, str) or not assignee:
            raise IpamError(f"assignee {assignee!r} must be a non-empty string")
        if assignee in self._by_who:
            return self._by_who[assignee]
        for block in sorted(self._blocks):
            if self._used.get(block, 0) >= self.plan.usable_in_block(block):
                continue
            for offset in self.plan.offsets(block):
                if offset not in self._who_at and not self.plan.is_reserved(offset):
                    self._take(assignee, offset, block)
                    return offset
        if not self._blocks:
            raise NoAvailableIps("this node holds no address block to assign from")
        raise NoAvailableIps(
            f"all {len(self._who_at)} usable addresses of the {len(self._blocks)} block(s) "
            f"this node holds are assigned"
        )

    def release(self, assignee: str) -> int | None:
        """Free an assignee's address; None if it had none."""
        offset = self._by_who.pop(assignee, None)
        if offset is not None:
            del self._who_at[offset]
            self._used[offset // self.plan.block_size] -= 1
        return offset

    def assignment(self, assignee: str) -> int | None:
        return self._by_who.get(assignee)

    def assignments(self) -> dict[str, int]:
        """Assignee -> offset, ordered by offset."""
        return {self._who_at[o]: o for o in sorted(self._who_at)}

    def free_count(self) -> int:
        usable = sum(self.plan.usable_in_block(b) for b in self._blocks)
        return usable - len(self._who_at)

    def to_dict(self) -> dict[str, object]:
        return {"blocks": self.blocks(), "assignments": self.assignments()}

    @classmethod
    def from_dict(cls, plan: AddressPlan, d: object) -> BlockAllocator:
        """Rebuild from ``to_dict`` output; anything else raises IpamError."""
        if not isinstance(d, Mapping):
            raise IpamError("allocator state is not a mapping")
        blocks, asg = d.get("blocks"), d.get("assignments")
        if not isinstance(blocks, list) or not isinstance(asg, Mapping):
            raise IpamError("allocator state needs a blocks list and an assignments mapping")
        allocator = cls(plan, blocks, asg)
        if len(allocator.blocks()) != len(blocks):
            raise IpamError("allocator state lists a block twice")
        return allocator
