"""The mesh's DNS names: a pure, incrementally maintained view of the zone.

Sans-I/O like the rest of ``meshd/core``: no sockets, no clock, no randomness. The
agent feeds it members (from verified peer records), their SWIM states and the
leader's id; :mod:`meshd.dns` answers queries from it with plain dict look-ups.

Names, all under the zone (default ``mesh.internal.``, INTERFACE.md):

* ``<name>`` — the member's node name (a DNS label);
* ``<hostname>`` — its custom hostname, relative to the zone (``web.prod`` becomes
  ``web.prod.mesh.internal.``; a hostname that already ends in the zone is taken as is);
* ``node-X-Y`` — derived from the IPv4 overlay address, and ``node-x`` from the IPv6 one;
* ``leader`` — the current leader.

Each name has an A and an AAAA record (the member's two overlay addresses), TTL
:data:`DEFAULT_TTL`. Each overlay address has a PTR record in the reverse zones that
cover the address plan; it points at the member's node name, or at its IPv4-derived
name when the member does not hold its node name.

**Address-derived names never collide.** How many groups a name carries follows from
the address plan, not from who happens to be a member: an IPv4 name has as many
decimal octets as the plan has octets with host bits, at least two (the reference's
``node-X-Y``): ``node-0-5`` for 10.200.0.5 in a /16 or /24, ``node-200-0-5`` in a /8.
An IPv6 name has the plan's varying 16-bit groups, at least one, printed like the
address (lower-case hex, no leading zeros): ``node-5`` for fd00:200::5 when the IPv4
plan is a /16 or smaller, ``node-1-5`` beyond that. Two addresses of one plan never
share a name, so a name never points at the wrong member and never changes meaning
when another member joins; IPv4 and IPv6 names differ in group count, so they cannot
collide either. These names and ``leader`` are *reserved*: a node name or hostname
spelled like one (``node-1`` in a /16 plan) is refused unless it is the member's own.

**Who is in the zone.** Members that are ``alive`` or ``suspect``. A suspect member is
usually alive (a lost probe or two); dropping it would make names flap. A ``dead`` or
``left`` member, or one without a SWIM state, disappears at once.

**Conflicts** (two members claiming one name) are settled the same way on every node,
from replicated data only. Claims rank first by kind — ``leader``, then
address-derived names, then node names, then hostnames — so a hostname never takes
another member's node name; within a kind the earlier admission wins (the admission
certificate's ``issued_at``), then the lower node id. An established member thus
keeps its name when a newcomer claims it; when the winner leaves, the next claimant
gets the name. Every losing or refused claim is reported by :meth:`ZoneView.conflicts`.

**Serial.** The SOA serial is a CRC-32 over the member records, combined with XOR so it
is maintained per change: nodes with the same view serve the same serial (it tells
copies apart; it does not grow like a counter). SOA MNAME and the NS target name the
serving node itself, so those two differ from node to node.
"""

from __future__ import annotations

import enum
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final

from meshd.core.ipam import AddressPlan, IpamError
from meshd.core.membership import MemberState
from meshd.core.records import PeerRecord, is_dns_label, normalize_hostname

DEFAULT_ZONE: Final = "mesh.internal."
DEFAULT_TTL: Final = 5
LEADER_LABEL: Final = "leader"
IP_NAME_PREFIX: Final = "node-"
#: States whose members are in the zone.
INCLUDED: Final = frozenset({MemberState.ALIVE, MemberState.SUSPECT})
#: A name's wire form is at most 255 octets: text with the final dot at most 254.
MAX_NAME_TEXT: Final = 254
SOA_REFRESH: Final = 3_600
SOA_RETRY: Final = 600
SOA_EXPIRE: Final = 86_400

_ARPA: Final = ".arpa."
_HEX_GROUP: Final = re.compile(r"^(0|[1-9a-f][0-9a-f]{0,3})$")
_DEC_GROUP: Final = re.compile(r"^(0|[1-9][0-9]{0,2})$")


class Kind(enum.IntEnum):
    """What a claim on a name is; a lower value wins a contested name."""

    LEADER = 0
    ADDRESS = 1
    NODE = 2
    HOSTNAME = 3

    @property
    def label(self) -> str:
        return {0: "leader", 1: "address", 2: "node name", 3: "hostname"}[self.value]


#: (kind, admitted_at, node_id): the lowest claim wins.
Rank = tuple[int, float, bytes]


@dataclass(frozen=True)
class Member:
    """What naming needs of a member; everything comes from its verified record."""

    node_id: bytes
    name: str
    hostname: str | None
    offset: int
    admitted_at: float

    @classmethod
    def from_record(cls, rec: PeerRecord) -> Member:
        return cls(
            node_id=rec.node_id,
            name=rec.name,
            hostname=rec.hostname,
            offset=rec.admission.offset,
            admitted_at=rec.admission.issued_at,
        )


@dataclass(frozen=True, slots=True)
class _Derived:
    """A member's names, computed once per record version."""

    v4: IPv4Address
    v6: IPv6Address
    ip4: str
    ip6: str
    rev4: str
    rev6: str
    node: str | None
    host: Host


@dataclass(frozen=True)
class Host:
    """A forward name's records: the owning member's overlay addresses."""

    node_id: bytes
    a: IPv4Address
    aaaa: IPv6Address


@dataclass(frozen=True)
class Pointer:
    """A reverse name's PTR target (a fully qualified name)."""

    node_id: bytes
    target: str


Entry = Host | Pointer


@dataclass(frozen=True)
class Soa:
    mname: str
    rname: str
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int


@dataclass(frozen=True)
class Conflict:
    """A claim that did not get its name: taken by ``winner``, or refused (winner None)."""

    name: str
    kind: str
    node_id: bytes
    winner: bytes | None
    reason: str

    def to_json(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "kind": self.kind,
            "node_id": self.node_id.hex(),
            "winner": self.winner.hex() if self.winner is not None else None,
            "reason": self.reason,
        }


# ----------------------------------------------------------------------- name rules


def normalize_zone(zone: str) -> str:
    """``Mesh.Internal`` -> ``mesh.internal.``; ValueError if it is not a DNS name."""
    return normalize_hostname(zone) + "."


def ip_name_groups(plan: AddressPlan) -> tuple[int, int]:
    """How many groups IPv4- and IPv6-derived names carry in this plan.

    Host bits h = 32 - IPv4 prefix; IPv6 addresses mirror IPv4 offsets, so they vary in
    the same h low bits. IPv4: ceil(h / 8) octets, at least 2; IPv6: ceil(h / 16) groups,
    at least 1. Since h <= 32 the IPv6 count is at most 2 and is 2 only when h > 16,
    where the IPv4 count is at least 3: the two kinds never have the same group count.
    """
    h = 32 - plan.cidr4.prefixlen
    return max(2, math.ceil(h / 8)), max(1, math.ceil(h / 16))


def ip_name4(addr: IPv4Address, groups: int) -> str:
    return IP_NAME_PREFIX + "-".join(str(b) for b in addr.packed[-groups:])


def ip_name6(addr: IPv6Address, groups: int) -> str:
    packed = addr.packed
    words = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, 16, 2)]
    return IP_NAME_PREFIX + "-".join(f"{w:x}" for w in words[-groups:])


def reverse_name(addr: IPv4Address | IPv6Address) -> str:
    """``5.0.200.10.in-addr.arpa.`` / the 32-nibble ``ip6.arpa.`` name (RFC 1035, 3596)."""
    if isinstance(addr, IPv4Address):
        return ".".join(str(b) for b in reversed(addr.packed)) + ".in-addr.arpa."
    return ".".join(reversed(f"{int(addr):032x}")) + ".ip6.arpa."


def reverse_zones(plan: AddressPlan) -> tuple[str, ...]:
    """The reverse zones covering the plan's CIDRs (RFC 1035 / RFC 3596).

    A prefix on an octet (IPv4) or nibble (IPv6) boundary is one zone; any other
    prefix is covered by the zones of its subnets at the next boundary (a /20 by
    sixteen /24 zones), so the server is never authoritative outside the plan."""
    zones: list[str] = []
    for net, step in ((plan.cidr4, 8), (plan.cidr6, 4)):
        bound = math.ceil(net.prefixlen / step) * step
        subnets: Iterable[IPv4Network | IPv6Network] = (
            net.subnets(new_prefix=bound) if bound != net.prefixlen else (net,)
        )
        for sub in subnets:
            zones.append(_reverse_apex(sub, step))
    return tuple(zones)


def _reverse_apex(net: IPv4Network | IPv6Network, step: int) -> str:
    labels = net.network_address.reverse_pointer.split(".")
    suffix = 2  # in-addr.arpa / ip6.arpa
    total = len(labels) - suffix
    keep = net.prefixlen // step
    return ".".join(labels[total - keep :]) + "."


def _parent(name: str) -> str:
    return name.split(".", 1)[1]


# ------------------------------------------------------------------------ the view


class ZoneView:
    """The zone as this node serves it, kept up to date member by member.

    Mutators return True when anything a query could see changed (and bump
    :attr:`version`, which the server's answer cache keys on). Reads are dict look-ups
    on lower-case names with the final dot. The DNS server's UDP threads read while
    the event loop writes, so every change a read could see is followed by a bump of
    :attr:`version` before the mutator returns (an entry's last write is
    ``_set_entry``, which bumps after it), and each read is a single look-up."""

    def __init__(
        self,
        plan: AddressPlan,
        zone: str = DEFAULT_ZONE,
        *,
        self_id: bytes | None = None,
        leader: bytes | None = None,
        ttl: int = DEFAULT_TTL,
    ) -> None:
        self.plan = plan
        self.zone = normalize_zone(zone)
        if len(self.zone) > MAX_NAME_TEXT - 64:
            raise ValueError(f"zone {zone!r} is too long to hold member names")
        if self.zone.endswith(_ARPA[1:]):
            raise ValueError(f"zone {zone!r} is inside .arpa, which holds the reverse zones")
        self.self_id = self_id
        self.ttl = ttl
        self.leader = leader
        self.reverse = reverse_zones(plan)
        self.apexes: frozenset[str] = frozenset((self.zone, *self.reverse))
        self._groups4, self._groups6 = ip_name_groups(plan)
        self._leader_name = f"{LEADER_LABEL}.{self.zone}"
        self._members: dict[bytes, Member] = {}
        self._derived: dict[bytes, _Derived] = {}
        self._claims: dict[str, dict[bytes, Rank]] = {}
        self._claimed_by: dict[bytes, dict[str, Rank]] = {}
        self._refused: dict[bytes, tuple[Conflict, ...]] = {}
        self._contested: set[str] = set()
        self._winner: dict[str, bytes] = {}
        self._entries: dict[str, Entry] = {}
        self._ent: dict[str, int] = {}
        self._serial = 0
        self.version = 0

    @classmethod
    def build(
        cls,
        plan: AddressPlan,
        zone: str,
        members: Iterable[tuple[Member, MemberState | None]],
        leader: bytes | None,
        *,
        self_id: bytes | None = None,
        ttl: int = DEFAULT_TTL,
    ) -> ZoneView:
        view = cls(plan, zone, self_id=self_id, leader=leader, ttl=ttl)
        for member, state in members:
            view.update(member, state)
        return view

    # ------------------------------------------------------------------ mutators

    def update(self, member: Member, state: MemberState | None) -> bool:
        """Add, change or (for a state outside :data:`INCLUDED`) remove one member."""
        if state not in INCLUDED:
            return self.remove(member.node_id)
        if self._members.get(member.node_id) == member:
            return False
        self._members[member.node_id] = member
        return self._reclaim({member.node_id})

    def update_record(self, record: PeerRecord, state: MemberState | None) -> bool:
        return self.update(Member.from_record(record), state)

    def remove(self, node_id: bytes) -> bool:
        if self._members.pop(node_id, None) is None:
            return False
        return self._reclaim({node_id})

    def set_leader(self, leader: bytes | None) -> bool:
        if leader == self.leader:
            return False
        old, self.leader = self.leader, leader
        return self._reclaim({i for i in (old, leader) if i is not None})

    def sync(
        self,
        records: Iterable[PeerRecord],
        state_of: Callable[[bytes], MemberState | None],
        leader: bytes | None,
    ) -> bool:
        """Level-triggered: make the view exactly these records (those in the zone)."""
        changed = self.set_leader(leader)
        seen: set[bytes] = set()
        for rec in records:
            seen.add(rec.node_id)
            changed |= self.update_record(rec, state_of(rec.node_id))
        for nid in [n for n in self._members if n not in seen]:
            changed |= self.remove(nid)
        return changed

    # ------------------------------------------------------------------- reads

    def find_zone(self, name: str) -> str | None:
        """The apex of the zone (forward or reverse) that holds ``name``, or None."""
        while True:
            if name in self.apexes:
                return name
            if "." not in name[:-1]:
                return None
            name = _parent(name)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def exists(self, name: str) -> bool:
        """The name has records, is an apex, or is an empty non-terminal (RFC 8020)."""
        return name in self._entries or name in self._ent or name in self.apexes

    @property
    def serial(self) -> int:
        return self._serial

    def soa(self) -> Soa:
        return Soa(
            mname=self.ns_name(),
            rname=f"hostmaster.{self.zone}",
            serial=self._serial,
            refresh=SOA_REFRESH,
            retry=SOA_RETRY,
            expire=SOA_EXPIRE,
            minimum=self.ttl,
        )

    def ns_name(self) -> str:
        """This node's own name: every node is the primary of its own copy."""
        me = self._members.get(self.self_id) if self.self_id is not None else None
        if me is None:
            return f"ns.{self.zone}"
        d = self._derived.get(me.node_id)
        if d is None:
            return f"ns.{self.zone}"
        if d.node is not None and self._winner.get(d.node) == me.node_id:
            return d.node
        return d.ip4

    def members(self) -> list[Member]:
        return [self._members[n] for n in sorted(self._members)]

    def __len__(self) -> int:
        """Names with records."""
        return len(self._entries)

    def entries(self) -> Iterator[tuple[str, Entry]]:
        for name in sorted(self._entries):
            yield name, self._entries[name]

    def rows(self) -> list[dict[str, str | int]]:
        """The zone as flat records: name, type, value (address or target), owner id."""
        out: list[dict[str, str | int]] = []
        for name, e in self.entries():
            if isinstance(e, Host):
                for typ, value in (("A", str(e.a)), ("AAAA", str(e.aaaa))):
                    out.append(
                        {"name": name, "type": typ, "address": value, "ttl": self.ttl,
                         "node_id": e.node_id.hex()}
                    )  # fmt: skip
            else:
                out.append(
                    {"name": name, "type": "PTR", "target": e.target, "ttl": self.ttl,
                     "node_id": e.node_id.hex()}
                )  # fmt: skip
        return out

    def conflicts(self) -> list[Conflict]:
        """Every claim that lost to another member's or was refused, sorted."""
        out: list[Conflict] = []
        for name in self._contested:
            winner = self._winner[name]
            for nid, rank in self._claims[name].items():
                if nid != winner:
                    out.append(
                        Conflict(
                            name, Kind(rank[0]).label, nid, winner,
                            f"{name} is held by {self._describe(winner)}",
                        )
                    )  # fmt: skip
        for refused in self._refused.values():
            out.extend(refused)
        return sorted(out, key=lambda c: (c.name, c.kind, c.node_id, c.winner or b"", c.reason))

    # -------------------------------------------------------------- internals

    def _describe(self, nid: bytes) -> str:
        m = self._members.get(nid)
        return f"{m.name} ({nid.hex()[:12]})" if m is not None else nid.hex()[:12]

    def _node_fqdn(self, m: Member) -> str | None:
        label = m.name.lower()
        return f"{label}.{self.zone}" if is_dns_label(label) else None

    def _hostname_fqdn(self, m: Member) -> str | None:
        """The hostname as a name in the zone; None if it is not a valid one."""
        if m.hostname is None:
            return None
        try:
            host = normalize_hostname(m.hostname)
        except ValueError:
            return None
        apex = self.zone[:-1]
        if host == apex:
            return None
        if host.endswith("." + apex):
            host = host[: -len(apex) - 1]
        fqdn = f"{host}.{self.zone}"
        return fqdn if len(fqdn) <= MAX_NAME_TEXT else None

    def _reserved(self, fqdn: str) -> IPv4Address | IPv6Address | str | None:
        """What a reserved name stands for: ``leader``, or the address it is derived from."""
        if _parent(fqdn) != self.zone:
            return None
        label = fqdn.split(".", 1)[0]
        if label == LEADER_LABEL:
            return LEADER_LABEL
        if not label.startswith(IP_NAME_PREFIX):
            return None
        groups = label[len(IP_NAME_PREFIX) :].split("-")
        if len(groups) == self._groups4 and all(_DEC_GROUP.match(g) for g in groups):
            values = [int(g) for g in groups]
            if all(v <= 255 for v in values):
                base = (
                    int(self.plan.cidr4.network_address) >> (8 * len(values)) << (8 * len(values))
                )
                low = int.from_bytes(bytes(values), "big")
                a4 = IPv4Address(base | low)
                if a4 in self.plan.cidr4:
                    return a4
        if len(groups) == self._groups6 and all(_HEX_GROUP.match(g) for g in groups):
            low = 0
            for g in groups:
                low = (low << 16) | int(g, 16)
            bits = 16 * len(groups)
            base6 = int(self.plan.cidr6.network_address) >> bits << bits
            a6 = IPv6Address(base6 | low)
            offset = int(a6) - int(self.plan.cidr6.network_address)
            if 0 <= offset < self.plan.size:
                return a6
        return None

    def _claims_of(self, m: Member) -> tuple[dict[str, Rank], tuple[Conflict, ...]]:
        claims: dict[str, Rank] = {}
        refused: list[Conflict] = []
        try:
            v4, v6 = self.plan.address(m.offset)
        except IpamError:
            self._derived.pop(m.node_id, None)
            return claims, (Conflict("", "address", m.node_id, None, "offset outside the plan"),)
        d = _Derived(
            v4=v4,
            v6=v6,
            ip4=f"{ip_name4(v4, self._groups4)}.{self.zone}",
            ip6=f"{ip_name6(v6, self._groups6)}.{self.zone}",
            rev4=reverse_name(v4),
            rev6=reverse_name(v6),
            node=self._node_fqdn(m),
            host=Host(m.node_id, v4, v6),
        )
        self._derived[m.node_id] = d

        def claim(name: str, kind: Kind) -> None:
            rank = (int(kind), m.admitted_at, m.node_id)
            if name not in claims or rank < claims[name]:
                claims[name] = rank

        for name in (d.ip4, d.ip6, d.rev4, d.rev6):
            claim(name, Kind.ADDRESS)
        if m.node_id == self.leader:
            claim(self._leader_name, Kind.LEADER)
        for kind, text, fqdn in (
            (Kind.NODE, m.name, d.node),
            (Kind.HOSTNAME, m.hostname, self._hostname_fqdn(m)),
        ):
            if text is None:
                continue
            if fqdn is None:
                refused.append(
                    Conflict(
                        text, kind.label, m.node_id, None,
                        f"{text!r} is not a valid DNS name in {self.zone}",
                    )
                )  # fmt: skip
                continue
            reserved = self._reserved(fqdn)
            if reserved is None or reserved in (v4, v6):
                claim(fqdn, kind)
            else:
                what = "the leader" if reserved == LEADER_LABEL else f"the member at {reserved}"
                refused.append(
                    Conflict(
                        fqdn, kind.label, m.node_id, None,
                        f"{fqdn} is reserved for {what}",
                    )
                )  # fmt: skip
        return claims, tuple(refused)

    def _reclaim(self, ids: set[bytes]) -> bool:
        """Recompute the claims of ``ids`` and every name whose owner may have changed."""
        version = self.version
        affected: set[str] = set()
        for nid in ids:
            m = self._members.get(nid)
            new: dict[str, Rank] = {}
            refused: tuple[Conflict, ...] = ()
            if m is None:
                self._derived.pop(nid, None)
            else:
                new, refused = self._claims_of(m)
            if refused != self._refused.get(nid, ()):
                self.version += 1  # only the conflict report changed: still news
            if refused:
                self._refused[nid] = refused
            else:
                self._refused.pop(nid, None)
            old = self._claimed_by.pop(nid, {})
            if new:
                self._claimed_by[nid] = new
            for name in old.keys() - new.keys():
                table = self._claims[name]
                del table[nid]
                if not table:
                    del self._claims[name]
                affected.add(name)
            for name, rank in new.items():
                if old.get(name) != rank:
                    self._claims.setdefault(name, {})[nid] = rank
                    affected.add(name)
        touched = set(ids)
        for name in affected:
            claimants = self._claims.get(name)
            winner = min(claimants.values())[2] if claimants else None
            if claimants is not None and len(claimants) > 1:
                self._contested.add(name)
            else:
                self._contested.discard(name)
            before = self._winner.get(name)
            if winner == before:
                continue
            self.version += 1  # the SOA/NS name may follow an ownership change too
            if before is not None:
                touched.add(before)
            if winner is None:
                del self._winner[name]
                self._ent_adjust(name, -1)
            else:
                touched.add(winner)
                self._winner[name] = winner
                if before is None:
                    self._ent_adjust(name, +1)
        # Entries: every affected name, every name of the changed members (a member
        # that moved to another address keeps its ranks: its entries follow it), and
        # the PTR names of members whose node-name ownership may have changed (their
        # PTR target follows it).
        names = set(affected)
        for nid in touched:
            for name in self._claimed_by.get(nid, ()):
                if nid in ids or name.endswith(_ARPA):
                    names.add(name)
        for name in names:
            self._set_entry(name, self._entry_for(name))
        return self.version != version

    def _entry_for(self, name: str) -> Entry | None:
        winner = self._winner.get(name)
        if winner is None:
            return None
        d = self._derived[winner]
        if name.endswith(_ARPA):
            own = d.node
            target = own if own is not None and self._winner.get(own) == winner else d.ip4
            return Pointer(winner, target)
        return d.host

    def _set_entry(self, name: str, entry: Entry | None) -> None:
        old = self._entries.get(name)
        if old == entry:
            return
        if old is not None:
            self._serial ^= _entry_hash(name, old)
        if entry is None:
            del self._entries[name]
        else:
            self._entries[name] = entry
            self._serial ^= _entry_hash(name, entry)
        self.version += 1

    def _ent_adjust(self, name: str, delta: int) -> None:
        """Count ``name`` in each of its ancestors below its zone apex (empty non-terminals)."""
        ent, apexes = self._ent, self.apexes
        i = name.find(".")
        while i != -1 and i < len(name) - 1:
            parent = name[i + 1 :]
            if parent in apexes:
                return
            count = ent.get(parent, 0) + delta
            if count:
                ent[parent] = count
            else:
                del ent[parent]
            i = name.find(".", i + 1)


def _entry_hash(name: str, entry: Entry) -> int:
    if isinstance(entry, Host):
        text = f"{name} A {int(entry.a)} AAAA {int(entry.aaaa)}"
    else:
        text = f"{name} PTR {entry.target}"
    return zlib.crc32(text.encode())


def states_from(mapping: Mapping[bytes, MemberState]) -> Callable[[bytes], MemberState | None]:
    """A ``state_of`` for :meth:`ZoneView.sync` from a plain mapping."""
    return mapping.get
