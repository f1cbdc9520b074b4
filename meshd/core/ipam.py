"""Overlay address plan, block leases (leader side) and address assignment (holder side).

The IPv4 CIDR is cut into equal blocks; the IPv6 CIDR mirrors it offset for offset,
so 10.200.0.5 pairs with fd00:200::5 and block i of one with block i of the other.
The leader leases whole blocks; a block's holder assigns single addresses from it,
so any member can admit joiners and no address is ever handed out twice.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

_V4_FORBIDDEN = tuple(
    IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
)
_V6_FORBIDDEN = tuple(IPv6Network(n) for n in ("::/128", "::1/128", "fe80::/10", "ff00::/8"))


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


@dataclass(frozen=True)
class AddressPlan:
    cidr4: IPv4Network
    cidr6: IPv6Network
    block_prefix4: int = 28

    @classmethod
    def parse(
        cls,
        cidr4: str = "10.200.0.0/16",
        cidr6: str = "fd00:200::/48",
        block_prefix4: int = 28,
        avoid: Sequence[str] = (),
    ) -> AddressPlan:
        """Validate an operator's CIDRs; InvalidCidr names what is wrong."""
        net4 = _parse_net(cidr4, 4)
        net6 = _parse_net(cidr6, 6)
        assert isinstance(net4, IPv4Network) and isinstance(net6, IPv6Network)
        if isinstance(block_prefix4, bool) or not isinstance(block_prefix4, int):
            raise InvalidCidr("the block prefix length must be an integer")
        if not 16 <= block_prefix4 <= 30:
            raise InvalidCidr(f"block prefix /{block_prefix4} must be between /16 and /30")
        if net4.prefixlen > 30:
            raise InvalidCidr(f"IPv4 CIDR {net4} is too small for a mesh (at most /30)")
        if net4.prefixlen > block_prefix4:
            raise InvalidCidr(
                f"IPv4 CIDR {net4} is smaller than one /{block_prefix4} address block"
            )
        if (128 - net6.prefixlen) < (32 - net4.prefixlen):
            raise InvalidCidr(
                f"IPv6 CIDR {net6} is too small to mirror {net4} "
                f"(needs at least a /{128 - (32 - net4.prefixlen)})"
            )
        for bad in _V4_FORBIDDEN:
            if net4.overlaps(bad):
                raise InvalidCidr(f"IPv4 CIDR {net4} overlaps reserved range {bad}")
        for bad6 in _V6_FORBIDDEN:
            if net6.overlaps(bad6):
                raise InvalidCidr(f"IPv6 CIDR {net6} overlaps reserved range {bad6}")
        for item in avoid:
            _check_avoid(net4, net6, item)
        return cls(net4, net6, block_prefix4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cidr4": str(self.cidr4),
            "cidr6": str(self.cidr6),
            "block_prefix4": self.block_prefix4,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AddressPlan:
        if not isinstance(d, Mapping):
            raise InvalidCidr("address plan is not a mapping")
        c4, c6, bp = d.get("cidr4"), d.get("cidr6"), d.get("block_prefix4")
        if not isinstance(c4, str) or not isinstance(c6, str):
            raise InvalidCidr("address plan needs cidr4 and cidr6 strings")
        if isinstance(bp, bool) or not isinstance(bp, int):
            raise InvalidCidr("address plan needs an integer block_prefix4")
        return cls.parse(c4, c6, bp)

    @property
    def block_size(self) -> int:
        return 1 << (32 - self.block_prefix4)

    @property
    def num_blocks(self) -> int:
        return self.cidr4.num_addresses // self.block_size

    @property
    def size(self) -> int:
        return self.cidr4.num_addresses

    def block(self, index: int) -> tuple[IPv4Network, IPv6Network]:
        if not 0 <= index < self.num_blocks:
            raise IpamError(f"block {index} is outside the plan (0..{self.num_blocks - 1})")
        start = index * self.block_size
        v4 = IPv4Network((int(self.cidr4.network_address) + start, self.block_prefix4))
        prefix6 = 128 - (32 - self.block_prefix4)
        v6 = IPv6Network((int(self.cidr6.network_address) + start, prefix6))
        return v4, v6

    def address(self, offset: int) -> tuple[IPv4Address, IPv6Address]:
        if not 0 <= offset < self.size:
            raise IpamError(f"offset {offset} is outside {self.cidr4}")
        return (
            IPv4Address(int(self.cidr4.network_address) + offset),
            IPv6Address(int(self.cidr6.network_address) + offset),
        )

    def offset_of(self, addr: IPv4Address | IPv6Address | str) -> int:
        try:
            ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
        except ValueError:
            raise IpamError(f"{addr!r} is not an IP address") from None
        if isinstance(ip, IPv4Address):
            if ip not in self.cidr4:
                raise IpamError(f"{ip} is outside {self.cidr4}")
            return int(ip) - int(self.cidr4.network_address)
        offset = int(ip) - int(self.cidr6.network_address)
        if ip not in self.cidr6 or offset >= self.size:
            raise IpamError(f"{ip} is outside the mirrored part of {self.cidr6}")
        return offset

    def block_of_offset(self, offset: int) -> int:
        if not 0 <= offset < self.size:
            raise IpamError(f"offset {offset} is outside {self.cidr4}")
        return offset // self.block_size

    def is_reserved(self, offset: int) -> bool:
        """The network address (and its IPv6 mirror) and the IPv4 broadcast address."""
        return offset == 0 or offset == self.size - 1

    def offsets(self, block: int) -> range:
        start = block * self.block_size
        return range(start, start + self.block_size)


def _parse_net(text: str, version: int) -> IPv4Network | IPv6Network:
    if not isinstance(text, str):
        raise InvalidCidr(f"IPv{version} CIDR must be a string")
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InvalidCidr(f"{text!r} is not a valid IPv{version} CIDR") from None
    if net.version != version:
        raise InvalidCidr(f"{text!r} is not an IPv{version} CIDR")
    if str(net) != text.strip() and "/" in text:
        strict = ipaddress.ip_network(text.strip(), strict=False)
        if int(ipaddress.ip_interface(text.strip()).ip) != int(strict.network_address):
            raise InvalidCidr(f"{text} has host bits set; did you mean {strict}?")
    if "/" not in text:
        raise InvalidCidr(f"{text!r} has no prefix length (e.g. {text}/16)")
    return net


def _check_avoid(net4: IPv4Network, net6: IPv6Network, item: str) -> None:
    text = item.strip()
    host = text
    if text.startswith("["):
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        host = text.partition(":")[0]
    try:
        other = ipaddress.ip_network(host, strict=False)
    except ValueError:
        return  # a host name: nothing to compare
    net = net4 if other.version == 4 else net6
    if net.overlaps(other):
        raise InvalidCidr(f"overlay CIDR {net} overlaps {host} (an underlay address)")


@dataclass(frozen=True)
class BlockLease:
    block: int
    holder: str
    granted_by: str
    granted_at: float
    expires: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "holder": self.holder,
            "granted_by": self.granted_by,
            "granted_at": self.granted_at,
            "expires": self.expires,
        }

    @classmethod
    def from_dict(cls, d: Any) -> BlockLease:
        if not isinstance(d, Mapping):
            raise IpamError("lease entry is not a mapping")
        block, holder, gby = d.get("block"), d.get("holder"), d.get("granted_by")
        at, exp = d.get("granted_at"), d.get("expires")
        if isinstance(block, bool) or not isinstance(block, int):
            raise IpamError("lease block must be an integer")
        if not isinstance(holder, str) or not holder or not isinstance(gby, str):
            raise IpamError("lease holder and granted_by must be strings")
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise IpamError("lease granted_at must be a number")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
            raise IpamError("lease expires must be a number or null")
        return cls(block, holder, gby, float(at), None if exp is None else float(exp))


class LeaseTable:
    """Leader side: which member holds which block. Lowest free block first."""

    def __init__(self, plan: AddressPlan, leases: Iterable[BlockLease] = ()) -> None:
        self.plan = plan
        self._leases: dict[int, BlockLease] = {}
        for lease in leases:
            if not 0 <= lease.block < plan.num_blocks:
                raise IpamError(f"lease for block {lease.block} is outside the plan")
            if lease.block in self._leases:
                raise IpamError(f"block {lease.block} is leased twice")
            self._leases[lease.block] = lease

    def grant(
        self, holder: str, granted_by: str, now: float, ttl: float | None = None
    ) -> BlockLease:
        for block in range(self.plan.num_blocks):
            if block not in self._leases:
                return self.grant_block(block, holder, granted_by, now, ttl)
        raise NoAvailableBlocks(
            f"all {self.plan.num_blocks} address blocks of {self.plan.cidr4} are leased"
        )

    def grant_block(
        self, block: int, holder: str, granted_by: str, now: float, ttl: float | None = None
    ) -> BlockLease:
        """Lease one specific free block (used when the leader adopts a released block)."""
        if not 0 <= block < self.plan.num_blocks:
            raise IpamError(f"block {block} is outside the plan")
        if block in self._leases:
            raise IpamError(f"block {block} is already leased to {self._leases[block].holder}")
        lease = BlockLease(block, holder, granted_by, now, None if ttl is None else now + ttl)
        self._leases[block] = lease
        return lease

    def release(self, block: int, holder: str) -> BlockLease:
        lease = self._leases.get(block)
        if lease is None or lease.holder != holder:
            raise UnknownLease(f"block {block} is not leased to {holder}")
        return self._leases.pop(block)

    def release_holder(self, holder: str) -> list[BlockLease]:
        return [self.release(x.block, holder) for x in self.held_by(holder)]

    def expire(self, now: float) -> list[BlockLease]:
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
        return lease.holder if lease else None

    def to_list(self) -> list[dict[str, Any]]:
        return [x.to_dict() for x in self.leases()]

    @classmethod
    def from_list(cls, plan: AddressPlan, items: Any) -> LeaseTable:
        if not isinstance(items, list):
            raise IpamError("lease table is not a list")
        return cls(plan, [BlockLease.from_dict(x) for x in items])


class BlockAllocator:
    """Holder side: addresses (as offsets) from this member's blocks, none twice.

    Keyed by assignee, so assigning again returns the same offset: a join retry
    never burns an address.
    """

    def __init__(
        self,
        plan: AddressPlan,
        blocks: Iterable[int] = (),
        assignments: Mapping[str, int] | None = None,
    ) -> None:
        self.plan = plan
        self._blocks: set[int] = set()
        self._by_who: dict[str, int] = {}
        self._used: set[int] = set()
        for block in blocks:
            self.add_block(block)
        for who, offset in (assignments or {}).items():
            self._adopt(who, offset)

    def _adopt(self, who: str, offset: int) -> None:
        if not isinstance(who, str) or isinstance(offset, bool) or not isinstance(offset, int):
            raise IpamError("assignments map names to integer offsets")
        if who in self._by_who:
            raise IpamError(f"{who} has two addresses")
        try:
            block = self.plan.block_of_offset(offset)
        except IpamError:
            raise IpamError(f"offset {offset} of {who} is outside the plan") from None
        if block not in self._blocks or self.plan.is_reserved(offset):
            raise IpamError(f"offset {offset} of {who} is not assignable from this node's blocks")
        if offset in self._used:
            raise IpamError(f"offset {offset} is assigned twice")
        self._by_who[who] = offset
        self._used.add(offset)

    def add_block(self, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, int):
            raise IpamError("block index must be an integer")
        if not 0 <= block < self.plan.num_blocks:
            raise IpamError(f"block {block} is outside the plan")
        self._blocks.add(block)

    def remove_block(self, block: int) -> list[str]:
        if block not in self._blocks:
            raise UnknownLease(f"block {block} is not held")
        self._blocks.discard(block)
        lost = [w for w, o in self._by_who.items() if self.plan.block_of_offset(o) == block]
        for w in lost:
            self._used.discard(self._by_who.pop(w))
        return lost

    def blocks(self) -> list[int]:
        return sorted(self._blocks)

    def assign(self, assignee: str) -> int:
        if assignee in self._by_who:
            return self._by_who[assignee]
        for block in sorted(self._blocks):
            for offset in self.plan.offsets(block):
                if offset not in self._used and not self.plan.is_reserved(offset):
                    self._by_who[assignee] = offset
                    self._used.add(offset)
                    return offset
        raise NoAvailableIps(
            f"no free address in this node's {len(self._blocks)} block(s) "
            f"({len(self._used)} addresses assigned)"
        )

    def release(self, assignee: str) -> int | None:
        offset = self._by_who.pop(assignee, None)
        if offset is not None:
            self._used.discard(offset)
        return offset

    def assignment(self, assignee: str) -> int | None:
        return self._by_who.get(assignee)

    def assignments(self) -> dict[str, int]:
        return dict(sorted(self._by_who.items(), key=lambda kv: kv[1]))

    def free_count(self) -> int:
        total = sum(
            1 for b in self._blocks for o in self.plan.offsets(b) if not self.plan.is_reserved(o)
        )
        return total - len(self._used)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks(), "assignments": self.assignments()}

    @classmethod
    def from_dict(cls, plan: AddressPlan, d: Any) -> BlockAllocator:
        if not isinstance(d, Mapping):
            raise IpamError("allocator state is not a mapping")
        blocks, asg = d.get("blocks"), d.get("assignments")
        if not isinstance(blocks, list) or not isinstance(asg, Mapping):
            raise IpamError("allocator state needs a blocks list and an assignments mapping")
        return cls(plan, blocks, asg)
