"""WireGuard peer reconciliation, sans-I/O: desired peers versus actual peers -> operations.

The reconciler (``meshd/wg/reconcile.py``) reads the peers a backend has, asks
:func:`desired_peers` what the membership view wants and :func:`plan_peers` for the
difference, and applies only that. Both functions are pure and deterministic, so the
same code drives a real interface, the in-memory backend and the simulator.

Rules (``protocols``-level behaviour an operator can rely on):

* A member gets a peer while it is ALIVE or SUSPECT (a suspicion is not a failure yet;
  dropping its tunnel would make a flapping detector cut traffic). DEAD, LEFT and
  members without a SWIM state have none.
* The peer's key is the member's WireGuard key, its allowed IPs exactly its /32 and
  /128, its keepalive 25 s, its endpoint the member's advertised WireGuard endpoint
  (:func:`record_wg_endpoint`: the host of its first gossip endpoint at the WireGuard
  port in its signed record, so members may listen on different ports).
* A member whose key changed is replaced (remove the old key, add the new one): keys
  are WireGuard's identity, a peer cannot be re-keyed in place.
* Roaming wins over the record while the tunnel is alive: WireGuard updates a peer's
  endpoint to wherever authenticated packets come from (a NAT mapping, a new
  address). While the last handshake is younger than ``roam_grace`` (WireGuard's
  REJECT_AFTER_TIME, 180 s) a differing endpoint is left alone; once the tunnel is
  stale the advertised endpoint is put back.
* Allowed IPs are a routing table inside WireGuard: one address belongs to one peer.
  :func:`desired_peers` therefore never hands the same address (or key) to two peers;
  a conflict keeps the member with the lowest node id and is reported.

Operations are ordered removes, then updates, then adds, each by key, so an address
moving from a removed peer to a new one is never briefly claimed twice.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from meshd.core.ipam import AddressPlan
from meshd.core.membership import MemberState
from meshd.core.records import PeerRecord
from meshd.core.wire import format_hostport, split_hostport

#: Persistent keepalive (INTERFACE.md: 25 s; fits the 30 s unreplied conntrack timeout).
KEEPALIVE: Final = 25
#: WireGuard's REJECT_AFTER_TIME: a session older than this carries no traffic.
ROAM_GRACE: Final = 180.0
#: Member states that keep a peer.
UP_STATES: Final = frozenset({MemberState.ALIVE, MemberState.SUSPECT})
KEY_LEN: Final = 32


@dataclass(frozen=True)
class PeerSpec:
    """What a peer should look like. ``endpoint`` None: no opinion (let it roam)."""

    public_key: bytes
    endpoint: str | None
    allowed_ips: frozenset[str]
    keepalive: int = KEEPALIVE

    def __post_init__(self) -> None:
        if len(self.public_key) != KEY_LEN:
            raise ValueError(f"a WireGuard key is {KEY_LEN} bytes, not {len(self.public_key)}")


@dataclass(frozen=True)
class PeerStatus:
    """A peer as read back from a backend, with its counters.

    ``last_handshake`` is wall-clock seconds (None: never); ``endpoint`` is where
    WireGuard currently sends (and, after a handshake, where the peer was last seen)."""

    public_key: bytes
    endpoint: str | None
    allowed_ips: frozenset[str]
    keepalive: int = 0
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0

    def spec(self) -> PeerSpec:
        return PeerSpec(self.public_key, self.endpoint, self.allowed_ips, self.keepalive)


@dataclass(frozen=True)
class AddPeer:
    peer: PeerSpec


@dataclass(frozen=True)
class UpdatePeer:
    """Change only the fields that are not None (``allowed_ips`` replaces the set)."""

    public_key: bytes
    endpoint: str | None = None
    allowed_ips: frozenset[str] | None = None
    keepalive: int | None = None


@dataclass(frozen=True)
class RemovePeer:
    public_key: bytes


PeerOp = AddPeer | UpdatePeer | RemovePeer


@dataclass
class Desired:
    """The result of :func:`desired_peers`: peers by key, and what was left out and why."""

    peers: dict[bytes, PeerSpec] = field(default_factory=dict)
    #: node id -> one-line reason (key or address already taken by a lower node id).
    conflicts: dict[bytes, str] = field(default_factory=dict)
    #: public key -> node id, for mapping backend stats back to members.
    owners: dict[bytes, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------- normalizing


def normalize_cidr(text: str) -> str:
    """``10.0.0.5/32`` in its canonical form; a bare address becomes a host route."""
    net = ipaddress.ip_network(text.strip(), strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        mapped = net.network_address.ipv4_mapped
        return str(ipaddress.ip_network(f"{mapped}/{max(0, net.prefixlen - 96)}"))
    return str(net)


def normalize_endpoint(text: str) -> str:
    """``ip:port`` or ``[ip6]:port`` in canonical form; ValueError unless the host is an
    IP literal (WireGuard takes no names). An IPv4-mapped IPv6 host becomes IPv4."""
    host, port = split_hostport(text)
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.scope_id:
            raise ValueError(f"{text!r}: scoped IPv6 endpoints are not supported")
    if port == 0:
        raise ValueError(f"{text!r}: port 0")
    return format_hostport((str(ip), port))


def endpoint_or_none(text: str | None) -> str | None:
    """:func:`normalize_endpoint`, or None for no endpoint / an unusable one."""
    if not text:
        return None
    try:
        return normalize_endpoint(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------------- plan


def plan_peers(
    desired: Mapping[bytes, PeerSpec],
    actual: Mapping[bytes, PeerStatus],
    now: float,
    *,
    roam_grace: float = ROAM_GRACE,
) -> list[PeerOp]:
    """The minimal operations that turn ``actual`` into ``desired`` (see the module doc)."""
    removes: list[PeerOp] = [RemovePeer(k) for k in sorted(actual) if k not in desired]
    updates: list[PeerOp] = []
    adds: list[PeerOp] = []
    for key in sorted(desired):
        want = desired[key]
        have = actual.get(key)
        if have is None:
            adds.append(AddPeer(want))
            continue
        endpoint = None
        if want.endpoint is not None and want.endpoint != have.endpoint:
            fresh = have.last_handshake is not None and now - have.last_handshake < roam_grace
            if have.endpoint is None or not fresh:
                endpoint = want.endpoint
        ips = want.allowed_ips if want.allowed_ips != have.allowed_ips else None
        keepalive = want.keepalive if want.keepalive != have.keepalive else None
        if endpoint is not None or ips is not None or keepalive is not None:
            updates.append(UpdatePeer(key, endpoint, ips, keepalive))
    return removes + updates + adds


def apply_ops(actual: Mapping[bytes, PeerStatus], ops: Iterable[PeerOp]) -> dict[bytes, PeerStatus]:
    """Reference semantics of the operations, as WireGuard carries them out.

    Allowed IPs are unique across peers: giving an address to one peer takes it from
    whichever peer had it. Counters and handshakes survive updates; a new peer starts at
    zero. The memory backend uses this, and the property tests check the plan with it."""
    peers = dict(actual)

    def claim(key: bytes, ips: frozenset[str]) -> None:
        for other, st in list(peers.items()):
            if other != key and st.allowed_ips & ips:
                peers[other] = replace(st, allowed_ips=st.allowed_ips - ips)

    for op in ops:
        if isinstance(op, RemovePeer):
            peers.pop(op.public_key, None)
        elif isinstance(op, AddPeer):
            p = op.peer
            claim(p.public_key, p.allowed_ips)
            old = peers.get(p.public_key)
            if old is None:
                peers[p.public_key] = PeerStatus(
                    p.public_key, p.endpoint, p.allowed_ips, p.keepalive
                )
            else:  # adding an existing key updates it, like `wg set`
                peers[p.public_key] = replace(
                    old,
                    endpoint=p.endpoint if p.endpoint is not None else old.endpoint,
                    allowed_ips=old.allowed_ips | p.allowed_ips,
                    keepalive=p.keepalive,
                )
        else:
            old = peers.get(op.public_key)
            if old is None:  # update_only: a vanished peer is not recreated
                continue
            if op.allowed_ips is not None:
                claim(op.public_key, op.allowed_ips)
            peers[op.public_key] = replace(
                old,
                endpoint=op.endpoint if op.endpoint is not None else old.endpoint,
                allowed_ips=op.allowed_ips if op.allowed_ips is not None else old.allowed_ips,
                keepalive=op.keepalive if op.keepalive is not None else old.keepalive,
            )
    return peers


# ------------------------------------------------------------------------------ desired


def record_wg_endpoint(rec: PeerRecord) -> str | None:
    """The WireGuard endpoint a member advertises: the host of its first endpoint at the
    WireGuard port its signed record carries. None when the record has no endpoint, a
    port of 0 (no interface to dial: it can still dial us) or a host that is not an IP
    literal (WireGuard takes no names)."""
    if not rec.endpoints or rec.wg_port == 0:
        return None
    try:
        host, _ = split_hostport(rec.endpoints[0])
    except ValueError:
        return None
    return endpoint_or_none(format_hostport((host, rec.wg_port)))


def desired_peers(
    records: Iterable[PeerRecord],
    state_of: Callable[[bytes], MemberState | None],
    plan: AddressPlan,
    *,
    self_id: bytes,
    endpoint: Callable[[PeerRecord], str | None] = record_wg_endpoint,
    self_key: bytes = b"",
    keepalive: int = KEEPALIVE,
) -> Desired:
    """One peer per member that is up, with its /32 and /128 as allowed IPs."""
    out = Desired()
    taken_ips: dict[str, bytes] = {}
    for rec in sorted(records, key=lambda r: r.node_id):
        if rec.node_id == self_id or state_of(rec.node_id) not in UP_STATES:
            continue
        if rec.wg_key == self_key:
            out.conflicts[rec.node_id] = "uses this node's own WireGuard key"
            continue
        if rec.wg_key in out.owners:
            out.conflicts[rec.node_id] = (
                f"WireGuard key already used by member {out.owners[rec.wg_key].hex()}"
            )
            continue
        v4, v6 = rec.addresses(plan)
        ips = frozenset({f"{v4}/32", f"{v6}/128"})
        clash = next((taken_ips[ip] for ip in sorted(ips) if ip in taken_ips), None)
        if clash is not None:
            out.conflicts[rec.node_id] = f"overlay address already used by member {clash.hex()}"
            continue
        for ip in ips:
            taken_ips[ip] = rec.node_id
        out.owners[rec.wg_key] = rec.node_id
        out.peers[rec.wg_key] = PeerSpec(rec.wg_key, endpoint(rec), ips, keepalive)
    return out
