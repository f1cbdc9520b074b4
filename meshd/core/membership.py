"""SWIM failure detection with Lifeguard, as a sans-I/O state machine.

One :class:`Membership` per node. The owner feeds it decoded message maps with
``receive(body, addr, now)`` and wakes it at ``get_timer()`` with
``handle_timer(now)``; it answers with ``messages_to_send()`` (maps the owner
seals and sends) and ``next_event()``. Time is always an argument and randomness
an injected :class:`random.Random`, so a simulator can run thousands of
instances deterministically (the aioquic model, see ``docs/architecture.md``).

Where the rules come from:

* SWIM (Das, Gupta, Motivala 2002): randomized round-robin probing (section 4.3),
  direct ping then ``ping_req`` through k members (section 3.1), the suspicion
  sub-protocol with incarnation numbers (section 4.2) and infection-style
  dissemination piggybacked on protocol messages (section 4.1).
* Lifeguard (Dadgar, Phillips, Currey 2018): local health awareness scaling the
  probe interval and timeout (LHA-Probe), suspicion timeouts that shrink with
  independent confirmations (LHA-Suspicion), nacks from ``ping_req`` relays and
  the suspect message sent along with a ping to a suspect member (Buddy System).
* Beyond memberlist (:func:`suspicion_floor`): confirmations beyond Lifeguard's K may
  take the suspicion timeout below memberlist's minimum, to a floor of a few probe
  intervals, so that a crash is declared in about 5 s at 1,000 members instead of 14 s.
* hashicorp/memberlist is the reference for defaults and formulas:
  ``suspicionTimeout``, ``remainingSuspicionTime``, ``retransmitLimit``,
  ``TransmitLimitedQueue``, ``awareness``, ``probeNode``, ``gossip``,
  ``aliveNode`` / ``suspectNode`` / ``deadNode`` / ``refute``.

Cost: every message and timer is O(log q) in the broadcast queue size or O(k)
in the fan-out; only the start of a probe round (shuffle) and :meth:`members`
are O(n).
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import random
import struct
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain, count
from typing import Any, Final

from meshd.core import wire
from meshd.core.wire import Addr, DropReason, WireError

#: Sequence numbers of pings are 32-bit and wrap (memberlist uses uint32).
SEQ_MOD: Final = 2**32
#: At most this many piggyback items are read from one message.
MAX_PIGGYBACK: Final = 512
#: ``ping_req`` relays in flight at once; more are refused (bounds a relay's memory).
MAX_RELAYS: Final = 1_024
#: A relay nacks at this fraction of the probe timeout (Lifeguard, footnote to section IV-A),
#: so that the nack reaches the origin before the end of its protocol period.
NACK_FRACTION: Final = 0.8
#: The suspicion floor (:func:`suspicion_floor`) is at least this many probe intervals
#: (times ``suspicion_floor_mult``), however small the cluster.
FLOOR_MIN_SCALE: Final = 3.0
#: Message kinds and membership item kinds on the wire.
PING: Final = "ping"
ACK: Final = "ack"
PING_REQ: Final = "ping_req"
NACK: Final = "nack"
GOSSIP: Final = "gossip"
PUSH_PULL: Final = "pp"
MEMBER_ITEM_KINDS: Final = frozenset({"alive", "suspect", "dead", "left"})

#: Push-pull digests have at most this many buckets (4-byte hashes: 512 bytes).
MAX_PP_BUCKETS: Final = 128
#: Aim for about this many members per digest bucket.
PP_BUCKET_TARGET: Final = 16
#: At most this many state entries are read from one push-pull message.
MAX_PP_ENTRIES: Final = 128
#: Push-pull sessions this node started and still accepts answers for.
MAX_PP_SESSIONS: Final = 8
#: An answer to a push-pull digest is accepted for this long.
PP_SESSION_TTL: Final = 10.0
#: Push-pull digests answered per second at most (an answer can be many datagrams).
PP_SERVE_PER_SECOND: Final = 16
#: A start-up sync (:meth:`Membership.sync`) tries this many partners at most, one per
#: probe interval, and stops once ``SYNC_ANSWERS`` of them have answered.
SYNC_ATTEMPTS: Final = 6
SYNC_ANSWERS: Final = 2
#: States heard about members the owner has not vouched for yet (``learn_unknown=False``).
MAX_PENDING: Final = 4_096
_PP_HASH: Final = 4
_PP_ENTRY: Final = struct.Struct(">QBQ")

# "g" key (fixstr, 2 bytes) + array16 header (3 bytes): what adding piggyback costs
# beyond the items themselves (the map header stays a fixmap).
_G_OVERHEAD: Final = 5
# Stop filling a packet once less than this is left (no item is smaller).
_MIN_ITEM: Final = 16
# Items examined that did not fit before a packet is declared full.
_MAX_SKIPS: Final = 32


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_STATE_CODE: Final = {
    MemberState.ALIVE: 0,
    MemberState.SUSPECT: 1,
    MemberState.DEAD: 2,
    MemberState.LEFT: 3,
}
_CODE_STATE: Final = {v: k for k, v in _STATE_CODE.items()}
#: Which of two states heard at one incarnation wins (SWIM: left > dead > suspect > alive).
_PRECEDENCE: Final = _STATE_CODE


@dataclass(frozen=True)
class Timing:
    """Every timer of the protocol. Defaults are memberlist's ``DefaultLANConfig`` (and
    the suspicion floor, which memberlist does not have)."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    suspicion_mult: float = 4.0
    suspicion_max_mult: float = 6.0
    #: Independent confirmations let the suspicion timeout fall below memberlist's
    #: minimum, to ``suspicion_floor_mult * max(3, log10(n)) * probe_interval``; not if
    #: that is not below the minimum (see :func:`suspicion_floor`).
    suspicion_floor_mult: float = 1.0
    #: Confirmations that reach that floor (up to 1,000 members; one more per tenfold
    #: beyond); 0 turns the floor off.
    suspicion_floor_confirmations: int = 2
    retransmit_mult: int = 4
    awareness_max: int = 8
    gossip_to_dead: float = 30.0
    tombstone_ttl: float = 3600.0
    lifeguard: bool = True
    max_packet: int = 1_200
    #: Anti-entropy with one random member every this many seconds (scaled up beyond 32
    #: members as memberlist's ``pushPullScale``); 0 turns it off.
    push_pull_interval: float = 30.0

    def __post_init__(self) -> None:
        for name in ("probe_interval", "probe_timeout", "gossip_interval", "suspicion_mult"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.probe_timeout > self.probe_interval:
            raise ValueError("probe_timeout must not exceed probe_interval")
        if self.suspicion_max_mult < 1:
            raise ValueError("suspicion_max_mult must be at least 1")
        if not self.suspicion_floor_mult > 0:
            raise ValueError("suspicion_floor_mult must be positive")
        for name in (
            "indirect_checks",
            "gossip_nodes",
            "retransmit_mult",
            "suspicion_floor_confirmations",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.awareness_max < 1:
            raise ValueError("awareness_max must be at least 1")
        if self.gossip_to_dead < 0 or self.tombstone_ttl < 0 or self.push_pull_interval < 0:
            raise ValueError(
                "gossip_to_dead, tombstone_ttl and push_pull_interval must not be negative"
            )
        if self.max_packet < 256:
            raise ValueError("max_packet must be at least 256 bytes")


PROFILES: Final[dict[str, Timing]] = {
    # memberlist DefaultLANConfig, plus confirmations down to a floor below its minimum
    # suspicion timeout (suspicion_floor: 3 s instead of 12 s at 1,000 members).
    "lan": Timing(),
    # memberlist DefaultWANConfig: slower probes, more gossip fan-out, longer suspicion.
    "wan": Timing(
        probe_interval=5.0,
        probe_timeout=3.0,
        gossip_interval=0.5,
        gossip_nodes=4,
        suspicion_mult=6.0,
        gossip_to_dead=60.0,
        push_pull_interval=60.0,
        # Conservative: memberlist's timeouts only (lossy, long paths, slow refutations).
        suspicion_floor_confirmations=0,
    ),
    # Fast timers for tests, demos and simulations on one machine. memberlist's suspicion
    # timeouts only: a floor of 0.4 s would turn a loaded machine's scheduling stalls
    # into DEADs.
    "local": Timing(
        probe_interval=0.2,
        probe_timeout=0.1,
        gossip_interval=0.05,
        push_pull_interval=2.0,
        suspicion_floor_confirmations=0,
    ),
}


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class MemberJoined:
    """A member not in the view before (from ``add_member`` or an alive item)."""

    node_id: bytes
    addr: Addr


@dataclass(frozen=True)
class MemberStateChanged:
    node_id: bytes
    old: MemberState
    new: MemberState
    incarnation: int


@dataclass(frozen=True)
class MemberAddressChanged:
    """An alive message with a higher incarnation carried a new address."""

    node_id: bytes
    addr: Addr


@dataclass(frozen=True)
class MemberRemoved:
    """A DEAD or LEFT member's tombstone expired; the view forgot it."""

    node_id: bytes


@dataclass(frozen=True)
class Piggyback:
    """An opaque item (one the owner queued with ``broadcast`` somewhere) arrived.

    It is *not* re-gossiped automatically: the owner verifies it and, if it is new,
    calls :meth:`Membership.broadcast` itself (memberlist's delegate model), so
    unverified items never spread further than one hop.
    """

    item: dict[str, Any]
    #: Where the datagram carrying it came from: a member that holds what it announces.
    addr: Addr | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Refuted:
    """This node was accused at ``accused`` and answered with a new incarnation."""

    incarnation: int
    accused: int


@dataclass(frozen=True)
class SyncNeeded:
    """Push-pull found that the member at ``addr`` holds newer owner data (a newer record
    version, see :meth:`Membership.set_version`) for these members; the owner fetches it."""

    addr: Addr
    node_ids: tuple[bytes, ...]


Event = (
    MemberJoined
    | MemberStateChanged
    | MemberAddressChanged
    | MemberRemoved
    | Piggyback
    | Refuted
    | SyncNeeded
)


@dataclass(frozen=True)
class MemberView:
    node_id: bytes
    addr: Addr
    state: MemberState
    incarnation: int
    since: float


# -------------------------------------------------------------------------- formulas


def suspicion_bounds(timing: Timing, n: int) -> tuple[float, float]:
    """(min, max) suspicion timeout for a cluster of ``n`` (memberlist ``suspicionTimeout``):
    ``min = mult * max(1, log10(max(1, n))) * probe_interval``, ``max = max_mult * min``."""
    node_scale = max(1.0, math.log10(max(1, n)))
    low = timing.suspicion_mult * node_scale * timing.probe_interval
    return low, timing.suspicion_max_mult * low


def suspicion_timeout(
    low: float,
    high: float,
    confirmations: int,
    k: int,
    floor: float | None = None,
    k_floor: int = 0,
) -> float:
    """Suspicion timeout after ``confirmations`` independent confirmations (not yet minus
    the time elapsed): Lifeguard LHA-Suspicion (memberlist ``remainingSuspicionTime``),
    from ``high`` logarithmically down to ``low`` at ``k`` confirmations; with a
    ``floor`` below ``low`` and ``k_floor >= 1``, the shorter of that and the same curve
    from ``high`` down to ``floor`` at ``k_floor`` confirmations. Monotone
    non-increasing in ``confirmations``, within ``[floor, high]``; never longer than
    memberlist's."""
    if k < 1:
        return low
    frac = math.log(confirmations + 1) / math.log(k + 1)
    timeout = max(low, high - frac * (high - low))
    if floor is None or k_floor < 1 or floor >= low:
        return timeout
    frac = math.log(confirmations + 1) / math.log(k_floor + 1)
    return min(timeout, max(floor, high - frac * (high - floor)))


def expected_confirmations(timing: Timing, n: int) -> int:
    """K = suspicion_mult - 2 (memberlist ``suspectNode``), 0 if the other ``n - 2`` members
    cannot provide that many or Lifeguard is off (then the timeout is fixed at ``min``)."""
    k = int(timing.suspicion_mult) - 2
    if not timing.lifeguard or k < 1 or n - 2 < k:
        return 0
    return k


def suspicion_floor(timing: Timing, n: int) -> tuple[float, int]:
    """(floor, K_floor): the lowest suspicion timeout, ``suspicion_floor_mult *
    max(3, log10(n)) * probe_interval``, and the independent confirmations that reach it:
    ``suspicion_floor_confirmations`` up to 1,000 members, one more for every tenfold
    beyond. K_floor is 0 (memberlist's timeouts only) when K is (Lifeguard off, tiny
    cluster), when ``suspicion_floor_confirmations`` is 0, or when the floor is not
    below memberlist's minimum.

    Why a crash can be declared sooner than memberlist's minimum without more false
    DEADs: a lone accusation still waits the maximum. A crashed member fails every
    probe, and its members between them probe it about once per probe interval
    whatever n is, so confirmations keep coming until it is declared. A live member
    falsely accused refutes as soon as the accusation reaches it (the Buddy System's
    ping or gossip, a round trip or a few gossip rounds), and accusations of the old
    incarnation then count for nothing; a false DEAD takes K_floor further independent
    failed probes of it before its refutation reaches the observer. Probes fail
    independently at a rate f per member, so a suspicion that lasts W collects j
    false confirmations with probability about (f W)^j / j!: each further confirmation
    divides it by ten or more (f W < 0.1: at 10 % loss f is 0.8 % per probe), which is
    what ten times as many members (ten times as many suspicions) need to keep the
    cluster's rate of false DEADs where it was. The floor, ``log10(n)`` probe
    intervals, leaves the refutation the several gossip rounds it takes to reach
    everyone, and at least three: a live member that handles its datagrams late (the
    Lifeguard paper's slow member) refutes only that much later, and the floor is what
    it is given. In the simulator a member handling every datagram 0.5 to 2 s late was
    declared DEAD 1,264 times in 25 s at 150 members with a 2.2 s floor, 12 times with
    2.6 s, once with 2.8 s; under heavy loss a small cluster's refutations are slow too
    (``benchmarks/false_dead``, 20 members at 20 % loss: one false DEAD in 30 runs with
    a 1.3 s floor, none with 2 s or 3 s). ``docs/benchmarks.md`` has the figures."""
    low, _ = suspicion_bounds(timing, n)
    k = expected_confirmations(timing, n)
    node_scale = max(FLOOR_MIN_SCALE, math.log10(max(1, n)))
    floor = min(low, timing.suspicion_floor_mult * node_scale * timing.probe_interval)
    if k == 0 or timing.suspicion_floor_confirmations == 0 or floor >= low:
        return low, 0
    tenfolds = max(0, math.ceil(math.log10(max(1, n))) - 3)
    return floor, timing.suspicion_floor_confirmations + tenfolds


def push_pull_scale(interval: float, n: int) -> float:
    """memberlist ``pushPullScale``: beyond 32 members the interval grows with log2(n / 32),
    so that the cluster-wide rate of full-state exchanges grows only like n / log n."""
    if n <= 32:
        return interval
    return interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)


def retransmit_limit(mult: int, n: int) -> int:
    """How often one piggyback item is sent: ``mult * ceil(log10(n + 1))`` (memberlist)."""
    return mult * math.ceil(math.log10(n + 1))


# ------------------------------------------------------------------- internal state


#: Shared int objects for bag positions. CPython caches only -5..256; every other
#: ``len(list)`` is a new 28-byte object, and a simulator running 10,000 cores of
#: 10,000 members each held 100 million of them (2.8 GB). The table grows (doubling)
#: as the bags need it, up to :data:`_MAX_SHARED_POSITION`: built whole at import it
#: cost every agent 1.2 MiB, whatever its size. Positions beyond it are ordinary ints.
_POSITIONS: Final[list[int]] = []
_MAX_SHARED_POSITION: Final = 1 << 15


def _position(i: int) -> int:
    """The shared int for bag position ``i`` (past the table's end: grow it first)."""
    if i >= _MAX_SHARED_POSITION:
        return i
    n = len(_POSITIONS)
    _POSITIONS.extend(range(n, min(max(2 * n, i + 1, 1_024), _MAX_SHARED_POSITION)))
    return _POSITIONS[i]


class _Bag:
    """A set with O(1) add, remove and uniform random pick (list + index map)."""

    __slots__ = ("items", "pos")

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.pos: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, x: bytes) -> None:
        if x not in self.pos:
            i = len(self.items)
            self.pos[x] = _POSITIONS[i] if i < len(_POSITIONS) else _position(i)
            self.items.append(x)

    def extend_new(self, xs: list[bytes]) -> None:
        """Add items none of which is in the bag yet (nor twice in ``xs``), at C speed."""
        if not xs:
            return
        start = len(self.items)
        self.items.extend(xs)
        _position(start + len(xs) - 1)  # grows the shared ints as far as they go
        shared = _POSITIONS[start : start + len(xs)]
        self.pos.update(zip(xs, chain(shared, count(start + len(shared))), strict=False))

    def discard(self, x: bytes) -> None:
        i = self.pos.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i


class _Suspicion:
    """One suspicion timer (memberlist ``suspicion``): who accused, who confirmed, when."""

    __slots__ = ("accusers", "deadline", "floor", "high", "k", "k_floor", "low", "start")

    def __init__(
        self,
        start: float,
        k: int,
        low: float,
        high: float,
        by: bytes,
        floor: float | None = None,
        k_floor: int = 0,
    ) -> None:
        self.start = start
        self.k = k
        self.low = low
        self.high = high
        self.floor = floor
        self.k_floor = k_floor
        # The first accuser is excluded from confirmations, as in memberlist.
        self.accusers = {by}
        self.deadline = start + (high if k >= 1 else low)

    def confirm(self, by: bytes) -> bool:
        """Count an independent accuser; True if the deadline moved (worth re-gossiping).
        Counting stops at the confirmations that reach the lowest timeout (K, or K_floor
        with the stage below memberlist's minimum), as memberlist's does at K."""
        confirmations = len(self.accusers) - 1
        if confirmations >= max(self.k, self.k_floor) or by in self.accusers:
            return False
        self.accusers.add(by)
        timeout = suspicion_timeout(
            self.low, self.high, confirmations + 1, self.k, self.floor, self.k_floor
        )
        self.deadline = self.start + timeout
        return True


class _Member:
    __slots__ = ("addr", "crc", "inc", "node_id", "since", "state", "susp")

    def __init__(self, node_id: bytes, addr: Addr, inc: int, now: float) -> None:
        self.node_id = node_id
        self.addr = addr
        self.inc = inc
        self.state = MemberState.ALIVE
        self.since = now
        self.susp: _Suspicion | None = None
        #: CRC-32 of the id: its push-pull bucket is ``crc & (buckets - 1)``.
        self.crc = zlib.crc32(node_id)


class _SharedMember(_Member):
    """An ALIVE entry of a :class:`SharedView`, referenced by many cores' views at once,
    so it must never change: a core that changes that member's state first replaces it
    in its own view by a private copy (:meth:`Membership._own`). Assignments raise, so a
    forgotten copy is a loud error rather than one core's news leaking into others."""

    __slots__ = ("packed",)
    packed: bytes

    def __init__(self, node_id: bytes, addr: Addr, inc: int, now: float) -> None:
        for name, value in (
            ("node_id", node_id),
            ("addr", addr),
            ("inc", inc),
            ("state", MemberState.ALIVE),
            ("since", now),
            ("susp", None),
            ("crc", zlib.crc32(node_id)),
            # Its push-pull digest entry while the owner holds no data version for it.
            ("packed", node_id + _PP_ENTRY.pack(inc, _STATE_CODE[MemberState.ALIVE], 0)),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a shared member entry is read-only (tried to set {name})")

    def copy(self) -> _Member:
        return _Member(self.node_id, self.addr, self.inc, self.since)


class SharedView:
    """An all-ALIVE view built once and given to many cores with
    :meth:`Membership.add_members`. The cores reference the same immutable member
    entries until one changes a member's state, and then only that member is copied
    into that core. Why: a simulator starting 10,000 cores that each know all 10,000
    members held 10^8 member objects (80 bytes each, 8 GB, and a third of the start-up
    time); shared, they are 10,000. A node restoring its own view gains nothing from it.
    """

    __slots__ = ("entries", "id_len", "ids", "index", "since")

    def __init__(self, members: Iterable[tuple[bytes, Addr, int]], now: float) -> None:
        self.since = now
        self.ids: list[bytes] = []
        self.entries: list[_SharedMember] = []
        self.index: dict[bytes, int] = {}
        lengths = set()
        for node_id, addr, inc in members:
            if node_id in self.index:
                raise ValueError("a shared view lists each member once")
            lengths.add(len(node_id))
            self.index[node_id] = len(self.ids)
            self.ids.append(node_id)
            self.entries.append(_SharedMember(node_id, addr, inc, now))
        if len(lengths) > 1:
            raise ValueError("the node ids of a shared view must have one length")
        self.id_len = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class _Probe:
    target: bytes
    seq: int
    inc: int
    timeout_at: float
    deadline: float
    indirect: bool = False
    relays: set[bytes] = field(default_factory=set)
    nacks: set[bytes] = field(default_factory=set)


@dataclass(slots=True)
class _Relay:
    origin: Addr
    origin_seq: int
    target: bytes
    expires: float  # a late ack is still forwarded until then
    due: float  # the pending timer: the nack, then the expiry
    nacked: bool


@dataclass(slots=True)
class _PPSession:
    """A push-pull this node started: where the digest went and whether it answered."""

    addr: Addr
    nb: int
    expires: float
    answered: bool = False
    sync: bool = False  # started by :meth:`Membership.sync`


_Key = tuple[int, bytes]
_MEMBER_KEY: Final = 0
_OWNER_KEY: Final = 1


class _Bcast:
    __slots__ = ("id", "item", "size", "transmits")

    def __init__(self, item: dict[str, Any], size: int, bid: int) -> None:
        self.item = item
        self.size = size
        self.id = bid
        self.transmits = 0


class _Broadcasts:
    """memberlist's ``TransmitLimitedQueue``: least-transmitted first, newest first among
    equals; a new item under the same key replaces the old one; an item is dropped after
    ``limit`` transmissions. A heap with lazy deletion keeps every operation O(log q)."""

    __slots__ = ("_heap", "_items", "_next_id")

    def __init__(self) -> None:
        self._items: dict[_Key, _Bcast] = {}
        self._heap: list[tuple[int, int, _Key]] = []
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: _Key, item: dict[str, Any], size: int) -> None:
        self._next_id += 1
        self._items[key] = _Bcast(item, size, self._next_id)
        heapq.heappush(self._heap, (0, -self._next_id, key))
        if len(self._heap) > 2 * len(self._items) + 64:
            self._heap = [(b.transmits, -b.id, k) for k, b in self._items.items()]
            heapq.heapify(self._heap)

    def take(self, budget: int, limit: int) -> list[dict[str, Any]]:
        """Items fitting in ``budget`` bytes, each counted as one more transmission."""
        out: list[dict[str, Any]] = []
        back: list[tuple[int, int, _Key]] = []
        skips = 0
        heap, items = self._heap, self._items
        pop = heapq.heappop
        while heap and budget >= _MIN_ITEM and skips < _MAX_SKIPS:
            entry = pop(heap)
            transmits, neg_id, key = entry
            b = items.get(key)
            if b is None or b.id != -neg_id or b.transmits != transmits:
                continue  # replaced or already re-queued: a stale heap entry
            if b.transmits >= limit:
                del items[key]
                continue
            if b.size > budget:
                back.append(entry)
                skips += 1
                continue
            budget -= b.size
            out.append(b.item)
            b.transmits += 1
            if b.transmits >= limit:
                del items[key]
            else:
                back.append((b.transmits, neg_id, key))
        push = heapq.heappush
        for entry in back:
            push(heap, entry)
        return out


# Timer heap entry kinds.
_T_SUSPECT: Final = 0
_T_RELAY: Final = 1
_T_TOMB: Final = 2
_T_DEAD_GOSSIP: Final = 3

_Timer = tuple[float, int, int, bytes, Any]
#: A push-pull entry: (id, incarnation, state code, owner version, address).
_Entry = tuple[bytes, int, int, int, Addr]


class Membership:
    """SWIM + Lifeguard membership of one node.

    ``self_id`` is this node's id; ids of other members must have the same length
    (16 bytes in meshd). ``incarnation`` must be higher than any this node used before
    a restart (the owner persists it), so the restarted node overrides its old DEAD.

    With ``learn_unknown=False`` gossip and push-pull never add a member: only the
    owner does, with :meth:`add_member`, once it has verified that member's signed
    record. What is heard about unknown members meanwhile is remembered (bounded) and
    applied when the member is added.
    """

    def __init__(
        self,
        self_id: bytes,
        self_addr: Addr,
        timing: Timing,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
        *,
        learn_unknown: bool = True,
    ) -> None:
        if not self_id:
            raise ValueError("self_id must not be empty")
        self.self_id = self_id
        self.self_addr = self_addr
        self.timing = timing
        self._rng = rng
        self._id_len = len(self_id)
        self._inc = incarnation
        self._left = False
        self._since = now
        self._members: dict[bytes, _Member] = {}
        self._alive = _Bag()
        self._suspect = _Bag()
        self._recent_dead = _Bag()  # DEAD for less than gossip_to_dead: still gossiped to
        self._dead = _Bag()  # every DEAD member: push-pull partners too (partition healing)
        self._learn_unknown = learn_unknown
        self._pending: OrderedDict[bytes, tuple[MemberState, int, Addr]] = OrderedDict()
        self._versions: dict[bytes, int] = {}
        #: The owner's data version for this node itself (its record's seq in meshd).
        self.self_version = 0
        self._pp_sessions: dict[int, _PPSession] = {}
        self._pp_served: deque[float] = deque()
        self._probe_list: list[bytes] = []
        self._probe_idx = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = rng.randrange(SEQ_MOD)
        self._timers: list[_Timer] = []
        self._timer_count = 0
        self._bq = _Broadcasts()
        self._limit_n = 0  # the cluster size self._limit was computed for
        self._limit = 0
        self._out: list[tuple[dict[str, Any], Addr]] = []
        self._events: deque[Event] = deque()
        #: Lifeguard local health (memberlist ``awareness``): 0 is healthy.
        self.local_health = 0
        #: Dropped inbound messages or items by reason (``wire.DropReason`` values).
        self.drops: dict[str, int] = {}
        # Random phase so that nodes started together do not probe in lockstep
        # (memberlist ``randomStagger``).
        self._next_probe = now + rng.uniform(0, timing.probe_interval)
        self._next_gossip = now + rng.uniform(0, timing.gossip_interval)
        # The first push-pull's phase, as a fraction of the interval: applied to the
        # interval scaled for the cluster size once that is known (see handle_timer).
        self._pp_phase = rng.random()
        self._pp_start: float | None = now
        self._next_pp = now + self._pp_phase * timing.push_pull_interval
        self._sync_left = 0  # start-up sync: attempts left, next attempt, answers still wanted
        self._sync_at = now
        self._sync_wanted = 0
        self._queue_self_alive()

    # --------------------------------------------------------------------- properties

    @property
    def _self_addr_text(self) -> str:
        return wire.format_hostport(self.self_addr)

    @property
    def incarnation(self) -> int:
        return self._inc

    @property
    def left(self) -> bool:
        return self._left

    @property
    def queued(self) -> int:
        """Piggyback items still to be sent (a leaving node waits for zero)."""
        return len(self._bq)

    @property
    def cluster_size(self) -> int:
        """Live members including this node: the ``n`` of every log-scaled formula."""
        return 1 + len(self._alive.items) + len(self._suspect.items)

    def members(self) -> list[MemberView]:
        """This node first, then every member in the view (tombstones included). O(n)."""
        out = [self._self_view()]
        out.extend(
            MemberView(m.node_id, m.addr, m.state, m.inc, m.since) for m in self._members.values()
        )
        return out

    def _self_view(self) -> MemberView:
        me = MemberState.LEFT if self._left else MemberState.ALIVE
        return MemberView(self.self_id, self.self_addr, me, self._inc, self._since)

    def member(self, node_id: bytes) -> MemberView | None:
        """One member's view entry, O(1)."""
        if node_id == self.self_id:
            return self._self_view()
        m = self._members.get(node_id)
        return None if m is None else MemberView(m.node_id, m.addr, m.state, m.inc, m.since)

    # ------------------------------------------------------------------------ outputs

    def messages_to_send(self) -> list[tuple[dict[str, Any], Addr]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        t: float | None = None
        if not self._left:
            t = self._next_probe
            if self.timing.push_pull_interval > 0 and self._next_pp < t:
                t = self._next_pp
            if self._sync_left and self._sync_at < t:
                t = self._sync_at
        p = self._probe
        if p is not None:
            due = p.deadline if p.indirect else p.timeout_at
            if t is None or due < t:
                t = due
        if self._bq._items and (t is None or self._next_gossip < t):
            t = self._next_gossip
        heap = self._timers
        while heap and not self._timer_valid(heap[0]):
            heapq.heappop(heap)
        if heap and (t is None or heap[0][0] < t):
            t = heap[0][0]
        return t

    # ------------------------------------------------------------------------- inputs

    def add_member(
        self,
        node_id: bytes,
        addr: Addr,
        incarnation: int,
        now: float,
        state: MemberState = MemberState.ALIVE,
    ) -> None:
        """A member learned from a verified record, alive at ``incarnation`` (or in
        ``state``, for an owner restoring a persisted view).

        Applies the SWIM rules (only a higher incarnation changes a known member), then
        whatever was heard about the member while it was unknown. The alive is not
        gossiped: the owner spreads the record itself.
        """
        if len(node_id) != self._id_len:
            raise ValueError(f"node ids are {self._id_len} bytes")
        if node_id == self.self_id:
            return
        pending = self._pending.pop(node_id, None)
        self._on_alive(node_id, incarnation, addr, now, gossip=False, create=True)
        if state is not MemberState.ALIVE:
            self._apply_state(node_id, state, incarnation, addr, self.self_id, now)
        if pending is not None:
            p_state, p_inc, p_addr = pending
            self._apply_state(node_id, p_state, p_inc, p_addr, self.self_id, now)

    def add_members(
        self,
        members: Iterable[tuple[bytes, Addr, int]] | SharedView,
        now: float,
        *,
        events: bool = True,
    ) -> None:
        """:meth:`add_member` (alive) for many members at once, as when a whole view is
        restored or granted: the same view, but the new probe targets are shuffled into
        the unprobed rest of the round once instead of each being inserted at a random
        place (one random draw per member instead of a ``randint``), and
        :class:`MemberJoined` events only if ``events`` (restoring a view is not news;
        ``Node`` discards those events). Without events about 2x cheaper per member.

        ``members`` may be a :class:`SharedView` (built at ``now``): its entries are
        then shared with every other core given it, and a core that knows no member yet
        takes them in a few C-level copies (about 0.1 us a member instead of 1.5 us):
        what lets a simulator build 10,000 views of 10,000 members."""
        if isinstance(members, SharedView):
            if members.since != now:
                raise ValueError("a shared view is added at the time it was built")
            if members and members.id_len != self._id_len:
                raise ValueError(f"node ids are {self._id_len} bytes")
            if not self._members and not self._pending:
                self._adopt(members, events)
                return
            pairs: Iterable[tuple[bytes, _Member]] = zip(members.ids, members.entries, strict=True)
        else:
            pairs = ((x[0], _Member(x[0], x[1], x[2], now)) for x in members)
        new: list[bytes] = []
        known = self._members
        alive = self._alive
        queue = self._events if events else None
        id_len = self._id_len
        for node_id, entry in pairs:
            if len(node_id) != id_len:
                raise ValueError(f"node ids are {id_len} bytes")
            if node_id == self.self_id:
                continue
            if node_id in known or node_id in self._pending:
                self.add_member(node_id, entry.addr, entry.inc, now)
                continue
            known[node_id] = entry
            alive.add(node_id)
            new.append(node_id)
            if queue is not None:
                queue.append(MemberJoined(node_id, entry.addr))
        self._shuffle_in(new)

    def _adopt(self, view: SharedView, events: bool) -> None:
        """``add_members`` of a shared view into a core that knows no member yet: the
        same view, probe order and events as the per-member loop, built by list and dict
        copies (the member table keeps the view's order, this node left out)."""
        ids, entries = view.ids, view.entries
        me = view.index.get(self.self_id)
        if me is not None:
            ids = ids[:me] + ids[me + 1 :]
            entries = entries[:me] + entries[me + 1 :]
        self._members = dict(zip(ids, entries, strict=True))
        self._alive.extend_new(ids)
        if events:
            self._events.extend(MemberJoined(e.node_id, e.addr) for e in entries)
        self._shuffle_in(ids)

    def _shuffle_in(self, new: list[bytes]) -> None:
        """New probe targets go into the unprobed rest of the round, in random order."""
        if new:
            rest = self._probe_list[self._probe_idx :] + new
            shuffle(self._rng, rest)
            self._probe_list[self._probe_idx :] = rest

    def set_version(self, node_id: bytes, version: int) -> None:
        """The owner's data version for a member (its record's seq): push-pull compares it
        and reports :class:`SyncNeeded` where a partner has a newer one."""
        if node_id == self.self_id:
            self.self_version = version
        else:
            self._versions[node_id] = version

    def push_pull(self, now: float, addr: Addr | None = None) -> None:
        """Start an anti-entropy exchange now, with ``addr`` or a random member."""
        self._start_push_pull(now, addr)

    def sync(self, now: float) -> None:
        """Catch up at start: push-pull now, and again with another random partner every
        probe interval until ``SYNC_ANSWERS`` partners have answered (at most
        ``SYNC_ATTEMPTS`` tries). memberlist's ``Join`` tries its seeds until one answers;
        here the partners come from the view, and when a cluster starts at once many of
        them are not listening yet: one unanswered exchange meant missing every record
        announced before this node listened until the next scheduled push-pull (30 s or
        more), which the vs_serf benchmark showed as 11 s convergence tails at N=30.
        A partner whose view already equals ours sends nothing back, which counts as no
        answer: the retries are bounded and each costs one digest datagram."""
        self._sync_left, self._sync_wanted, self._sync_at = SYNC_ATTEMPTS, SYNC_ANSWERS, now
        for session in self._pp_sessions.values():  # an earlier sync's answers count no more
            session.sync = False
        self._sync_step(now)

    def _sync_step(self, now: float) -> None:
        self._sync_left -= 1
        self._sync_at = now + self.timing.probe_interval
        sid = self._start_push_pull(now, None)
        if sid is not None:
            self._pp_sessions[sid].sync = True

    def receive(self, body: dict[str, Any], addr: Addr, now: float) -> None:
        """Handle one decrypted, decoded message; malformed input is counted in ``drops``.

        The message is validated completely before anything changes. Piggyback items
        apply before the message itself, so a refutation triggered by them rides on
        the ack this message causes.
        """
        try:
            m = wire.as_map(body, "message")
            kind = wire.field(m, "k", str)
            raw_items: list[Any] = (
                wire.as_list(m["g"], "piggyback", MAX_PIGGYBACK) if m.get("g") is not None else []
            )
            seq, to, sender, target_addr = 0, b"", b"", ("", 0)
            pp: tuple[int, int, bytes, list[int], list[_Entry]] | None = None
            if kind == GOSSIP:
                pass
            elif kind == PUSH_PULL:
                sender = self._id_field(m, "from")
                pp = self._parse_pp(m)
            elif kind in (PING, ACK, NACK, PING_REQ):
                seq = wire.int_field(m, "seq", 0, SEQ_MOD - 1)
                sender = self._id_field(m, "from")
                if kind in (PING, PING_REQ):
                    to = self._id_field(m, "to")
                if kind == PING_REQ:
                    target_addr = wire.addr_field(m, "ta")
            else:
                raise WireError(DropReason.UNEXPECTED, f"unknown message kind {kind!r}")
        except WireError as exc:
            self._drop(exc.reason)
            return
        for raw in raw_items:
            try:
                self._on_item(raw, addr, now)
            except WireError as exc:
                self._drop(exc.reason)
        if kind == PING:
            self._on_ping(seq, to, addr)
        elif kind == ACK:
            self._on_ack(seq, sender)
        elif kind == NACK:
            self._on_nack(seq, sender)
        elif kind == PING_REQ:
            self._on_ping_req(seq, to, target_addr, addr, now)
        elif pp is not None:
            self._on_push_pull(pp, sender, addr, now)

    def handle_timer(self, now: float) -> None:
        """Fire everything due at ``now``; calling it early or late is harmless."""
        heap = self._timers
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._timer_valid(entry):
                self._fire(entry, now)
        p = self._probe
        if p is not None and not p.indirect and now >= p.timeout_at:
            self._indirect_probe(p, now)
        if p is not None and now >= p.deadline:
            self._probe_failed(p, now)
        if not self._left and self._probe is None and now >= self._next_probe:
            self._start_probe(now)
        if self._sync_left and now >= self._sync_at:
            if self._left:
                self._sync_left = 0
            else:
                self._sync_step(now)
        if not self._left and self.timing.push_pull_interval > 0 and now >= self._next_pp:
            scaled = push_pull_scale(self.timing.push_pull_interval, self.cluster_size)
            start, self._pp_start = self._pp_start, None
            if start is not None and start + self._pp_phase * scaled > now:
                # memberlist staggers the first push-pull over the *scaled* interval.
                # Staggered over the base 30 s only, every node of a cluster started
                # together exchanged within the same 30 s and then again every scaled
                # interval (120 s at 200 nodes, 300 s at 10,000): long gaps with no
                # exchange anywhere, and a healed partition waited for the next burst
                # (46 s in the simulator at 200 nodes).
                self._next_pp = start + self._pp_phase * scaled
            else:
                self._next_pp = now + scaled
                self._start_push_pull(now, None)
        if now >= self._next_gossip and self._bq:
            self._gossip()
            self._next_gossip += self.timing.gossip_interval
            if self._next_gossip <= now:
                self._next_gossip = now + self.timing.gossip_interval

    # --------------------------------------------------------------------- user calls

    def leave(self, now: float) -> None:
        """Leave gracefully: gossip LEFT about ourselves at a new incarnation, stop probing.

        The node keeps answering pings and gossiping until its queue is empty, so the
        LEFT spreads (memberlist ``Leave`` waits for the broadcast the same way).
        """
        if self._left:
            return
        self._left = True
        self._inc += 1
        self._since = now
        self._probe = None
        self._relays.clear()
        self._queue_member(self.self_id, {"k": "left", "id": self.self_id, "inc": self._inc})

    def broadcast(self, item: dict[str, Any], key: bytes) -> None:
        """Queue an opaque item to piggyback; it replaces an older item with the same key.

        The receiver reports it as :class:`Piggyback`. Raises ValueError for an item
        that is not a map with a string ``k``, uses a membership kind, or cannot fit
        in one packet.
        """
        if not isinstance(item, dict) or not isinstance(item.get("k"), str):
            raise ValueError("a piggyback item is a map with a string field 'k'")
        if item["k"] in MEMBER_ITEM_KINDS:
            raise ValueError(f"'k' = {item['k']!r} is reserved for membership items")
        size = len(wire.pack(item))
        if size > self.timing.max_packet - 128:
            raise ValueError(f"item of {size} bytes does not fit in one packet")
        self._bq.put((_OWNER_KEY, key), item, size)

    # ------------------------------------------------------------------------ probing

    def _start_probe(self, now: float) -> None:
        """SWIM: one probe per (health-scaled) protocol period, targets in shuffled order."""
        scale = self._scale()
        self._next_probe = now + self.timing.probe_interval * scale
        target = self._next_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(
            target=target.node_id,
            seq=seq,
            inc=target.inc,
            timeout_at=now + self.timing.probe_timeout * scale,
            deadline=self._next_probe,
        )
        extra: list[dict[str, Any]] = []
        if target.state is MemberState.SUSPECT:
            # Lifeguard Buddy System (memberlist probeNode): tell a suspect it is suspected
            # so it can refute at once instead of waiting for gossip to reach it.
            extra.append(
                {"k": "suspect", "id": target.node_id, "inc": target.inc, "by": self.self_id}
            )
        msg = {"k": PING, "seq": seq, "to": target.node_id, "from": self.self_id}
        self._send(msg, target.addr, extra)

    def _next_target(self) -> _Member | None:
        """Randomized round-robin (SWIM 4.3): walk a shuffled list, reshuffle each round."""
        for _ in range(len(self._probe_list) + 2):
            if self._probe_idx >= len(self._probe_list):
                self._probe_list = self._alive.items + self._suspect.items
                shuffle(self._rng, self._probe_list)
                self._probe_idx = 0
                if not self._probe_list:
                    return None
            node_id = self._probe_list[self._probe_idx]
            self._probe_idx += 1
            m = self._members.get(node_id)
            if m is not None and m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                return m
        return None

    def _insert_probe_target(self, node_id: bytes) -> None:
        """Put a new member at a random position among those not yet probed this round,
        so it is probed within the current round (SWIM's time-bounded completeness)."""
        lst = self._probe_list
        j = self._rng.randint(self._probe_idx, len(lst))
        if j == len(lst):
            lst.append(node_id)
        else:
            lst.append(lst[j])
            lst[j] = node_id

    def _indirect_probe(self, p: _Probe, now: float) -> None:
        """SWIM: no ack within the probe timeout, so ask k random alive members to ping."""
        p.indirect = True
        m = self._members.get(p.target)
        if m is None:
            return
        relays = self._sample((self._alive,), self.timing.indirect_checks, {p.target})
        for relay_id in relays:
            relay = self._members[relay_id]
            msg = {
                "k": PING_REQ,
                "seq": p.seq,
                "to": p.target,
                "ta": wire.format_hostport(m.addr),
                "from": self.self_id,
            }
            self._send(msg, relay.addr)
        p.relays = set(relays)

    def _probe_failed(self, p: _Probe, now: float) -> None:
        """No ack by the end of the period: update health, then suspect the target."""
        self._probe = None
        if self.timing.lifeguard:
            # Lifeguard / memberlist probeNode: with relays that should nack, only the
            # missing nacks count against us (they point at our own slowness); without
            # any, the failed probe itself does.
            expected = len(p.relays)
            self._health(expected - len(p.nacks) if expected else 1)
        self._on_suspect(p.target, p.inc, self.self_id, now)

    def _on_ping(self, seq: int, to: bytes, addr: Addr) -> None:
        if to != self.self_id:
            # memberlist handlePing: a ping for another node (address reuse) is dropped.
            self._drop(DropReason.UNEXPECTED)
            return
        self._send({"k": ACK, "seq": seq, "from": self.self_id}, addr)

    def _on_ack(self, seq: int, sender: bytes) -> None:
        p = self._probe
        if p is not None and p.seq == seq and sender == p.target:
            self._probe = None
            if self.timing.lifeguard:
                self._health(-1)
            return
        relay = self._relays.get(seq)
        if relay is not None and relay.target == sender:
            del self._relays[seq]
            ack = {"k": ACK, "seq": relay.origin_seq, "from": relay.target}
            self._send(ack, relay.origin)
            return
        self._drop(DropReason.STALE)  # late (after the probe ended) or not ours

    def _on_nack(self, seq: int, sender: bytes) -> None:
        p = self._probe
        if p is not None and p.seq == seq and sender in p.relays:
            p.nacks.add(sender)
        else:
            self._drop(DropReason.STALE)

    def _on_ping_req(self, seq: int, to: bytes, target: Addr, origin: Addr, now: float) -> None:
        """Relay a probe (SWIM indirect ping); the ack is relayed under the origin's seq."""
        if self._left:
            return
        if to == self.self_id:
            self._send({"k": ACK, "seq": seq, "from": self.self_id}, origin)
            return
        if len(self._relays) >= MAX_RELAYS:
            self._drop(DropReason.RATE_LIMITED)
            return
        local = self._next_seq()
        # The relay forwards an ack for one (unscaled) probe timeout, as memberlist's
        # handleIndirectPing does, and nacks at 80% of it (Lifeguard).
        timeout = self.timing.probe_timeout
        lifeguard = self.timing.lifeguard
        due = now + (NACK_FRACTION * timeout if lifeguard else timeout)
        self._relays[local] = _Relay(origin, seq, to, now + timeout, due, not lifeguard)
        self._push_timer(due, _T_RELAY, to, local)
        m = self._members.get(to)
        extra: list[dict[str, Any]] = []
        if m is not None and m.state is MemberState.SUSPECT:
            # Buddy System on the indirect path too (Lifeguard section IV-C).
            extra.append({"k": "suspect", "id": to, "inc": m.inc, "by": self.self_id})
        self._send({"k": PING, "seq": local, "to": to, "from": self.self_id}, target, extra)

    # ----------------------------------------------------------------- gossip items

    def _on_item(self, raw: Any, src: Addr, now: float) -> None:
        item = wire.as_map(raw, "piggyback item")
        kind = wire.field(item, "k", str)
        if kind not in MEMBER_ITEM_KINDS:
            self._events.append(Piggyback(item, src))
            return
        node_id = self._id_field(item, "id")
        inc = wire.int_field(item, "inc")
        if kind == "alive":
            addr = wire.addr_field(item, "a")
            if node_id != self.self_id:
                self._on_alive(node_id, inc, addr, now, gossip=True)
            elif inc > self._inc or (
                inc == self._inc and item["a"] != wire.format_hostport(self.self_addr)
            ):
                # Someone claims a newer (or conflicting) life of ours: outbid it
                # (memberlist aliveNode on the local node).
                self._refute(inc)
        elif kind == "left":
            if node_id != self.self_id:
                self._on_left(node_id, inc, now)
            elif inc >= self._inc:
                self._refute(inc)
        else:
            by = self._id_field(item, "by")
            if node_id == self.self_id:
                if inc >= self._inc:
                    self._refute(inc)
                elif not self._left:
                    # An accusation we already refuted: whoever sent it has not heard the
                    # refutation, which may have been gossiped out by now. Announce the
                    # current incarnation again (no new one), so the ack to a Buddy
                    # System ping and our next gossip carry it back.
                    self._queue_self_alive()
            elif kind == "suspect":
                self._on_suspect(node_id, inc, by, now)
            else:
                self._on_dead(node_id, inc, by, now)

    def _on_alive(
        self,
        node_id: bytes,
        inc: int,
        addr: Addr,
        now: float,
        *,
        gossip: bool,
        create: bool = False,
    ) -> None:
        """SWIM: alive at a higher incarnation overrides suspect, dead and left (a deliberate
        rejoin); equal or lower is old news. An unknown member is added (or only
        remembered, if the owner vouches for members itself)."""
        m = self._members.get(node_id)
        if m is None:
            if not (create or self._learn_unknown):
                self._remember(node_id, MemberState.ALIVE, inc, addr)
                return
            m = _Member(node_id, addr, inc, now)
            self._members[node_id] = m
            self._alive.add(node_id)
            self._insert_probe_target(node_id)
            self._events.append(MemberJoined(node_id, addr))
        else:
            if inc <= m.inc:
                return
            m = self._own(m)
            m.inc = inc
            if addr != m.addr:
                m.addr = addr
                self._events.append(MemberAddressChanged(node_id, addr))
            self._set_state(m, MemberState.ALIVE, now)
        if gossip:
            self._queue_member(
                node_id,
                {"k": "alive", "id": node_id, "inc": inc, "a": wire.format_hostport(m.addr)},
            )

    def _on_suspect(self, node_id: bytes, inc: int, by: bytes, now: float) -> None:
        """SWIM suspicion, with Lifeguard's confirmations (memberlist ``suspectNode``)."""
        m = self._members.get(node_id)
        if m is None:
            self._remember(node_id, MemberState.SUSPECT, inc, None)
            return
        if inc < m.inc:
            return
        item = {"k": "suspect", "id": node_id, "inc": inc, "by": by}
        if m.state is MemberState.SUSPECT and m.susp is not None and inc == m.inc:
            if m.susp.confirm(by):
                self._queue_member(node_id, item)  # confirmations must spread too
                if m.susp.deadline <= now:
                    # The shrunken timeout has already passed (memberlist's Confirm fires
                    # at once then): dead now, not at the owner's next wake-up.
                    self._on_dead(node_id, m.inc, self.self_id, now)
                else:
                    self._push_timer(m.susp.deadline, _T_SUSPECT, node_id, m.susp)
            return
        if m.state is not MemberState.ALIVE and m.state is not MemberState.SUSPECT:
            return
        # Suspect at a higher incarnation than our suspicion: we missed its refutation
        # and this is a new accusation, with a timer of its own from now (confirming the
        # old timer would have made it DEAD at once had that run its minimum already).
        m = self._own(m)
        m.inc = inc
        self._set_state(m, MemberState.SUSPECT, now)
        n = self.cluster_size
        low, high = suspicion_bounds(self.timing, n)
        k = expected_confirmations(self.timing, n)
        m.susp = _Suspicion(now, k, low, high, by, *suspicion_floor(self.timing, n))
        self._push_timer(m.susp.deadline, _T_SUSPECT, node_id, m.susp)
        self._queue_member(node_id, item)

    def _on_dead(self, node_id: bytes, inc: int, by: bytes, now: float) -> None:
        """Dead at an incarnation >= ours overrides alive and suspect, never LEFT."""
        m = self._members.get(node_id)
        if m is None:
            self._remember(node_id, MemberState.DEAD, inc, None)
            return
        if inc < m.inc or m.state is MemberState.LEFT:
            return
        m = self._own(m)
        m.inc = inc
        if m.state is MemberState.DEAD:
            return
        self._set_state(m, MemberState.DEAD, now)
        self._queue_member(node_id, {"k": "dead", "id": node_id, "inc": inc, "by": by})

    def _on_left(self, node_id: bytes, inc: int, now: float) -> None:
        """LEFT at an incarnation >= ours is final for that incarnation."""
        m = self._members.get(node_id)
        if m is None:
            self._remember(node_id, MemberState.LEFT, inc, None)
            return
        if inc < m.inc:
            return
        m = self._own(m)
        m.inc = inc
        if m.state is MemberState.LEFT:
            return
        self._set_state(m, MemberState.LEFT, now)
        self._queue_member(node_id, {"k": "left", "id": node_id, "inc": inc})

    def _refute(self, accused: int) -> None:
        """SWIM refutation: outbid the accusation with a new incarnation and gossip alive.
        Being accused also costs local health (Lifeguard; memberlist ``refute``)."""
        if self._left:
            return
        self._inc = max(self._inc + 1, accused + 1)
        if self.timing.lifeguard:
            self._health(1)
        self._queue_self_alive()
        self._events.append(Refuted(self._inc, accused))

    def _own(self, m: _Member) -> _Member:
        """``m`` as an entry this core may change: a :class:`SharedView`'s entry is
        replaced by a private copy first (same place in the member table)."""
        if type(m) is _SharedMember:
            m = m.copy()
            self._members[m.node_id] = m
        return m

    def _set_state(self, m: _Member, new: MemberState, now: float) -> None:
        old = m.state
        if old is new:
            return
        if old is MemberState.ALIVE:
            self._alive.discard(m.node_id)
        elif old is MemberState.SUSPECT:
            self._suspect.discard(m.node_id)
        elif old is MemberState.DEAD:
            self._recent_dead.discard(m.node_id)
            self._dead.discard(m.node_id)
        m.state = new
        m.since = now
        m.susp = None
        if new is MemberState.ALIVE:
            self._alive.add(m.node_id)
            if old is not MemberState.SUSPECT:  # a suspect is still in the probe list
                self._insert_probe_target(m.node_id)
        elif new is MemberState.SUSPECT:
            self._suspect.add(m.node_id)
        else:
            self._push_timer(now + self.timing.tombstone_ttl, _T_TOMB, m.node_id, now)
            if new is MemberState.DEAD:
                # memberlist gossip(): keep gossiping to the dead for a while, so that a
                # falsely declared node hears it and refutes.
                self._recent_dead.add(m.node_id)
                self._dead.add(m.node_id)
                self._push_timer(now + self.timing.gossip_to_dead, _T_DEAD_GOSSIP, m.node_id, now)
        self._events.append(MemberStateChanged(m.node_id, old, new, m.inc))

    # ------------------------------------------------------------------------ gossip

    def _gossip(self) -> None:
        """memberlist gossip(): piggyback-only messages to a few random live members and
        to members dead for less than ``gossip_to_dead`` (never to LEFT ones)."""
        targets = self._sample(
            (self._alive, self._suspect, self._recent_dead), self.timing.gossip_nodes, set()
        )
        for node_id in targets:
            if not self._send({"k": GOSSIP}, self._members[node_id].addr, require_items=True):
                return

    def _send(
        self,
        msg: dict[str, Any],
        addr: Addr,
        extra: list[dict[str, Any]] | None = None,
        *,
        require_items: bool = False,
    ) -> bool:
        """Queue ``msg`` with as much piggyback as fits in ``max_packet`` bytes."""
        budget = self.timing.max_packet - len(wire.pack(msg)) - _G_OVERHEAD
        if extra:
            items = list(extra)
            budget -= sum(len(wire.pack(x)) for x in items)
        else:
            items = []
        if self._bq._items:
            items.extend(self._bq.take(budget, self._retransmit_limit()))
        if items:
            msg["g"] = items
        elif require_items:
            return False
        self._out.append((msg, addr))
        return True

    def _retransmit_limit(self) -> int:
        """:func:`retransmit_limit` for the current cluster size (kept until it changes:
        it is asked for on every datagram sent)."""
        n = self.cluster_size
        if n != self._limit_n:
            self._limit_n = n
            self._limit = retransmit_limit(self.timing.retransmit_mult, n)
        return self._limit

    def _queue_member(self, node_id: bytes, item: dict[str, Any]) -> None:
        self._bq.put((_MEMBER_KEY, node_id), item, len(wire.pack(item)))

    def _queue_self_alive(self) -> None:
        item = {"k": "alive", "id": self.self_id, "inc": self._inc, "a": self._self_addr_text}
        self._queue_member(self.self_id, item)

    # --------------------------------------------------------------------- push-pull

    def _start_push_pull(self, now: float, addr: Addr | None) -> int | None:
        """Anti-entropy (memberlist ``pushPull``, Demers et al. 1987), digest first: send
        one hash per bucket of members; the partner answers with its entries of the
        buckets that differ and we answer with ours, so two views in sync cost one small
        datagram and a view that differs costs only what differs, chunked to
        ``max_packet``. Partners are drawn from alive, suspect *and* dead members, so
        that two halves of a healed partition, each having declared the other dead, find
        each other again (Serf's reconnect does this outside memberlist)."""
        if addr is None:
            picked = self._sample((self._alive, self._suspect, self._dead), 1, set())
            if not picked:
                return None
            addr = self._members[picked[0]].addr
        for sid in [s for s, x in self._pp_sessions.items() if x.expires <= now]:
            del self._pp_sessions[sid]
        while len(self._pp_sessions) >= MAX_PP_SESSIONS:
            del self._pp_sessions[next(iter(self._pp_sessions))]
        sid = self._next_seq()
        nb = self._pp_buckets()
        self._pp_sessions[sid] = _PPSession(addr, nb, now + PP_SESSION_TTL)
        msg = {"k": PUSH_PULL, "ph": 0, "sid": sid, "from": self.self_id, "nb": nb}
        msg["h"] = self._digest(nb)
        self._out.append((msg, addr))
        return sid

    def _parse_pp(self, m: Mapping[str, Any]) -> tuple[int, int, bytes, list[int], list[_Entry]]:
        """Validate a whole push-pull message before anything in it is applied."""
        phase = wire.int_field(m, "ph", 0, 2)
        sid = wire.int_field(m, "sid", 0, SEQ_MOD - 1)
        nb = wire.int_field(m, "nb", 1, MAX_PP_BUCKETS)
        if nb & (nb - 1):
            raise WireError(DropReason.MALFORMED, "push-pull bucket count is not a power of 2")
        if phase == 0:
            return phase, sid, wire.bin_field(m, "h", nb * _PP_HASH), [], []
        buckets = []
        for b in wire.as_list(m.get("d"), "push-pull buckets", MAX_PP_BUCKETS):
            if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < nb:
                raise WireError(DropReason.MALFORMED, "push-pull bucket out of range")
            buckets.append(b)
        entries = []
        for raw in wire.as_list(m.get("e"), "push-pull entries", MAX_PP_ENTRIES):
            if not isinstance(raw, list) or len(raw) != 5:
                raise WireError(DropReason.MALFORMED, "push-pull entry is not a 5-list")
            nid, inc, code, ver, addr = raw
            if not isinstance(nid, bytes) or len(nid) != self._id_len:
                raise WireError(DropReason.MALFORMED, "push-pull entry id")
            for v, hi in ((inc, 2**63 - 1), (code, 3), (ver, 2**63 - 1)):
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
                    raise WireError(DropReason.MALFORMED, "push-pull entry number")
            entries.append((nid, inc, code, ver, wire.parse_endpoint(addr, "push-pull addr")))
        return phase, sid, b"", buckets, entries

    def _on_push_pull(
        self,
        pp: tuple[int, int, bytes, list[int], list[_Entry]],
        sender: bytes,
        addr: Addr,
        now: float,
    ) -> None:
        phase, sid, digest, buckets, entries = pp
        if phase == 0:
            served = self._pp_served
            while served and served[0] <= now - 1.0:
                served.popleft()
            if len(served) >= PP_SERVE_PER_SECOND:
                self._drop(DropReason.RATE_LIMITED)
                return
            served.append(now)
            nb = len(digest) // _PP_HASH
            mine = self._digest(nb)
            diff = [
                b
                for b in range(nb)
                if mine[b * _PP_HASH : (b + 1) * _PP_HASH]
                != digest[b * _PP_HASH : (b + 1) * _PP_HASH]
            ]
            if diff:
                self._send_entries(1, sid, nb, diff, addr)
            return
        if phase == 1:
            session = self._pp_sessions.get(sid)
            if session is None:
                self._drop(DropReason.STALE)
                return
            if not session.answered:
                session.answered = True
                self._send_entries(2, sid, session.nb, buckets, addr)
                if session.sync:
                    self._sync_wanted -= 1
                    if self._sync_wanted <= 0:
                        self._sync_left = 0
        self._merge_entries(entries, sender, addr, now)

    def _pp_buckets(self) -> int:
        n = len(self._members) + 1
        nb = 1
        while nb < MAX_PP_BUCKETS and nb * PP_BUCKET_TARGET < n:
            nb *= 2
        return nb

    def _entries(self, buckets: set[int], mask: int) -> Iterable[tuple[bytes, int, int, int, str]]:
        """This node's view as push-pull entries, (id, incarnation, state, version, addr),
        of the members in ``buckets``."""
        if zlib.crc32(self.self_id) & mask in buckets:
            me = _STATE_CODE[MemberState.LEFT if self._left else MemberState.ALIVE]
            yield self.self_id, self._inc, me, self.self_version, self._self_addr_text
        versions = self._versions
        alive = MemberState.ALIVE
        for m in self._members.values():
            if m.crc & mask in buckets:
                code = 0 if m.state is alive else _STATE_CODE[m.state]
                nid = m.node_id
                yield nid, m.inc, code, versions.get(nid, 0), wire.format_hostport(m.addr)

    def _digest(self, nb: int) -> bytes:
        """One 4-byte BLAKE2b per bucket over the sorted (id, inc, state, version) of its
        members; buckets by CRC-32 of the id (cheap, and even for any id scheme). A
        :class:`SharedView` entry brings its packed (id, inc, state, 0) along."""
        groups: list[list[bytes]] = [[] for _ in range(nb)]
        pack = _PP_ENTRY.pack
        mask = nb - 1
        me = MemberState.LEFT if self._left else MemberState.ALIVE
        groups[zlib.crc32(self.self_id) & mask].append(
            self.self_id + pack(self._inc, _STATE_CODE[me], self.self_version)
        )
        versions = self._versions
        alive = MemberState.ALIVE
        for nid, m in self._members.items():
            ver = versions.get(nid, 0)
            if ver == 0 and type(m) is _SharedMember:
                groups[m.crc & mask].append(m.packed)
            else:
                code = 0 if m.state is alive else _STATE_CODE[m.state]
                groups[m.crc & mask].append(nid + pack(m.inc, code, ver))
        out = bytearray()
        for g in groups:
            g.sort()
            out += hashlib.blake2b(b"".join(g), digest_size=_PP_HASH).digest()
        return bytes(out)

    def _send_entries(self, phase: int, sid: int, nb: int, buckets: list[int], addr: Addr) -> None:
        """Our entries of ``buckets``, in as many datagrams as ``max_packet`` needs (at
        least one, so that the partner learns which buckets differ)."""
        want = set(buckets)
        mask = nb - 1
        head = {"k": PUSH_PULL, "ph": phase, "sid": sid, "from": self.self_id, "nb": nb}
        head["d"] = buckets
        # Room left for entries: the array header grows to 3 bytes beyond 15 entries.
        budget = self.timing.max_packet - len(wire.pack({**head, "e": []})) - 2
        batch: list[list[Any]] = []
        used = 0
        sent = False
        for nid, inc, code, ver, a in self._entries(want, mask):
            entry = [nid, inc, code, ver, a]
            size = len(wire.pack(entry))
            if batch and (used + size > budget or len(batch) >= MAX_PP_ENTRIES):
                self._out.append(({**head, "e": batch}, addr))
                sent = True
                batch, used = [], 0
            batch.append(entry)
            used += size
        if batch or not sent:
            self._out.append(({**head, "e": batch}, addr))

    def _merge_entries(self, entries: list[_Entry], sender: bytes, addr: Addr, now: float) -> None:
        """memberlist ``mergeState``: apply the partner's view with the gossip rules, except
        that a remote DEAD only makes us suspect (we may know better, and suspicion lets
        the accused refute); report owner data the partner has newer."""
        behind: list[bytes] = []
        for nid, inc, code, ver, a in entries:
            state = _CODE_STATE[code]
            if nid == self.self_id:
                # Outbid a newer life of ours or any accusation (_refute ignores it once
                # we have left).
                if inc > self._inc or (state is not MemberState.ALIVE and inc >= self._inc):
                    self._refute(inc)
                continue
            if state is MemberState.DEAD:
                state = MemberState.SUSPECT
            self._apply_state(nid, state, inc, a, sender, now)
            if ver > self._versions.get(nid, 0):
                behind.append(nid)
        if behind:
            self._events.append(SyncNeeded(addr, tuple(behind)))

    def _apply_state(
        self, nid: bytes, state: MemberState, inc: int, addr: Addr | None, by: bytes, now: float
    ) -> None:
        if state is MemberState.ALIVE:
            if addr is not None:
                self._on_alive(nid, inc, addr, now, gossip=True)
        elif state is MemberState.SUSPECT:
            self._on_suspect(nid, inc, by, now)
        elif state is MemberState.DEAD:
            self._on_dead(nid, inc, by, now)
        else:
            self._on_left(nid, inc, now)

    def _remember(self, nid: bytes, state: MemberState, inc: int, addr: Addr | None) -> None:
        """Keep the newest state heard about a member the owner has not added yet."""
        if self._learn_unknown or nid == self.self_id:
            return
        cur = self._pending.get(nid)
        if cur is not None:
            c_state, c_inc, c_addr = cur
            if (inc, _PRECEDENCE[state]) <= (c_inc, _PRECEDENCE[c_state]):
                return
            addr = addr or c_addr
        if addr is None:
            # A state without an address is kept only to shadow an alive we heard.
            addr = ("", 0)
        self._pending[nid] = (state, inc, addr)
        self._pending.move_to_end(nid)
        if len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    # ------------------------------------------------------------------------ timers

    def _push_timer(self, when: float, kind: int, node_id: bytes, token: Any) -> None:
        self._timer_count += 1
        heapq.heappush(self._timers, (when, self._timer_count, kind, node_id, token))

    def _timer_valid(self, entry: _Timer) -> bool:
        """Heap entries are never removed eagerly; each is checked against live state."""
        when, _, kind, node_id, token = entry
        if kind == _T_RELAY:
            relay = self._relays.get(token)
            return relay is not None and relay.due == when
        m = self._members.get(node_id)
        if m is None:
            return False
        if kind == _T_SUSPECT:
            return m.susp is token and m.susp.deadline == when
        if kind == _T_TOMB:
            return m.state in (MemberState.DEAD, MemberState.LEFT) and m.since == token
        return m.state is MemberState.DEAD and m.since == token

    def _fire(self, entry: _Timer, now: float) -> None:
        _, _, kind, node_id, token = entry
        if kind == _T_RELAY:
            relay = self._relays[token]
            if relay.nacked:
                del self._relays[token]
                return
            # Lifeguard LHA-Probe: tell the origin we could not reach the target either, so
            # it knows its own links work and does not count the failure against itself.
            relay.nacked = True
            relay.due = relay.expires
            self._push_timer(relay.due, _T_RELAY, node_id, token)
            self._send({"k": NACK, "seq": relay.origin_seq, "from": self.self_id}, relay.origin)
            return
        m = self._members[node_id]
        if kind == _T_SUSPECT:
            self._on_dead(node_id, m.inc, self.self_id, now)
        elif kind == _T_TOMB:
            del self._members[node_id]
            self._recent_dead.discard(node_id)
            self._dead.discard(node_id)
            self._versions.pop(node_id, None)
            self._events.append(MemberRemoved(node_id))
        else:
            self._recent_dead.discard(node_id)

    # ----------------------------------------------------------------------- helpers

    def _scale(self) -> int:
        """Lifeguard LHA-Probe multiplier for the probe interval and timeout."""
        return self.local_health + 1 if self.timing.lifeguard else 1

    def _health(self, delta: int) -> None:
        """memberlist ``awareness.ApplyDelta``: the score stays in [0, awareness_max - 1],
        so the multiplier (score + 1) is at most ``awareness_max``."""
        self.local_health = min(max(self.local_health + delta, 0), self.timing.awareness_max - 1)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % SEQ_MOD
        return self._seq

    def _id_field(self, m: Mapping[str, Any], name: str) -> bytes:
        return wire.bin_field(m, name, self._id_len)

    def _drop(self, reason: DropReason) -> None:
        self.drops[reason.value] = self.drops.get(reason.value, 0) + 1

    def _sample(self, bags: Iterable[_Bag], k: int, exclude: set[bytes]) -> list[bytes]:
        """Up to ``k`` distinct random members from the union of ``bags``, O(k) expected
        (memberlist ``kRandomNodes`` scans all n; we pick indices instead)."""
        bags = tuple(bags)
        total = 0
        for b in bags:
            total += len(b.items)
        if k <= 0 or total == 0:
            return []
        if total <= 4 * k + 2 * len(exclude) + 8:
            pool = [x for b in bags for x in b.items if x not in exclude]
            return self._rng.sample(pool, min(k, len(pool)))
        out: list[bytes] = []
        seen = set(exclude)
        for _ in range(4 * k + 8):
            x = _pick(bags, self._rng.randrange(total))
            if x not in seen:
                seen.add(x)
                out.append(x)
                if len(out) == k:
                    break
        return out


def shuffle(rng: random.Random, x: list[Any]) -> None:
    """``rng.shuffle(x)``, drawing the same numbers in the same order (CPython's
    Fisher-Yates, each index from ``getrandbits`` with rejection) at 0.15 us an item
    instead of 0.4: the bit length is worked out once per power of two rather than per
    item, and no method is called per item. The probe order of a 10,000-member view is
    such a shuffle, done by each of 10,000 simulated cores at start. A subclass of
    ``random.Random`` gets its own ``shuffle``. The unit tests compare the two."""
    if type(rng) is not random.Random:
        rng.shuffle(x)
        return
    bits = rng.getrandbits
    top = len(x) - 1
    while top > 0:
        k = (top + 1).bit_length()
        low = 1 << (k - 1)  # the smallest i + 1 with this bit length
        for i in range(top, low - 2, -1):
            j = bits(k)
            while j > i:
                j = bits(k)
            x[i], x[j] = x[j], x[i]
        top = low - 2


def _pick(bags: tuple[_Bag, ...], i: int) -> bytes:
    """The ``i``-th element of the concatenation of ``bags``."""
    for b in bags:
        items = b.items
        if i < len(items):
            return items[i]
        i -= len(items)
    raise IndexError(i)
