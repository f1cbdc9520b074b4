"""A discrete-event network simulator driving many ``meshd.core.membership`` cores.

Why it is built this way:

* One virtual clock and one order of ``(time, seq, kind, ...)`` entries (kept in two
  heaps, datagrams in flight and the rest): ``seq`` is unique, so ties break in
  insertion order and a run is a pure function of the scenario and its seed. Every
  random choice comes from a stream derived from the
  seed by name (``random.Random("<seed>:net")``, ``"<seed>:node:<i>:<gen>"``...), so
  adding a crash does not change the latencies other messages see, and string
  seeding does not depend on ``PYTHONHASHSEED``.
* The cores are driven only through their public API (``receive``, ``handle_timer``,
  ``get_timer``, ``messages_to_send``, ``next_event``, ``add_member``,
  ``broadcast``, ``members``), exactly as the agent will drive them. Each node has
  at most one live timer entry: after every input the node's ``get_timer()`` is
  re-armed under a fresh token and older entries are ignored when they pop.
* Messages are passed as maps by default (the cores never mutate a received map);
  with ``wire`` on each is ``wire.pack``-ed and ``wire.unpack``-ed, which is exact
  but makes a run several times slower. Bytes are counted either way from
  ``len(wire.pack(msg))`` of every message (or of every ``bytes_sample``-th one,
  scaled up), plus the sealed envelope (``wire.SEALED_OVERHEAD``); IP and UDP
  headers are not counted.
* What the metrics need is tracked incrementally from the cores' events, never by
  scanning views: a byte matrix of who sees whom in which state, and per observer
  the number of live members it does not see ALIVE. "Every view complete" is then
  the O(1) test ``wrong_total == 0``.
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache, partial
from operator import sub
from statistics import NormalDist
from typing import Any, Final

import msgpack

from meshd.core import wire
from meshd.core.crypto import SignedBlob, SigningKey, WireGuardKey
from meshd.core.ipam import AddressPlan
from meshd.core.membership import (
    MemberJoined,
    MemberRemoved,
    Membership,
    MemberState,
    MemberStateChanged,
    MemberView,
    Piggyback,
    Refuted,
    SharedView,
    SyncNeeded,
    Timing,
    suspicion_bounds,
)
from meshd.core.node import PUSH_BUDGET, SWIM_BUDGET, SWIM_WRAP, Node, NodeConfig
from meshd.core.wire import Keyring
from simulations.pull import RecordPull, announcement
from simulations.scenario import Scenario

Addr = tuple[str, int]
PORT: Final = 7946
#: What a sealed datagram carries beyond its msgpack body (header, key id, nonce, tag).
ENVELOPE: Final = wire.SEALED_OVERHEAD
#: A membership message travels as ``{"t": "swim", "m": msg}`` inside the envelope.
SWIM_OVERHEAD: Final = SWIM_WRAP + ENVELOPE
#: Every node starts holding every record at this version (full bootstrap).
BASE_SEQ: Final = 1

# Heap entry kinds.
_MSG: Final = 0  # (t, seq, _MSG, dst, src_addr, payload)
_TIMER: Final = 1  # (t, seq, _TIMER, node, token, None)
_PROC: Final = 2  # (t, seq, _PROC, dst, src_addr, payload, gen): a slow node handles it now
_ACTION: Final = 3  # (t, seq, _ACTION, callable, None, None)
# A datagram's payload is a membership message (a map; bytes in wire mode) or, for the
# node-level record pull, a tuple: ("rq", [owner index, ...]) or ("push", [(owner, seq)]).
RQ: Final = "rq"
PUSH: Final = "push"

# View codes in the who-sees-whom matrix.
UNKNOWN: Final = 0
ALIVE: Final = 1
SUSPECT: Final = 2
DEAD: Final = 3
LEFT: Final = 4
_CODE: Final = {
    MemberState.ALIVE: ALIVE,
    MemberState.SUSPECT: SUSPECT,
    MemberState.DEAD: DEAD,
    MemberState.LEFT: LEFT,
}

#: A node whose timer stays due after ``handle_timer`` this many times in a row is a
#: core bug (it would spin the simulation at one instant forever).
MAX_SPIN: Final = 1_000
#: False positives kept individually (the rest are only counted).
FP_KEEP: Final = 50
#: Latencies are drawn from 2**LATENCY_BITS equiprobable quantiles of the distribution
#: (the midpoints of its 16,384 slices), indexed by random bits: one C call a datagram.
LATENCY_BITS: Final = 14


@cache
def latency_table(dist: str, lo: float, hi: float, median: float, sigma: float) -> list[float]:
    """The quantile table of a latency law (shared by every run with the same law)."""
    levels = 1 << LATENCY_BITS
    mids = [(k + 0.5) / levels for k in range(levels)]
    if dist == "uniform":
        return [lo + (hi - lo) * q for q in mids]
    if sigma == 0:
        return [min(max(median, lo), hi)] * levels
    normal = NormalDist(math.log(median), sigma)
    return [min(max(math.exp(normal.inv_cdf(q)), lo), hi) for q in mids]


@cache
def record_blob() -> SignedBlob:
    """A real signed meshd record (admission chain included), built once: what a ``push``
    datagram carries. The simulator does not verify it; it sizes the datagrams."""
    rng = random.Random("record")
    rand = rng.randbytes
    node = Node.create_cluster(
        sign=SigningKey(rand(32)),
        wg=WireGuardKey(rand(32)),
        ca=SigningKey(rand(32)),
        keyring=Keyring([rand(32)]),
        token_key=rand(32),
        plan=AddressPlan.parse("10.200.0.0/16", "fd00:200::/48"),
        config=NodeConfig(
            name="node-01234",
            hostname=None,
            endpoints=["10.1.2.3:7946"],
            zone="mesh.internal.",
            version="0.1.0",
        ),
        now=1.8e9,
        random_bytes=rand,
    )
    return node.record.blob


@cache
def push_sizes(records: int) -> tuple[int, ...]:
    """Sealed sizes of the ``push`` datagrams answering a request for ``records`` records,
    batched as ``Node._push`` batches them (a datagram closes once PUSH_BUDGET is
    reached)."""
    blob = record_blob()
    per = len(blob.body) + 72
    sizes: list[int] = []
    batch = 0
    used = 0
    for k in range(records):
        batch += 1
        used += per
        if used >= PUSH_BUDGET or k == records - 1:
            msg = {"t": "push", "recs": [blob.to_wire()] * batch, "leases": [], "ack": False}
            sizes.append(len(wire.pack(msg)) + ENVELOPE)
            batch = used = 0
    return tuple(sizes)


def rq_size(ids: list[bytes]) -> int:
    """Sealed size of one ``rq`` datagram."""
    return len(wire.pack({"t": "rq", "ids": ids})) + ENVELOPE


def node_id(i: int) -> bytes:
    """16-byte ids, as meshd uses; the index is readable in hex dumps."""
    return b"sim-node" + i.to_bytes(8, "big")


def node_addr(i: int) -> Addr:
    return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", PORT)


@dataclass
class CrashRecord:
    node: int
    at: float
    restart_at: float | None
    observers: list[int]  # live at the crash, the victim excluded
    first_suspect: float | None = None
    dead_at: dict[int, float] = field(default_factory=dict)


@dataclass
class BroadcastRecord:
    """Version ``seq`` of node ``node``'s record, published at ``at``; ``reached`` maps a
    node to the time it held that version (or a newer one)."""

    bid: int
    node: int
    at: float
    observers: list[int]  # live at injection, the origin included
    reached: dict[int, float] = field(default_factory=dict)
    group: str = ""
    seq: int = BASE_SEQ


@dataclass
class Watch:
    """Time from ``since`` until every live node's view is complete (first time)."""

    label: str
    since: float
    done_at: float | None = None


@dataclass
class SetupStats:
    mode: str
    wall_s: float
    add_member_calls: int
    cpu_s: float = 0.0

    @property
    def us_per_add_member(self) -> float | None:
        if not self.add_member_calls:
            return None
        return 1e6 * self.wall_s / self.add_member_calls


class Simulation:
    """One run of one scenario. ``run()`` once, then read the records (or ``metrics``)."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        seed: int | None = None,
        lifeguard: bool | None = None,
        wire_mode: bool | None = None,
    ) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        timing = scenario.build_timing(lifeguard)
        # The node hands its core a packet budget that leaves room for the envelope and
        # the wrapper inside a 1,280-byte IPv6 path (meshd.core.node.SWIM_BUDGET).
        self.timing: Timing = dataclasses.replace(
            timing, max_packet=min(timing.max_packet, SWIM_BUDGET)
        )
        self.wire = scenario.wire if wire_mode is None else wire_mode
        n = scenario.nodes
        self.n = n
        self.ids = [node_id(i) for i in range(n)]
        self.addrs = [node_addr(i) for i in range(n)]
        self.id_index = {x: i for i, x in enumerate(self.ids)}
        self.addr_index = {a: i for i, a in enumerate(self.addrs)}
        self.end = float(scenario.duration)
        self.now = 0.0
        # Two heaps, one order: datagrams in flight (a few hundred, due within
        # milliseconds) apart from the timers and actions (one or two per node), so that
        # the most frequent entries go through a heap of a few levels instead of log2(n).
        self._heap: list[tuple[Any, ...]] = []
        self._net: list[tuple[Any, ...]] = []
        self._seq = 0
        self.events_processed = 0

        # Independent random streams, each named after its use.
        self.net_rng = random.Random(f"{self.seed}:net")
        self.plan_rng = random.Random(f"{self.seed}:plan")
        self._latency = self._latency_sampler()
        lat = scenario.latency
        self._lat_table = latency_table(lat.dist, lat.min, lat.max, lat.median, lat.sigma)

        # Node instances and their bookkeeping.
        self.nodes: list[Membership | None] = [None] * n
        self.up = bytearray(n)
        self.live = 0
        self.generation = [0] * n
        self.start_inc = [0] * n
        self.last_inc = [-1] * n
        self._armed = [-1] * n
        self._armed_at = [math.nan] * n
        self._spin = [0] * n

        # Who sees whom: view[i][j] is i's view code of j; wrong[i] counts live j != i
        # that i does not see ALIVE.
        self.view: list[bytearray] = [bytearray(0)] * n
        self.wrong = [0] * n
        self.wrong_total = 0
        self.suspect_pairs = 0
        self.dead_pairs = 0

        # Network state.
        self.loss = scenario.loss
        self._partitions: list[tuple[bytearray, bool]] = []
        self.partition_sides: list[list[int]] = []
        self.slow_nodes: list[int] = []
        self._slow = [False] * n
        self._slow_free = [0.0] * n

        # Counters.
        self.msgs_sent = [0] * n
        self.bytes_sent = [0] * n
        #: Per message kind: [messages, bytes].
        self.kind_stats: dict[str, list[int]] = {}
        # One reusable packer: the same bytes as ``wire.pack`` (same options), without
        # building a packer per message (half the cost of counting bytes).
        self._pack = msgpack.Packer(use_bin_type=True).pack
        # Per-node bytes at the previous sample (for the busiest node's rate per sample).
        self._bytes_mark = [0] * n
        self.dropped = {"loss": 0, "partition": 0, "down": 0, "unknown_addr": 0}
        self.oversize = 0
        self._byte_tick = 0
        self.refutations = 0
        self.node_seconds = 0.0
        self._live_mark = 0.0
        # Record pull (simulations/pull.py, the node's rule): per node, the versions
        # it holds of records changed since the start (the rest are at BASE_SEQ) and its
        # pull bookkeeping; per owner, the versions published, for the reach metric.
        self.held: list[dict[int, int]] = [{} for _ in range(n)]
        self.pulls: list[RecordPull] = [RecordPull() for _ in range(n)]
        self._published: dict[int, list[BroadcastRecord]] = {}
        self.records = {"rq": 0, "rq_ids": 0, "push": 0, "pushed": 0, "new": 0, "stale": 0}

        # Records for the metrics.
        self.crashes: list[CrashRecord] = []
        self._down_record: list[CrashRecord | None] = [None] * n
        # False positives are counted, not stored (a slow-node run has millions):
        # (kind, inside a partition window, subject slow, observer slow) -> events.
        self.fp_counts: dict[tuple[str, bool, bool, bool], int] = {}
        self.fp_subjects: dict[str, set[int]] = {"dead": set(), "suspect": set()}
        #: The first few, for reading a run: (time, kind, observer, subject, in window).
        self.fp_first: list[tuple[float, str, int, int, bool]] = []
        self.broadcasts: dict[int, BroadcastRecord] = {}
        self.watches: list[Watch] = []
        self.samples: list[dict[str, float]] = []
        self.setup: SetupStats | None = None
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self._fp_windows: list[tuple[float, float]] = []
        self._drain_cap = 8 * n + 10_000
        self._ran = False
        #: Checked at every sample: return True to end the run there (tests stop at
        #: convergence instead of simulating a worst-case bound to the end).
        self.stop_when: Callable[[Simulation], bool] | None = None

    # ------------------------------------------------------------------ scheduling

    def _push(self, t: float, kind: int, a: Any, b: Any = None, c: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b, c))

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at simulated time ``t`` (scenario actions, test probes)."""
        self._push(t, _ACTION, fn)

    def _latency_sampler(self) -> Callable[[], float]:
        lat = self.scenario.latency
        table = latency_table(lat.dist, lat.min, lat.max, lat.median, lat.sigma)
        bits = self.net_rng.getrandbits
        return lambda: table[bits(LATENCY_BITS)]

    @property
    def kinds(self) -> dict[str, int]:
        """Messages sent, by kind."""
        return {k: v[0] for k, v in self.kind_stats.items()}

    @property
    def kind_bytes(self) -> dict[str, int]:
        """Bytes counted, by message kind."""
        return {k: v[1] for k, v in self.kind_stats.items()}

    # ---------------------------------------------------------------------- running

    def run(self) -> Simulation:
        """Bootstrap, schedule the scenario, run to ``duration``. Call once."""
        if self._ran:
            raise RuntimeError("a Simulation runs once; build a new one")
        self._ran = True
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._bootstrap()
            self._plan()
            # Millions of long-lived member objects would make every full GC pass crawl
            # through them; freezing moves them out of the collector's way.
            gc.freeze()
            if gc_was_enabled:
                gc.enable()
            self._loop()
            self._account_live()
        finally:
            gc.unfreeze()
            if gc_was_enabled:
                gc.enable()
        self.wall_s = time.perf_counter() - wall0
        self.cpu_s = time.process_time() - cpu0
        return self

    def _loop(self) -> None:
        # The hot path: names are bound locally and a datagram for a node that is not
        # slow is handed to its core inline (the same steps as ``_deliver``).
        heap = self._heap
        net = self._net
        pop = heapq.heappop
        nodes = self.nodes
        armed = self._armed
        slow = self._slow
        dropped = self.dropped
        after = self._after
        unpack = wire.unpack if self.wire else None
        count = 0
        try:
            for _ in range(self.scenario.max_events):
                # The earlier of the two heaps' first entries: one order, (time, seq).
                if net:
                    first = heap if heap and heap[0] < net[0] else net
                elif heap:
                    first = heap
                else:
                    break
                if first[0][0] > self.end:
                    break
                entry = pop(first)
                now = self.now = entry[0]
                kind = entry[2]
                count += 1
                if kind == _MSG:
                    dst = entry[3]
                    m = nodes[dst]
                    if m is None:
                        dropped["down"] += 1
                    elif slow[dst]:
                        self._deliver(dst, entry[4], entry[5])
                    else:
                        payload = entry[5]
                        if type(payload) is tuple:
                            self._on_record_msg(dst, m, entry[4], payload)
                        else:
                            m.receive(payload if unpack is None else unpack(payload), entry[4], now)
                        after(dst, m)
                elif kind == _TIMER:
                    i = entry[3]
                    if armed[i] == entry[4]:
                        m = nodes[i]
                        assert m is not None
                        armed[i] = -1
                        m.handle_timer(now)
                        after(i, m, True)
                elif kind == _PROC:
                    dst = entry[3]
                    m = nodes[dst]
                    if m is not None and self.generation[dst] == entry[6]:
                        self._receive(dst, m, entry[4], entry[5])
                    else:
                        dropped["down"] += 1
                else:
                    entry[3]()
            else:
                raise RuntimeError(f"event budget of {self.scenario.max_events} exhausted")
        finally:
            self.events_processed += count
        self.now = max(self.now, self.end)

    # ----------------------------------------------------------------- node inputs

    def _deliver(self, dst: int, src: Addr, payload: Any) -> None:
        m = self.nodes[dst]
        if m is None:
            self.dropped["down"] += 1
            return
        if self._slow[dst]:
            sl = self.scenario.slow
            if sl.start <= self.now < sl.end:
                # FIFO: a slow node handles datagrams in arrival order, each late.
                t = max(
                    self.now + self.net_rng.uniform(sl.delay_min, sl.delay_max),
                    self._slow_free[dst],
                )
                self._slow_free[dst] = t
                self._seq += 1
                heapq.heappush(
                    self._heap, (t, self._seq, _PROC, dst, src, payload, self.generation[dst])
                )
                return
        self._receive(dst, m, src, payload)

    def _receive(self, dst: int, m: Membership, src: Addr, payload: Any) -> None:
        if type(payload) is tuple:
            self._on_record_msg(dst, m, src, payload)
        else:
            m.receive(wire.unpack(payload) if self.wire else payload, src, self.now)
        self._after(dst, m)

    def _after(self, i: int, m: Membership, from_timer: bool = False) -> None:
        """Carry out what one input produced: send, record events, re-arm the timer."""
        out = m.messages_to_send()
        if out:
            send = self._send
            for msg, dst_addr in out:
                send(i, msg, dst_addr)
        ev = m.next_event()
        if ev is not None:
            self._drain(i, m, ev)
        # The node's record pull: its requests, its retry timer (Node.get_timer).
        pull = self.pulls[i]
        now = self.now
        if from_timer:
            due = pull.next_retry()
            if due is not None and due <= now:  # RecordPull.retry would do nothing else
                pull.retry(now, self._have_fn(i))
        reqs = pull.requests()
        if reqs:
            id_index = self.id_index
            for addr, ids in reqs:
                self._send_record_msg(i, addr, (RQ, [id_index[x] for x in ids]), rq_size(ids))
        t = m.get_timer()
        r = pull.next_retry()
        if r is not None and (t is None or r < t):
            t = r
        if t is None:
            self._armed[i] = -1
            return
        if from_timer:
            if t <= now:
                self._spin[i] += 1
                if self._spin[i] > MAX_SPIN:
                    raise RuntimeError(f"node {i}: timer stays due at t={now} (core bug)")
            else:
                self._spin[i] = 0
        if t < now:
            t = now
        if self._armed[i] != -1 and self._armed_at[i] == t:
            return  # that entry is still pending
        self._seq += 1
        self._armed[i] = self._seq
        self._armed_at[i] = t
        heapq.heappush(self._heap, (t, self._seq, _TIMER, i, self._seq, None))

    def _drain(self, i: int, m: Membership, ev: Any) -> None:
        """Record ``ev`` and every further event the node has queued (bounded). Most are
        copies of items the node already has: those are skipped here, inline."""
        on_event = self._on_event
        held = self.held[i]
        pull = self.pulls[i]
        id_index = self.id_index
        for _ in range(self._drain_cap):
            if type(ev) is Piggyback:
                # Node._on_item: an announcement of a version we lack is pulled from the
                # member that sent it (simulations.pull.RecordPull: Node._want).
                item = ev.item
                if item.get("k") == "v" and ev.addr is not None:
                    nid = item["id"]
                    seq = item["s"]
                    if seq > held.get(id_index[nid], BASE_SEQ):
                        pull.want(nid, seq, ev.addr, self.now)
            elif type(ev) is SyncNeeded:
                pull.sync_needed(ev.addr, ev.node_ids, self._have_fn(i), self.now)
            else:
                on_event(i, m, ev)
            ev = m.next_event()
            if ev is None:
                break
        else:
            raise RuntimeError(f"node {i} produced more than {self._drain_cap} events at once")

    def _send(self, i: int, msg: dict[str, Any], dst_addr: Addr) -> None:
        self.msgs_sent[i] += 1
        k = msg["k"]
        ks = self.kind_stats.get(k)
        if ks is None:
            ks = self.kind_stats[k] = [0, 0]
        ks[0] += 1
        payload: Any = msg
        size = -1
        if self.wire:
            payload = wire.pack(msg)
            size = len(payload)
            counted = size + SWIM_OVERHEAD
        else:
            sample = self.scenario.bytes_sample
            if sample == 1:
                size = len(self._pack(msg))
                counted = size + SWIM_OVERHEAD
            else:
                self._byte_tick += 1
                if self._byte_tick >= sample:
                    self._byte_tick = 0
                    size = len(self._pack(msg))
                    counted = (size + SWIM_OVERHEAD) * sample
        if size >= 0:
            self.bytes_sent[i] += counted
            ks[1] += counted
            if size > self.timing.max_packet:
                self.oversize += 1
        self._transmit(i, dst_addr, payload)

    def _send_record_msg(self, i: int, dst_addr: Addr, payload: tuple[Any, ...], size: int) -> None:
        """A node-level datagram of the record pull (``rq`` or ``push``), ``size`` sealed
        bytes; the network treats it like any other datagram."""
        kind = payload[0]
        self.msgs_sent[i] += 1
        self.bytes_sent[i] += size
        ks = self.kind_stats.get(kind)
        if ks is None:
            ks = self.kind_stats[kind] = [0, 0]
        ks[0] += 1
        ks[1] += size
        self._transmit(i, dst_addr, payload)

    def _transmit(self, i: int, dst_addr: Addr, payload: Any) -> None:
        dst = self.addr_index.get(dst_addr)
        if dst is None:
            self.dropped["unknown_addr"] += 1
            return
        if self._partitions and self._blocked(i, dst):
            self.dropped["partition"] += 1
            return
        if self.loss and self.net_rng.random() < self.loss:
            self.dropped["loss"] += 1
            return
        self._seq += 1
        t = self.now + self._lat_table[self.net_rng.getrandbits(LATENCY_BITS)]
        heapq.heappush(self._net, (t, self._seq, _MSG, dst, self.addrs[i], payload))

    def _blocked(self, src: int, dst: int) -> bool:
        for side, one_way in self._partitions:
            a, b = side[src], side[dst]
            if a != b and (not one_way or a):
                return True
        return False

    # ----------------------------------------------------------------------- events

    def _on_event(self, i: int, m: Membership, ev: Any) -> None:
        tp = type(ev)
        if tp is MemberStateChanged:
            j = self.id_index[ev.node_id]
            self._set_view(i, j, _CODE[ev.new])
            if ev.new is MemberState.DEAD or ev.new is MemberState.SUSPECT:
                self._on_accusation(i, j, ev.new is MemberState.DEAD, ev.incarnation)
        elif tp is MemberJoined:
            self._set_view(i, self.id_index[ev.node_id], ALIVE)
        elif tp is MemberRemoved:
            self._set_view(i, self.id_index[ev.node_id], UNKNOWN)
        elif tp is Refuted:
            self.refutations += 1
        # Piggyback is handled in _drain; MemberAddressChanged cannot happen here
        # (addresses never change), SyncNeeded needs no action (no owner data).

    def _on_accusation(self, i: int, j: int, dead: bool, inc: int) -> None:
        now = self.now
        if self.up[j] and inc >= self.start_inc[j]:
            # About the current life of a running node: a false positive.
            kind = "dead" if dead else "suspect"
            in_window = any(s <= now <= e for s, e in self._fp_windows)
            key = (kind, in_window, self._slow[j], self._slow[i])
            self.fp_counts[key] = self.fp_counts.get(key, 0) + 1
            self.fp_subjects[kind].add(j)
            if len(self.fp_first) < FP_KEEP:
                self.fp_first.append((round(now, 6), kind, i, j, in_window))
            return
        rec = self._down_record[j]
        if rec is None:
            return  # about an earlier life of a restarted node
        if dead:
            if i not in rec.dead_at:
                rec.dead_at[i] = now
        elif rec.first_suspect is None:
            rec.first_suspect = now

    def _have_fn(self, i: int) -> Callable[[bytes], int]:
        """Node i's "seq of the record I hold" lookup, by node id."""
        held, index = self.held[i], self.id_index
        return lambda nid: held.get(index[nid], BASE_SEQ)

    def _on_record_msg(self, i: int, m: Membership, src: Addr, payload: tuple[Any, ...]) -> None:
        """The node-level half of the record pull, as ``Node`` does it: answer an ``rq``
        with the records held (``Node._on_record_request`` / ``_push``); take a pushed
        version newer than ours, set its version in the core (push-pull compares it), stop
        wanting it and announce it in turn (``Node._offer_record``)."""
        rs = self.records
        if payload[0] == RQ:
            owners = payload[1]
            rs["rq"] += 1
            rs["rq_ids"] += len(owners)
            held = self.held[i]
            recs = [(o, held.get(o, BASE_SEQ)) for o in owners]
            sizes = push_sizes(len(recs))
            k = 0
            for size in sizes:
                per = -(-len(recs) // len(sizes))
                self._send_record_msg(i, src, (PUSH, recs[k : k + per]), size)
                k += per
            return
        held = self.held[i]
        for owner, seq in payload[1]:
            rs["pushed"] += 1
            if seq <= held.get(owner, BASE_SEQ) or owner == i:
                rs["stale"] += 1
                continue
            rs["new"] += 1
            held[owner] = seq
            nid = self.ids[owner]
            self.pulls[i].got(nid, seq)
            m.set_version(nid, seq)
            for rec in self._published.get(owner, ()):
                if rec.seq <= seq and i not in rec.reached:
                    rec.reached[i] = self.now
            m.broadcast(*announcement(nid, seq))

    def _set_view(self, i: int, j: int, code: int) -> None:
        row = self.view[i]
        old = row[j]
        if old == code:
            return
        row[j] = code
        if old == SUSPECT:
            self.suspect_pairs -= 1
        elif old == DEAD:
            self.dead_pairs -= 1
        if code == SUSPECT:
            self.suspect_pairs += 1
        elif code == DEAD:
            self.dead_pairs += 1
        if self.up[j] and i != j:
            d = (code != ALIVE) - (old != ALIVE)
            if d:
                self.wrong[i] += d
                self.wrong_total += d
                if self.wrong_total == 0:
                    self._converged()

    def _converged(self) -> None:
        for w in self.watches:
            if w.done_at is None:
                w.done_at = self.now

    def watch(self, label: str) -> Watch:
        """Record how long from now until every live node's view is complete."""
        w = Watch(label, self.now, self.now if self.wrong_total == 0 else None)
        self.watches.append(w)
        return w

    # ------------------------------------------------------------ node life cycle

    def _new_core(self, i: int, inc: int) -> Membership:
        gen = self.generation[i]
        self.generation[i] = gen + 1
        rng = random.Random(f"{self.seed}:node:{i}:{gen}")
        return Membership(self.ids[i], self.addrs[i], self.timing, rng, self.now, inc)

    def _account_live(self) -> None:
        self.node_seconds += self.live * (self.now - self._live_mark)
        self._live_mark = self.now

    def _bootstrap(self) -> None:
        s = self.scenario
        n = self.n
        t0 = time.perf_counter()
        c0 = time.process_time()
        calls = 0
        if s.bootstrap == "full":
            # Every view complete at t=0: the state a cluster reaches once join and
            # record sync are done, which is where failure detection starts.
            # One SharedView: every core references the same n immutable member entries
            # and copies one only when that member's state changes in its view (the
            # core's own bulk path; the node's own id in it is left out by each core).
            view = SharedView(zip(self.ids, self.addrs, [0] * n, strict=True), 0.0)
            for i in range(n):
                m = self._new_core(i, 0)
                # The view rows below account for what MemberJoined events would say.
                m.add_members(view, 0.0, events=False)
                calls += n
                self.nodes[i] = m
                row = bytearray(b"\x01") * n
                row[i] = UNKNOWN
                self.view[i] = row
                self.up[i] = 1
            self.live = n
            for i in range(n):
                node = self.nodes[i]
                assert node is not None
                self._after(i, node)
        else:
            seeds = list(range(s.seeds))
            for i in seeds:
                self._start(i, 0, [])
            for i in seeds:
                node = self.nodes[i]
                assert node is not None
                for j in seeds:
                    if j != i:
                        node.add_member(self.ids[j], self.addrs[j], 0, 0.0)
                        calls += 1
                self._after(i, node)
            times = sorted(self.plan_rng.uniform(0, s.join_window) for _ in range(n - s.seeds))
            for j, t in zip(range(s.seeds, n), times, strict=True):
                self.at(t, partial(self._join, j, None))
            self.at(times[-1] if times else 0.0, self._watch_join)
        self.setup = SetupStats(
            s.bootstrap, time.perf_counter() - t0, calls, time.process_time() - c0
        )

    def _watch_join(self) -> None:
        self.watch("join")

    def _start(self, j: int, inc: int, known: Iterable[MemberView]) -> Membership:
        """A new instance of node ``j`` knowing ``known`` (a seed's view, or nothing)."""
        self._account_live()
        m = self._new_core(j, inc)
        self.nodes[j] = m
        self.up[j] = 1
        self.live += 1
        self.start_inc[j] = inc
        self._down_record[j] = None
        self._slow_free[j] = 0.0
        self.view[j] = bytearray(self.n)
        added = 0
        for i in range(self.n):
            if self.up[i] and i != j and self.view[i][j] != ALIVE:
                self.wrong[i] += 1
                added += 1
        self.wrong[j] = self.live - 1
        self.wrong_total += added + self.live - 1
        for v in known:
            if v.node_id != self.ids[j]:
                m.add_member(v.node_id, v.addr, v.incarnation, self.now)
        # Records this life starts with (its persisted store, or the seed's in a grant).
        for owner, seq in self.held[j].items():
            m.set_version(self.ids[owner], seq)
        self._after(j, m)
        return m

    def _seed_view(self, seed: Membership) -> list[MemberView]:
        """What a join reply carries: the seed's live members, the seed included."""
        live = (MemberState.ALIVE, MemberState.SUSPECT)
        return [v for v in seed.members() if v.state in live]

    def _pick_live(self, prefer: Iterable[int] = ()) -> int | None:
        """A random running node, from ``prefer`` when any of those runs."""
        pool = [i for i in prefer if self.up[i]]
        if not pool:
            pool = [i for i in range(self.n) if self.up[i]]
        return self.plan_rng.choice(pool) if pool else None

    def _join(self, j: int, inc: int | None) -> None:
        """Join (or rejoin after a crash) through a seed: take its view, be added by it.
        The join round trip (milliseconds) is not simulated; gossip does the rest."""
        seed_idx = self._pick_live(range(self.scenario.seeds) if inc is None else ())
        known: list[MemberView] = []
        seed = None if seed_idx is None else self.nodes[seed_idx]
        if seed is not None:
            known = self._seed_view(seed)
            if inc is None and seed_idx is not None:
                # A first join's grant carries the seed's records; a restart keeps its own.
                self.held[j] = dict(self.held[seed_idx])
        m = self._start(j, 0 if inc is None else inc, known)
        # A (re)started node announces its record, which starts a sync (Node.announce).
        m.sync(self.now)
        self._after(j, m)
        if seed is not None and seed_idx is not None:
            seed.add_member(self.ids[j], self.addrs[j], m.incarnation, self.now)
            self._after(seed_idx, seed)

    def crash(self, j: int, restart_at: float | None = None) -> None:
        """Stop node ``j`` now: its pending timer and inbound datagrams are void."""
        m = self.nodes[j]
        if m is None:
            return
        self._account_live()
        self.last_inc[j] = m.incarnation
        self.nodes[j] = None
        self.up[j] = 0
        self.live -= 1
        self._armed[j] = -1
        row = self.view[j]
        self.suspect_pairs -= row.count(SUSPECT)
        self.dead_pairs -= row.count(DEAD)
        self.wrong_total -= self.wrong[j]
        self.wrong[j] = 0
        for i in range(self.n):
            if self.up[i] and self.view[i][j] != ALIVE:
                self.wrong[i] -= 1
                self.wrong_total -= 1
        observers = [i for i in range(self.n) if self.up[i]]
        rec = CrashRecord(j, self.now, restart_at, observers)
        self.crashes.append(rec)
        self._down_record[j] = rec
        if self.wrong_total == 0:
            self._converged()

    def restart(self, j: int) -> None:
        """A new instance of ``j`` with a higher incarnation than its last life, taking
        its first view from a random running node (as a persisted view or a rejoin would)."""
        if self.nodes[j] is not None:
            return
        rec = self._down_record[j]
        if rec is not None:
            rec.restart_at = self.now
        self._join(j, self.last_inc[j] + 1)
        self.watch(f"restart:{j}")

    def publish(self, node: int, group: str = "") -> BroadcastRecord | None:
        """``node`` publishes a new version of its record (``Node.announce``: seq + 1,
        announce it, start-up sync: push-pull at once until two partners answered) and
        the run follows where it is held."""
        m = self.nodes[node]
        if m is None:
            return None
        held = self.held[node]
        seq = held.get(node, BASE_SEQ) + 1
        held[node] = seq
        nid = self.ids[node]
        bid = len(self.broadcasts)
        observers = [i for i in range(self.n) if self.up[i]]
        rec = BroadcastRecord(bid, node, self.now, observers, {node: self.now}, group, seq)
        self.broadcasts[bid] = rec
        self._published.setdefault(node, []).append(rec)
        m.set_version(nid, seq)
        m.broadcast(*announcement(nid, seq))
        m.sync(self.now)
        self._after(node, m)
        return rec

    # ------------------------------------------------------------------- the plan

    def _plan(self) -> None:
        """Turn the scenario's crashes, partitions, slow nodes and broadcasts into actions."""
        s = self.scenario
        n = self.n
        rng = self.plan_rng
        non_seed = list(range(s.seeds, n)) if s.bootstrap == "seeds" else list(range(n))
        victims: list[int] = []
        for c in s.crashes:
            j = (
                c.node
                if c.node is not None
                else rng.choice([x for x in non_seed if x not in victims])
            )
            victims.append(j)
            self.at(c.at, partial(self.crash, j, c.restart_at))
            if c.restart_at is not None:
                self.at(c.restart_at, partial(self.restart, j))
        low_high = suspicion_bounds(self.timing, n)
        for p in s.partitions:
            members = list(p.nodes) if p.nodes else rng.sample(range(n), round(p.fraction * n))
            side = bytearray(n)
            for i in members:
                side[i] = 1
            self.partition_sides.append(sorted(members))
            entry = (side, p.one_way)
            self.at(p.start, partial(self._partitions.append, entry))
            self.at(p.end, partial(self._heal, entry))
            # Accusations up to one maximal suspicion after a heal are partition effects.
            self._fp_windows.append((p.start, p.end + low_high[1] + 5 * self.timing.probe_interval))
        sl = s.slow
        if sl.nodes or sl.count:
            pool = [x for x in range(n) if x not in victims]
            chosen = list(sl.nodes) if sl.nodes else rng.sample(pool, sl.count)
            self.slow_nodes = sorted(chosen)
            for i in chosen:
                self._slow[i] = True
        for g, b in enumerate(s.broadcasts, 1):
            group = b.group or f"broadcast{g}"
            for k in range(b.count):
                self.at(b.at + k * b.every, partial(self._publish_planned, b.node, group))
        t = 0.0
        for _ in range(int(s.duration / s.sample_interval) + 2):
            self.at(t, self._sample)
            t += s.sample_interval
            if t > s.duration:
                break

    def _heal(self, entry: tuple[bytearray, bool]) -> None:
        self._partitions.remove(entry)
        self.watch("partition_heal")

    def _publish_planned(self, node: int | None, group: str) -> None:
        i = node if node is not None and self.up[node] else self._pick_live()
        if i is not None:
            self.publish(i, group)

    def _sample(self) -> None:
        if self.stop_when is not None and self.stop_when(self):
            self.end = self.now  # the loop sees it before the next entry
        sent = self.bytes_sent
        # The most any one node sent since the previous sample: O(n) per sample.
        busiest = max(map(sub, sent, self._bytes_mark), default=0)
        self._bytes_mark = sent.copy()
        self.samples.append(
            {
                "t": self.now,
                "live": self.live,
                "wrong_pairs": self.wrong_total,
                "incomplete_nodes": self.n - self.wrong.count(0),
                "suspect_pairs": self.suspect_pairs,
                "dead_pairs": self.dead_pairs,
                "msgs": sum(self.msgs_sent),
                "bytes": sum(sent),
                "max_node_bytes": busiest,
            }
        )
