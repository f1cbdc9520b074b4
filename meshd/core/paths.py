"""Which path a gossip datagram to a member takes: through its WireGuard tunnel (the
overlay) or over the bootstrap UDP channel (the underlay). Sans-I/O: the node calls it
for every datagram in and out, the agent reports tunnel stats, time is an argument.

Policy (docs/wireguard.md, "Gossip over the overlay"):

* A member's **overlay gossip address** is its overlay IPv4 address at its gossip port.
  The bytes are the same sealed datagrams either way; only the destination differs.
* **Usable**: the member's tunnel is alive, i.e. its last WireGuard handshake (reported
  by the agent from the device) or the last datagram that reached us from it over the
  overlay is younger than ``fresh`` (180 s, WireGuard's REJECT_AFTER_TIME), and the
  member is not in a hold-down. Then every datagram to it goes over the overlay.
* **Checked by the protocol's own probes**: a SWIM ``ping`` sent over the overlay
  expects an ``ack`` with its sequence number within the probe timeout (a ``ping_req``
  does not count: its answer may rightly take 80 % of the probe timeout). That answer,
  on whichever path it comes back, proves the probe got through; so does any datagram
  from the member over the overlay. If neither has come ``answer_timeout`` after the
  first unanswered probe (half the probe timeout; not stretched by Lifeguard's local
  health, because a ``ping_req`` relay forwards answers for one unstretched probe timeout
  only), the path **falls back**: the unanswered probes (at most ``resend_limit``) are
  sent again over the bootstrap
  channel at once, so the failure detector still hears the member within its probe
  timeout and no one is suspected because a tunnel broke.
* **Answers go back the way the question came**: an ``ack`` or ``nack`` to a member whose
  latest datagram arrived over the bootstrap channel goes over the bootstrap channel
  (that member has fallen back, or has no tunnel yet; our overlay path to it may be
  just as broken, and a lost ack is a suspicion).
* **Hold-down**: after a fallback the member stays on the bootstrap channel for
  ``holddown`` (10 probe intervals), doubling with each consecutive fallback up to
  ``holddown_max``; an answered overlay probe resets it. A WireGuard handshake newer
  than the fallback (the tunnel was rebuilt) ends the hold-down early.
* Datagrams to anything that is not a known member (joiners) use the bootstrap channel.

Inbound datagrams from a member's overlay address are credited to that member and
handed to the protocol under the member's bootstrap address, so the membership view
only ever holds bootstrap addresses and replies go through this same choice. (The
overlay source address is authenticated by WireGuard's cryptokey routing, and the
datagram itself is still sealed with the cluster keyring.)

The module also keeps the endpoint each member's tunnel is actually seen from (the
agent reports it from the device; behind a NAT it is the mapped address): a candidate
for NAT traversal, shown on ``/v1/members``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from meshd.core.wire import Addr

#: WireGuard's REJECT_AFTER_TIME: a tunnel without a handshake for this long carries nothing.
FRESH: Final = 180.0
#: Probes re-sent over the bootstrap channel when a path falls back.
RESEND_LIMIT: Final = 4
#: Cap of the hold-down, in multiples of the first hold-down.
HOLDDOWN_MAX_MULT: Final = 16


class Path(enum.Enum):
    OVERLAY = "overlay"
    UNDERLAY = "underlay"


@dataclass(frozen=True)
class PathPolicy:
    """The timers of the path choice (see the module doc)."""

    answer_timeout: float
    holddown: float
    holddown_max: float
    fresh: float = FRESH
    resend_limit: int = RESEND_LIMIT

    def __post_init__(self) -> None:
        if not (self.answer_timeout > 0 and self.holddown > 0 and self.fresh > 0):
            raise ValueError("answer_timeout, holddown and fresh must be positive")
        if self.holddown_max < self.holddown:
            raise ValueError("holddown_max must be at least holddown")
        if self.resend_limit < 0:
            raise ValueError("resend_limit must not be negative")

    @classmethod
    def for_probes(cls, probe_interval: float, probe_timeout: float) -> PathPolicy:
        """Answer within half the SWIM probe timeout, hold down for 10 probe intervals."""
        holddown = 10 * probe_interval
        return cls(probe_timeout / 2, holddown, holddown * HOLDDOWN_MAX_MULT)


@dataclass(frozen=True)
class Observed:
    """Where a member's tunnel is seen from: ``endpoint`` after the handshake at
    ``last_handshake``, as reported at ``reported_at``."""

    endpoint: str
    last_handshake: float
    reported_at: float


@dataclass(frozen=True)
class PathChanged:
    """Gossip to ``node_id`` now takes ``path`` (``reason``: "tunnel up", "no answer",
    "stale", "member down")."""

    node_id: bytes
    path: Path
    reason: str


@dataclass
class _Peer:
    node_id: bytes
    gossip: Addr
    overlay: Addr
    also: tuple[str, ...] = ()
    #: Last evidence that the tunnel carries traffic (handshake or overlay datagram).
    alive_at: float | None = None
    observed: Observed | None = None
    #: Time of the first overlay probe not answered yet, and the probes since.
    waiting_since: float | None = None
    deadline: float = 0.0
    waiting: list[bytes] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    holddown_until: float = 0.0
    fell_back_at: float | None = None
    failures: int = 0
    path: Path = Path.UNDERLAY
    #: Did the latest datagram from the member come through the tunnel?
    rx_overlay: bool = False


@dataclass
class PathStats:
    """Datagrams per path and direction, and how often paths changed."""

    tx: Counter[str] = field(default_factory=Counter)
    rx: Counter[str] = field(default_factory=Counter)
    fallbacks: int = 0
    resent: int = 0
    to_overlay: int = 0


class GossipPaths:
    def __init__(self, policy: PathPolicy) -> None:
        self.policy = policy
        self._peers: dict[bytes, _Peer] = {}
        self._by_gossip: dict[Addr, bytes] = {}
        self._by_overlay: dict[str, bytes] = {}
        #: Sequence numbers of probes in flight over the overlay -> member.
        self._by_seq: dict[int, bytes] = {}
        self.stats = PathStats()
        self._events: list[PathChanged] = []

    # -------------------------------------------------------------------- the members

    def learn(self, nid: bytes, gossip: Addr, overlay: Addr, also: tuple[str, ...] = ()) -> None:
        """A member (verified record) with its bootstrap and overlay gossip addresses;
        ``also``: its other overlay addresses (IPv6), credited to it when heard from."""
        peer = self._peers.get(nid)
        if peer is None:
            peer = self._peers[nid] = _Peer(nid, gossip, overlay, also)
        else:
            self._unmap(peer)
            peer.gossip, peer.overlay, peer.also = gossip, overlay, also
        self._by_gossip[gossip] = nid
        for host in (overlay[0], *also):
            self._by_overlay[host] = nid

    def down(self, nid: bytes) -> None:
        """The member is dead or left: its tunnel is being removed, stop using it."""
        peer = self._peers.get(nid)
        if peer is None:
            return
        peer.alive_at = None
        self._answered(peer)
        if peer.path is Path.OVERLAY:
            peer.path = Path.UNDERLAY
            self._events.append(PathChanged(nid, Path.UNDERLAY, "member down"))

    def forget(self, nid: bytes) -> None:
        peer = self._peers.pop(nid, None)
        if peer is not None:
            self._answered(peer)
            self._unmap(peer)

    def _unmap(self, peer: _Peer) -> None:
        if self._by_gossip.get(peer.gossip) == peer.node_id:
            del self._by_gossip[peer.gossip]
        for host in (peer.overlay[0], *peer.also):
            if self._by_overlay.get(host) == peer.node_id:
                del self._by_overlay[host]

    def tunnel(
        self, nid: bytes, endpoint: str | None, last_handshake: float | None, now: float
    ) -> bool:
        """The agent's read-back of a member's tunnel. True if the observed endpoint changed."""
        peer = self._peers.get(nid)
        if peer is None:
            return False
        if last_handshake is not None:
            if peer.alive_at is None or last_handshake > peer.alive_at:
                peer.alive_at = last_handshake
            if (
                peer.fell_back_at is not None
                and last_handshake > peer.fell_back_at
                and now < peer.holddown_until
            ):
                peer.holddown_until = now  # the tunnel was rebuilt: try it again now
        changed = False
        if endpoint is not None and last_handshake is not None:
            old = peer.observed
            changed = old is None or old.endpoint != endpoint
            peer.observed = Observed(endpoint, last_handshake, now)
        return changed

    def observed(self, nid: bytes) -> Observed | None:
        peer = self._peers.get(nid)
        return None if peer is None else peer.observed

    # ------------------------------------------------------------------ the datagrams

    def inbound(self, addr: Addr, now: float) -> Addr:
        """Credit a datagram to its path; an overlay source becomes the member's bootstrap
        address (the protocol's view holds only those)."""
        nid = self._by_overlay.get(_plain_host(addr[0]))
        if nid is None:
            self.stats.rx[Path.UNDERLAY.value] += 1
            sender = self._by_gossip.get(addr)
            if sender is not None:
                self._peers[sender].rx_overlay = False
            return addr
        peer = self._peers[nid]
        self.stats.rx[Path.OVERLAY.value] += 1
        peer.rx_overlay = True
        peer.alive_at = now
        if peer.waiting_since is not None:
            self._answered(peer)
            peer.failures = 0
        return peer.gossip

    def answered(self, seq: int) -> None:
        """An ``ack`` or ``nack`` for probe ``seq`` arrived (on either path): the probe
        reached its member, so the overlay path to it works."""
        nid = self._by_seq.get(seq)
        peer = self._peers.get(nid) if nid is not None else None
        if peer is not None:
            self._answered(peer)
            peer.failures = 0

    def _answered(self, peer: _Peer) -> None:
        for seq in peer.seqs:
            if self._by_seq.get(seq) == peer.node_id:
                del self._by_seq[seq]
        peer.seqs = []
        peer.waiting = []
        peer.waiting_since = None

    def outbound(
        self,
        data: bytes,
        addr: Addr,
        now: float,
        *,
        probe: bool,
        seq: int | None = None,
        reply: bool = False,
    ) -> Addr:
        """Where to send ``data`` meant for ``addr`` (a bootstrap address). ``probe``: it
        expects an answer (``seq``: the sequence number the answer will carry);
        ``reply``: it answers the member's latest datagram (goes back the same way)."""
        nid = self._by_gossip.get(addr)
        peer = self._peers.get(nid) if nid is not None else None
        if peer is not None and reply and not peer.rx_overlay:
            self.stats.tx[Path.UNDERLAY.value] += 1
            return addr
        if peer is None or not self._usable(peer, now):
            if peer is not None and peer.path is Path.OVERLAY:
                peer.path = Path.UNDERLAY
                self._events.append(PathChanged(peer.node_id, Path.UNDERLAY, "stale"))
            self.stats.tx[Path.UNDERLAY.value] += 1
            return addr
        if peer.path is Path.UNDERLAY:
            peer.path = Path.OVERLAY
            self.stats.to_overlay += 1
            self._events.append(PathChanged(peer.node_id, Path.OVERLAY, "tunnel up"))
        if probe:
            if peer.waiting_since is None:
                peer.waiting_since = now
                peer.deadline = now + self.policy.answer_timeout
            if len(peer.waiting) < self.policy.resend_limit:
                peer.waiting.append(data)
                if seq is not None:
                    peer.seqs.append(seq)
                    self._by_seq[seq] = peer.node_id
        self.stats.tx[Path.OVERLAY.value] += 1
        return peer.overlay

    def _usable(self, peer: _Peer, now: float) -> bool:
        return (
            peer.alive_at is not None
            and now - peer.alive_at < self.policy.fresh
            and now >= peer.holddown_until
        )

    # ------------------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        times = [p.deadline for p in self._peers.values() if p.waiting_since is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[tuple[bytes, Addr]]:
        """Fall back where probes went unanswered; returns the probes to re-send over the
        bootstrap channel."""
        out: list[tuple[bytes, Addr]] = []
        for peer in self._peers.values():
            if peer.waiting_since is None or now < peer.deadline:
                continue
            out.extend((data, peer.gossip) for data in peer.waiting)
            self.stats.resent += len(peer.waiting)
            self.stats.fallbacks += 1
            peer.failures += 1
            hold = min(self.policy.holddown_max, self.policy.holddown * 2 ** (peer.failures - 1))
            peer.holddown_until = now + hold
            peer.fell_back_at = now
            self._answered(peer)  # the resent copies are answered on the bootstrap channel
            peer.path = Path.UNDERLAY
            self._events.append(PathChanged(peer.node_id, Path.UNDERLAY, "no answer"))
        return out

    def next_event(self) -> PathChanged | None:
        return self._events.pop(0) if self._events else None

    # -------------------------------------------------------------------------- views

    def path_of(self, nid: bytes) -> Path | None:
        peer = self._peers.get(nid)
        return None if peer is None else peer.path

    def holddown_until(self, nid: bytes) -> float | None:
        peer = self._peers.get(nid)
        return None if peer is None else peer.holddown_until

    def describe(self, now: float) -> dict[str, object]:
        on_overlay = sum(1 for p in self._peers.values() if p.path is Path.OVERLAY)
        held = sum(1 for p in self._peers.values() if now < p.holddown_until)
        return {
            "tx": {p.value: self.stats.tx[p.value] for p in Path},
            "rx": {p.value: self.stats.rx[p.value] for p in Path},
            "fallbacks": self.stats.fallbacks,
            "resent": self.stats.resent,
            "to_overlay": self.stats.to_overlay,
            "members_on_overlay": on_overlay,
            "members_held_down": held,
        }


def _plain_host(host: str) -> str:
    """An IPv4-mapped IPv6 source (a dual-stack socket) as the IPv4 address it is."""
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host
