"""SWIM + Lifeguard membership (meshd/core/membership.py) on a fake clock.

Two harnesses: ``Solo`` drives one instance and lets the test play every other
node by hand; ``Net`` is a discrete-event network of instances (latency, loss,
cut links, crashes) that msgpack-round-trips every message through
``meshd.core.wire`` to prove the maps are wire-safe and within ``max_packet``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshd.core import membership, wire
from meshd.core.membership import (
    PROFILES,
    Event,
    MemberAddressChanged,
    MemberJoined,
    MemberRemoved,
    Membership,
    MemberState,
    MemberStateChanged,
    Piggyback,
    Refuted,
    SharedView,
    Timing,
    expected_confirmations,
    push_pull_scale,
    retransmit_limit,
    shuffle,
    suspicion_bounds,
    suspicion_floor,
    suspicion_timeout,
)

Addr = tuple[str, int]
Msg = dict[str, Any]
NOW0 = 1_000.0
LOCAL = PROFILES["local"]
ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)


def nid(i: int) -> bytes:
    return bytes([i]) * 16


def addr(i: int) -> Addr:
    return (f"10.0.0.{i}", 7946)


def roundtrip(msg: Msg, timing: Timing) -> Msg:
    data = wire.pack(msg)
    assert len(data) <= timing.max_packet, (len(data), msg["k"])
    out = wire.unpack(data)
    assert isinstance(out, dict)
    return out


def items(msg: Msg) -> list[Msg]:
    return list(msg.get("g", []))


# ------------------------------------------------------------------------- harnesses


class Solo:
    """One instance; the test plays the rest of the cluster."""

    def __init__(
        self, members: int = 10, timing: Timing = LOCAL, seed: int = 1, inc: int = 0
    ) -> None:
        self.timing = timing
        self.now = NOW0
        self.m = Membership(nid(0), addr(0), timing, random.Random(seed), self.now, inc)
        for i in range(1, members + 1):
            self.m.add_member(nid(i), addr(i), 0, self.now)
        self.sent: list[tuple[float, Msg, Addr]] = []
        self.events: list[Event] = []
        self._drain()

    def _drain(self) -> list[tuple[Msg, Addr]]:
        out = [(roundtrip(msg, self.timing), to) for msg, to in self.m.messages_to_send()]
        self.sent.extend((self.now, msg, to) for msg, to in out)
        while (ev := self.m.next_event()) is not None:
            self.events.append(ev)
        return out

    def recv(self, body: Msg, src: Addr = ("10.0.0.99", 7946)) -> list[tuple[Msg, Addr]]:
        self.m.receive(body, src, self.now)
        return self._drain()

    def run(self, until: float, ack: Callable[[Msg], bool] = lambda msg: True) -> None:
        """Fire timers up to ``until``; pings for which ``ack`` is true are answered."""
        while True:
            t = self.m.get_timer()
            if t is None or t > until:
                break
            self.now = max(self.now, t)
            self.m.handle_timer(self.now)
            for msg, to in self._drain():
                if msg["k"] == "ping" and ack(msg):
                    self.recv({"k": "ack", "seq": msg["seq"], "from": msg["to"]}, to)
        self.now = max(self.now, until)

    def run_to_ping(self, ack: Callable[[Msg], bool] = lambda msg: True) -> Msg:
        """Run until the next ping goes out; return it."""
        n = len(self.sent)
        for _ in range(1000):
            t = self.m.get_timer()
            assert t is not None
            self.run(t, ack)
            pings = [msg for _, msg, _ in self.sent[n:] if msg["k"] == "ping"]
            if pings:
                return pings[0]
        raise AssertionError("no ping")

    def state(self, i: int) -> tuple[MemberState, int] | None:
        v = self.m.member(nid(i))
        return None if v is None else (v.state, v.incarnation)

    def kinds(self, since: int = 0) -> list[str]:
        return [msg["k"] for _, msg, _ in self.sent[since:]]


class Net:
    """Discrete-event network of Membership instances."""

    def __init__(
        self,
        n: int,
        timing: Timing = LOCAL,
        *,
        seed: int = 1,
        loss: float = 0.0,
        latency: tuple[float, float] = (0.001, 0.004),
        log: bool = True,
    ) -> None:
        self.timing = timing
        self.rng = random.Random(seed)
        self.now = NOW0
        self.loss = loss
        self.latency = latency
        self.nodes: dict[Addr, Membership] = {}
        self.flight: list[tuple[float, int, Addr, Addr, bytes]] = []
        self.timers: list[tuple[float, int, Addr]] = []
        self.due: dict[Addr, float | None] = {}
        self.count = itertools.count()
        self.blocked: Callable[[Addr, Addr, Msg], bool] = lambda src, dst, msg: False
        self.log_on = log
        self.log: list[tuple[float, Addr, Addr, Msg]] = []
        self.events: dict[Addr, list[tuple[float, Event]]] = defaultdict(list)
        for i in range(n):
            self.spawn(i)

    def spawn(self, i: int, incarnation: int = 0) -> Membership:
        """Start node ``i``, knowing every running node (as if from their records)."""
        a = addr(i)
        m = Membership(
            nid(i), a, self.timing, random.Random(self.rng.random()), self.now, incarnation
        )
        for other_addr, other in self.nodes.items():
            m.add_member(other.self_id, other_addr, other.incarnation, self.now)
            other.add_member(m.self_id, a, incarnation, self.now)
        self.nodes[a] = m
        for x in list(self.nodes):
            self._after(x)
        return m

    def crash(self, i: int) -> None:
        del self.nodes[addr(i)]

    def node(self, i: int) -> Membership:
        return self.nodes[addr(i)]

    def view(self, viewer: int, subject: int) -> tuple[MemberState, int] | None:
        v = self.node(viewer).member(nid(subject))
        return None if v is None else (v.state, v.incarnation)

    def state(self, viewer: int, subject: int) -> MemberState | None:
        v = self.view(viewer, subject)
        return None if v is None else v[0]

    def _after(self, a: Addr) -> None:
        node = self.nodes[a]
        for msg, dst in node.messages_to_send():
            data = wire.pack(msg)
            assert len(data) <= self.timing.max_packet
            if self.log_on:
                self.log.append((self.now, a, dst, msg))
            if self.loss and self.rng.random() < self.loss:
                continue
            if self.blocked(a, dst, msg):
                continue
            t = self.now + self.rng.uniform(*self.latency)
            heapq.heappush(self.flight, (t, next(self.count), a, dst, data))
        while (ev := node.next_event()) is not None:
            self.events[a].append((self.now, ev))
        due = node.get_timer()
        self.due[a] = due
        if due is not None:
            heapq.heappush(self.timers, (due, next(self.count), a))

    def run(self, duration: float, until: Callable[[], bool] | None = None) -> None:
        end = self.now + duration
        while True:
            while self.timers and (
                self.timers[0][2] not in self.nodes
                or self.due.get(self.timers[0][2]) != self.timers[0][0]
            ):
                heapq.heappop(self.timers)
            t_net = self.flight[0][0] if self.flight else math.inf
            t_tim = self.timers[0][0] if self.timers else math.inf
            t = min(t_net, t_tim)
            if t > end:
                break
            self.now = max(self.now, t)
            if t_net <= t_tim:
                _, _, src, dst, data = heapq.heappop(self.flight)
                node = self.nodes.get(dst)
                if node is None:
                    continue
                body = wire.unpack(data)
                node.receive(body, src, self.now)
                self._after(dst)
            else:
                _, _, a = heapq.heappop(self.timers)
                self.due[a] = None
                self.nodes[a].handle_timer(self.now)
                self._after(a)
            if until is not None and until():
                return
        self.now = end

    def sent(self, kind: str, src: int | None = None, dst: int | None = None) -> list[Msg]:
        return [
            msg
            for _, s, d, msg in self.log
            if msg["k"] == kind
            and (src is None or s == addr(src))
            and (dst is None or d == addr(dst))
        ]


# ---------------------------------------------------------------------- configuration


def test_profiles_match_memberlist() -> None:
    lan, wan, local = PROFILES["lan"], PROFILES["wan"], PROFILES["local"]
    assert lan == Timing()
    assert (lan.probe_interval, lan.probe_timeout, lan.indirect_checks) == (1.0, 0.5, 3)
    assert (lan.gossip_interval, lan.gossip_nodes, lan.suspicion_mult) == (0.2, 3, 4.0)
    assert (lan.suspicion_max_mult, lan.retransmit_mult, lan.awareness_max) == (6.0, 4, 8)
    assert (wan.probe_interval, wan.probe_timeout, wan.gossip_interval) == (5.0, 3.0, 0.5)
    assert (wan.gossip_nodes, wan.suspicion_mult) == (4, 6.0)
    assert (local.probe_interval, local.probe_timeout, local.gossip_interval) == (0.2, 0.1, 0.05)


@pytest.mark.parametrize(
    "bad",
    [
        {"probe_interval": 0},
        {"probe_timeout": 2.0},
        {"indirect_checks": -1},
        {"awareness_max": 0},
        {"max_packet": 100},
        {"suspicion_max_mult": 0.5},
    ],
)
def test_timing_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Timing(**bad)


def test_formulas() -> None:
    lan = PROFILES["lan"]
    assert suspicion_bounds(lan, 1) == (4.0, 24.0)  # log10 scale never below 1
    assert suspicion_bounds(lan, 10) == (4.0, 24.0)
    low, high = suspicion_bounds(lan, 1000)
    assert low == pytest.approx(12.0) and high == pytest.approx(72.0)
    assert suspicion_timeout(4.0, 24.0, 0, 2) == 24.0
    assert suspicion_timeout(4.0, 24.0, 1, 2) == pytest.approx(24 - 20 * math.log(2) / math.log(3))
    assert suspicion_timeout(4.0, 24.0, 2, 2) == pytest.approx(4.0)
    assert suspicion_timeout(4.0, 24.0, 5, 2) == 4.0  # never below min
    assert suspicion_timeout(4.0, 24.0, 0, 0) == 4.0  # K = 0: min from the start
    assert expected_confirmations(lan, 50) == 2
    assert expected_confirmations(lan, 3) == 0  # n - 2 < K
    assert expected_confirmations(replace(lan, lifeguard=False), 50) == 0
    assert [retransmit_limit(4, n) for n in (1, 9, 10, 99, 100)] == [4, 4, 8, 8, 12]


# --------------------------------------------------------------------------- probing


def test_probe_ack_path() -> None:
    net = Net(2)
    net.run(2.0)
    for a, b in ((0, 1), (1, 0)):
        pings = net.sent("ping", a, b)
        acks = net.sent("ack", b, a)
        assert len(pings) >= 8  # one per 0.2 s period
        assert {p["seq"] for p in pings} == {x["seq"] for x in acks}
        assert all(p["to"] == nid(b) and p["from"] == nid(a) for p in pings)
        assert net.view(a, b) == (ALIVE, 0)
    assert not net.sent("ping_req") and not net.sent("nack")
    assert not any(isinstance(e, MemberStateChanged) for evs in net.events.values() for _, e in evs)


def test_randomized_round_robin() -> None:
    """SWIM 4.3: each round probes every member once, in a fresh random order."""
    solo = Solo(members=5)
    pings = [solo.run_to_ping()["to"] for _ in range(20)]
    rounds = [pings[i : i + 5] for i in range(0, 20, 5)]
    for r in rounds:
        assert sorted(r) == sorted(nid(i) for i in range(1, 6))
    assert len({tuple(r) for r in rounds}) > 1


def test_new_member_probed_within_current_round() -> None:
    positions = set()
    for seed in range(12):
        solo = Solo(members=5, seed=seed)
        for _ in range(5):  # finish the first round
            solo.run_to_ping()
        first = [solo.run_to_ping()["to"] for _ in range(2)]
        solo.m.add_member(nid(9), addr(9), 0, solo.now)
        rest = [solo.run_to_ping()["to"] for _ in range(4)]
        assert sorted(first + rest) == sorted([nid(i) for i in range(1, 6)] + [nid(9)])
        positions.add(rest.index(nid(9)))
    assert len(positions) > 1  # inserted at a random position, not appended


def test_indirect_probe_relays_the_ack() -> None:
    net = Net(3)
    cut = {frozenset((addr(0), addr(1)))}
    net.blocked = lambda s, d, m: frozenset((s, d)) in cut
    net.run(3.0)
    reqs = net.sent("ping_req", 0, 2)
    assert reqs and all(r["to"] == nid(1) and r["ta"] == "10.0.0.1:7946" for r in reqs)
    relayed = [a for a in net.sent("ack", 2, 0) if a["from"] == nid(1)]
    assert {a["seq"] for a in relayed} == {r["seq"] for r in reqs}
    assert net.view(0, 1) == (ALIVE, 0) and net.view(1, 0) == (ALIVE, 0)
    assert not net.sent("nack")
    assert not any(i["k"] == "suspect" for _, _, _, m in net.log for i in items(m))


def ping_req(seq: int, target: int = 2) -> Msg:
    return {
        "k": "ping_req",
        "seq": seq,
        "to": nid(target),
        "ta": f"10.0.0.{target}:7946",
        "from": nid(1),
    }


def test_relay_acks_or_nacks_for_the_origin() -> None:
    solo = Solo(members=2)
    origin = addr(1)
    out = solo.recv(ping_req(77), origin)
    ((ping, to),) = [(m, a) for m, a in out if m["k"] == "ping"]
    assert to == addr(2) and ping["to"] == nid(2) and ping["from"] == nid(0)
    out = solo.recv({"k": "ack", "seq": ping["seq"], "from": nid(2)}, addr(2))
    assert [(m["k"], m["seq"], m["from"], a) for m, a in out] == [("ack", 77, nid(2), origin)]
    # The target stays silent: a nack goes to the origin at 80% of the probe timeout
    # (Lifeguard), early enough to reach it before the end of its protocol period.
    t0 = solo.now
    out = solo.recv(ping_req(78), origin)
    ((ping, _),) = [(m, a) for m, a in out if m["k"] == "ping"]
    n = len(solo.sent)
    solo.run(t0 + 0.8 * LOCAL.probe_timeout - 1e-6, ack=lambda m: False)
    assert "nack" not in solo.kinds(n)
    solo.run(t0 + 0.8 * LOCAL.probe_timeout, ack=lambda m: False)
    nacks = [(m, a) for _, m, a in solo.sent[n:] if m["k"] == "nack"]
    assert [(m["seq"], m["from"], a) for m, a in nacks] == [(78, nid(0), origin)]
    # An ack after the nack but within the probe timeout is still forwarded ...
    out = solo.recv({"k": "ack", "seq": ping["seq"], "from": nid(2)}, addr(2))
    assert [(m["k"], m["seq"], a) for m, a in out] == [("ack", 78, origin)]
    # ... one after it is not.
    out = solo.recv(ping_req(79), origin)
    ((ping, _),) = [(m, a) for m, a in out if m["k"] == "ping"]
    solo.run(solo.now + LOCAL.probe_timeout, ack=lambda m: False)
    assert solo.recv({"k": "ack", "seq": ping["seq"], "from": nid(2)}, addr(2)) == []
    assert solo.m.drops == {"stale": 1}


def test_relay_tells_a_suspect_target_it_is_suspected() -> None:
    """Lifeguard Buddy System, indirect path."""
    solo = Solo(members=2)
    suspect_at(solo, 2, by=1)
    out = solo.recv(ping_req(5), addr(1))
    ((ping, _),) = [(m, a) for m, a in out if m["k"] == "ping"]
    assert {"k": "suspect", "id": nid(2), "inc": 0, "by": nid(0)} in items(ping)


def test_healthy_prober_of_a_dead_node_keeps_its_health() -> None:
    """The relays' nacks arrive in time, so a failed probe does not count against us."""
    net = Net(3)
    net.run(0.5)
    net.crash(2)
    worst = [0, 0]

    def track() -> bool:
        for i in (0, 1):
            worst[i] = max(worst[i], net.node(i).local_health)
        return False

    net.run(1.5, until=track)
    assert net.state(0, 2) is not ALIVE and net.state(1, 2) is not ALIVE
    assert net.sent("nack", 1, 0) and net.sent("nack", 0, 1)
    assert worst == [0, 0]


def test_relay_without_lifeguard_sends_no_nack() -> None:
    solo = Solo(members=2, timing=replace(LOCAL, lifeguard=False))
    solo.recv(
        {"k": "ping_req", "seq": 5, "to": nid(2), "ta": "10.0.0.2:7946", "from": nid(1)}, addr(1)
    )
    solo.run(solo.now + 1.0, ack=lambda m: m["to"] != nid(2))
    assert "nack" not in solo.kinds()


def failed_probe(nacks: int, timing: Timing = LOCAL) -> tuple[Solo, bytes]:
    """Solo with 3 members; one probe fails; ``nacks`` of the relays answer with a nack."""
    solo = Solo(members=3, timing=timing)
    ping = solo.run_to_ping(ack=lambda m: False)
    target = ping["to"]
    n = len(solo.sent)
    solo.run(solo.now + timing.probe_timeout, ack=lambda m: False)
    reqs = [(m, a) for _, m, a in solo.sent[n:] if m["k"] == "ping_req"]
    assert len(reqs) == 2  # indirect_checks = 3, but only 2 other members exist
    assert all(m["to"] == target and m["seq"] == ping["seq"] for m, _ in reqs)
    for m, a in reqs[:nacks]:
        relay = next(i for i in range(1, 4) if addr(i) == a)
        solo.recv({"k": "nack", "seq": m["seq"], "from": nid(relay)}, a)
    return solo, target


@pytest.mark.parametrize(("nacks", "health"), [(2, 0), (1, 1), (0, 2)])
def test_missing_nacks_raise_local_health(nacks: int, health: int) -> None:
    """Lifeguard: nacks from every relay mean our own links work; each missing one costs 1."""
    solo, target = failed_probe(nacks)
    solo.run(solo.now + LOCAL.probe_interval, ack=lambda m: False)
    assert solo.m.local_health >= health
    changes = [e for e in solo.events if isinstance(e, MemberStateChanged)]
    assert changes[0] == MemberStateChanged(target, ALIVE, SUSPECT, 0)
    if nacks == 2:
        assert solo.m.local_health == 0


def test_failed_probe_suspects_and_gossips() -> None:
    net = Net(5)
    net.run(0.5)
    net.crash(4)
    t0 = net.now
    net.run(3.0, until=lambda: all(net.state(i, 4) is not ALIVE for i in range(4)))
    assert all(net.view(i, 4) == (SUSPECT, 0) for i in range(4))
    assert net.now - t0 < 5 * LOCAL.probe_interval * 4
    suspects = [i for _, _, _, m in net.log for i in items(m) if i["k"] == "suspect"]
    assert suspects and all(i["id"] == nid(4) and i["inc"] == 0 for i in suspects)


# ------------------------------------------------------------------------- suspicion


def suspect_at(solo: Solo, subject: int, by: int) -> None:
    solo.recv({"k": "gossip", "g": [{"k": "suspect", "id": nid(subject), "inc": 0, "by": nid(by)}]})


def dead_time(solo: Solo, subject: int, limit: float = 60.0) -> float:
    """Run (acking every ping, so our own probes never accuse) until ``subject`` is DEAD."""
    step = 0.01
    while solo.state(subject) != (DEAD, 0):
        assert solo.now < NOW0 + limit
        solo.run(solo.now + step)
    return solo.now


def test_suspicion_times_out_after_max_without_confirmations() -> None:
    solo = Solo(members=10)  # n = 11
    _, high = suspicion_bounds(LOCAL, 11)
    t0 = solo.now
    suspect_at(solo, 5, by=1)
    assert solo.state(5) == (SUSPECT, 0)
    assert dead_time(solo, 5) - t0 == pytest.approx(high, abs=0.02)
    assert MemberStateChanged(nid(5), SUSPECT, DEAD, 0) in solo.events
    dead = [i for _, m, _ in solo.sent for i in items(m) if i["k"] == "dead"]
    assert dead and dead[0] == {"k": "dead", "id": nid(5), "inc": 0, "by": nid(0)}


@pytest.mark.parametrize("confirmations", [1, 2, 3])
def test_suspicion_shrinks_with_independent_confirmations(confirmations: int) -> None:
    solo = Solo(members=10)
    low, high = suspicion_bounds(LOCAL, 11)
    t0 = solo.now
    suspect_at(solo, 5, by=1)
    suspect_at(solo, 5, by=1)  # the same accuser again is no confirmation
    n = len(solo.sent)
    for c in range(confirmations):
        suspect_at(solo, 5, by=2 + c)
    k = expected_confirmations(LOCAL, 11)
    expected = suspicion_timeout(low, high, min(confirmations, k), k)
    assert expected < high
    assert dead_time(solo, 5) - t0 == pytest.approx(expected, abs=0.02)
    # A new confirmation is re-gossiped so that it reaches everyone (memberlist suspectNode);
    # news about one member replaces older queued news about it, so the latest one goes out.
    regossiped = {i["by"] for _, m, _ in solo.sent[n:] for i in items(m) if i["k"] == "suspect"}
    assert nid(1 + min(confirmations, k)) in regossiped


def test_suspicion_fixed_at_min_without_lifeguard() -> None:
    timing = replace(LOCAL, lifeguard=False)
    solo = Solo(members=10, timing=timing)
    low, _ = suspicion_bounds(timing, 11)
    t0 = solo.now
    suspect_at(solo, 5, by=1)
    suspect_at(solo, 5, by=2)
    assert dead_time(solo, 5) - t0 == pytest.approx(low, abs=0.02)


def test_small_cluster_uses_min_timeout() -> None:
    solo = Solo(members=2)  # n = 3: n - 2 < K, so no confirmations are expected
    low, _ = suspicion_bounds(LOCAL, 3)
    suspect_at(solo, 2, by=1)
    assert dead_time(solo, 2) - NOW0 == pytest.approx(low, abs=0.02)


# The suspicion floor (``suspicion_floor``): confirmations beyond memberlist's minimum.
LAN = PROFILES["lan"]


def test_floor_formula() -> None:
    assert suspicion_floor(LAN, 1000) == (pytest.approx(3.0), 2)  # 12 s in memberlist
    assert suspicion_floor(LAN, 500) == (pytest.approx(3.0), 2)  # never below three probes
    assert suspicion_floor(LAN, 10_000) == (pytest.approx(4.0), 3)  # one more per tenfold
    assert suspicion_floor(LAN, 20) == (pytest.approx(3.0), 2)
    assert suspicion_floor(replace(LAN, suspicion_floor_mult=0.5), 20) == (1.5, 2)
    # Off: memberlist's minimum and no K_floor.
    for timing, n in [
        (LAN, 3),  # n - 2 < K
        (replace(LAN, lifeguard=False), 1000),
        (replace(LAN, suspicion_floor_confirmations=0), 1000),
        (replace(LAN, suspicion_floor_mult=4.0), 1000),  # not below the minimum
        (PROFILES["wan"], 1000),
        (LOCAL, 1000),
    ]:
        assert suspicion_floor(timing, n) == (suspicion_bounds(timing, n)[0], 0)
    low, high = suspicion_bounds(LAN, 1000)
    floor, kf = suspicion_floor(LAN, 1000)
    lifeguard_1 = suspicion_timeout(low, high, 1, 2)
    assert suspicion_timeout(low, high, 0, 2, floor, kf) == high  # a lone accusation
    one = suspicion_timeout(low, high, 1, 2, floor, kf)
    assert one == pytest.approx(high - (high - floor) * math.log(2) / math.log(3))
    assert one < lifeguard_1
    assert suspicion_timeout(low, high, 2, 2, floor, kf) == pytest.approx(floor)
    assert suspicion_timeout(low, high, 9, 2, floor, kf) == pytest.approx(floor)


@given(
    low=st.floats(0.1, 100.0),
    max_mult=st.floats(1.0, 10.0),
    floor_frac=st.floats(0.01, 1.5),
    k=st.integers(0, 6),
    k_floor=st.integers(0, 10),
)
def test_timeout_monotone_and_bounded(
    low: float, max_mult: float, floor_frac: float, k: int, k_floor: int
) -> None:
    high, floor = low * max_mult, low * floor_frac
    active = k >= 1 and k_floor >= 1 and floor < low
    lowest = floor if active else low
    prev = math.inf
    for c in range(max(k, k_floor) + 3):
        t = suspicion_timeout(low, high, c, k, floor, k_floor)
        assert t <= prev
        assert lowest <= t <= high
        assert t <= suspicion_timeout(low, high, c, k)  # never longer than memberlist's
        prev = t
    assert prev == lowest
    if k >= 1:
        assert suspicion_timeout(low, high, 0, k, floor, k_floor) == high


def lan_solo() -> tuple[Solo, float, float, float]:
    """n = 11 with the LAN profile: low 4.17 s, high 25 s, floor 3 s after 2 confirmations."""
    solo = Solo(members=10, timing=LAN)
    low, high = suspicion_bounds(LAN, 11)
    floor, kf = suspicion_floor(LAN, 11)
    assert (floor, kf) == (3.0, 2) and low > 4.0
    return solo, low, high, floor


def test_lone_accusation_keeps_the_maximum_timeout() -> None:
    solo, _, high, _ = lan_solo()
    t0 = solo.now
    suspect_at(solo, 5, by=1)
    assert dead_time(solo, 5) - t0 == pytest.approx(high, abs=0.02)


def test_independent_confirmations_reach_the_floor() -> None:
    solo, _, _, floor = lan_solo()
    t0 = solo.now
    for by in (1, 2, 3):  # the accuser and K_floor = 2 confirmations
        suspect_at(solo, 5, by=by)
    assert dead_time(solo, 5) - t0 == pytest.approx(floor, abs=0.02)


def test_repeated_confirmations_from_one_member_count_once() -> None:
    solo, low, high, floor = lan_solo()
    t0 = solo.now
    for by in (1, 2, 2, 1, 2):
        suspect_at(solo, 5, by=by)
    expected = suspicion_timeout(low, high, 1, 2, floor, 2)
    assert expected > low  # one confirmation: well above memberlist's minimum, too
    assert dead_time(solo, 5) - t0 == pytest.approx(expected, abs=0.02)


def test_a_confirmation_after_the_floor_has_passed_is_dead_at_once() -> None:
    solo, _, _, floor = lan_solo()
    suspect_at(solo, 5, by=1)
    suspect_at(solo, 5, by=2)
    solo.run(solo.now + floor + 1.0)
    assert solo.state(5) == (SUSPECT, 0)
    suspect_at(solo, 5, by=3)
    assert solo.state(5) == (DEAD, 0)


def test_refutation_cancels_a_confirmed_suspicion() -> None:
    solo, _, high, floor = lan_solo()
    suspect_at(solo, 5, by=1)
    suspect_at(solo, 5, by=2)
    solo.run(solo.now + floor / 2)
    alive = {"k": "alive", "id": nid(5), "inc": 1, "a": "10.0.0.5:7946"}
    solo.recv({"k": "gossip", "g": [alive]})
    assert solo.state(5) == (ALIVE, 1)
    suspect_at(solo, 5, by=3)  # a confirmation of the refuted accusation counts for nothing
    solo.run(solo.now + high + 1.0)
    assert solo.state(5) == (ALIVE, 1)


def test_ping_to_a_suspect_carries_the_suspicion() -> None:
    """Lifeguard Buddy System: the suspect learns at once that it must refute."""
    solo = Solo(members=1)
    suspect_at(solo, 1, by=1)
    ping = solo.run_to_ping()
    assert ping["to"] == nid(1)
    assert {"k": "suspect", "id": nid(1), "inc": 0, "by": nid(0)} in items(ping)


def test_refutation() -> None:
    net = Net(3)
    net.run(0.3)
    accusation = {"k": "suspect", "id": nid(1), "inc": 0, "by": nid(2)}
    net.node(0).receive({"k": "gossip", "g": [accusation]}, addr(2), net.now)
    net._after(addr(0))
    assert net.view(0, 1) == (SUSPECT, 0)
    net.run(2.0, until=lambda: net.view(0, 1) == (ALIVE, 1) and net.view(2, 1) == (ALIVE, 1))
    b = net.node(1)
    assert b.incarnation == 1 and b.local_health == 1
    assert (net.view(0, 1), net.view(2, 1)) == ((ALIVE, 1), (ALIVE, 1))
    assert any(isinstance(e, Refuted) and e.accused == 0 for _, e in net.events[addr(1)])
    alive = [i for m in net.sent("ack", 1) + net.sent("gossip", 1) for i in items(m)]
    assert {"k": "alive", "id": nid(1), "inc": 1, "a": "10.0.0.1:7946"} in alive


@pytest.mark.parametrize("kind", ["suspect", "dead", "left"])
def test_refute_any_accusation_at_or_above_our_incarnation(kind: str) -> None:
    solo = Solo(members=2, inc=4)
    item: Msg = {"k": kind, "id": nid(0), "inc": 3}
    if kind != "left":
        item["by"] = nid(1)
    solo.recv({"k": "gossip", "g": [item]})
    assert solo.m.incarnation == 4  # older accusations are ignored
    solo.recv({"k": "gossip", "g": [{**item, "inc": 6}]})
    assert solo.m.incarnation == 7
    assert Refuted(7, 6) in solo.events


def test_an_accusation_already_refuted_is_answered_with_the_current_incarnation() -> None:
    """The accuser of a stale suspicion missed our refutation, which may have been gossiped
    out by now: the ack to its (Buddy System) ping carries our current alive, without a
    new incarnation."""
    solo = Solo(members=2, inc=4)
    solo.run(solo.now + 5.0)  # the start-up alive is gossiped out
    stale = {"k": "suspect", "id": nid(0), "inc": 3, "by": nid(1)}
    (ack, _), *_ = solo.recv({"k": "ping", "seq": 9, "to": nid(0), "from": nid(1), "g": [stale]})
    assert ack["k"] == "ack"
    assert {"k": "alive", "id": nid(0), "inc": 4, "a": "10.0.0.0:7946"} in items(ack)
    assert solo.m.incarnation == 4 and not any(isinstance(e, Refuted) for e in solo.events)


def test_a_suspicion_at_a_higher_incarnation_restarts_the_timer() -> None:
    """Suspect at inc 0 for a while; the refutation (alive at 1) is missed and a new
    accusation at 1 arrives: that is a new suspicion with its own full timeout, not a
    confirmation of the old one (which had run past its minimum and would be DEAD at once)."""
    solo = Solo(members=10)
    low, high = suspicion_bounds(LOCAL, 11)
    suspect_at(solo, 5, by=1)
    solo.run(solo.now + low + 0.1)
    assert solo.state(5) == (SUSPECT, 0)
    t1 = solo.now
    solo.recv({"k": "gossip", "g": [{"k": "suspect", "id": nid(5), "inc": 1, "by": nid(2)}]})
    assert solo.state(5) == (SUSPECT, 1)
    solo.run(solo.now + 0.05)
    assert solo.state(5) == (SUSPECT, 1)
    step = 0.01
    while solo.state(5)[0] is not DEAD:
        assert solo.now < t1 + 2 * high
        solo.run(solo.now + step)
    assert solo.now - t1 == pytest.approx(high, abs=0.02)


def test_alive_claiming_a_newer_life_of_ours_is_outbid() -> None:
    solo = Solo(members=1, inc=2)
    solo.recv({"k": "gossip", "g": [{"k": "alive", "id": nid(0), "inc": 2, "a": "10.0.0.0:7946"}]})
    assert solo.m.incarnation == 2
    solo.recv({"k": "gossip", "g": [{"k": "alive", "id": nid(0), "inc": 5, "a": "10.0.0.0:7946"}]})
    assert solo.m.incarnation == 6


def test_suspect_becomes_dead_everywhere() -> None:
    net = Net(6, log=False)
    net.run(0.5)
    net.crash(5)
    net.run(20.0, until=lambda: all(net.state(i, 5) is DEAD for i in range(5)))
    assert all(net.view(i, 5) == (DEAD, 0) for i in range(5))
    for i in range(5):
        kinds = [
            (e.old, e.new) for _, e in net.events[addr(i)] if isinstance(e, MemberStateChanged)
        ]
        assert kinds[-1][1] is DEAD


# ----------------------------------------------------------------- incarnation rules


def solo_with(state: MemberState, inc: int = 5) -> Solo:
    solo = Solo(members=1)
    solo.m.add_member(nid(1), addr(1), inc, solo.now)
    if state is not ALIVE:
        item: Msg = {"k": state.value, "id": nid(1), "inc": inc}
        if state is not LEFT:
            item["by"] = nid(7)
        solo.recv({"k": "gossip", "g": [item]})
    assert solo.state(1) == (state, inc)
    return solo


RULES = [
    # (state at inc 5, item kind, item inc, expected state, expected inc)
    (ALIVE, "alive", 5, ALIVE, 5),
    (ALIVE, "alive", 6, ALIVE, 6),
    (ALIVE, "suspect", 4, ALIVE, 5),
    (ALIVE, "suspect", 5, SUSPECT, 5),
    (ALIVE, "suspect", 6, SUSPECT, 6),
    (ALIVE, "dead", 4, ALIVE, 5),
    (ALIVE, "dead", 5, DEAD, 5),
    (ALIVE, "left", 4, ALIVE, 5),
    (ALIVE, "left", 5, LEFT, 5),
    (SUSPECT, "alive", 5, SUSPECT, 5),
    (SUSPECT, "alive", 6, ALIVE, 6),
    (SUSPECT, "suspect", 7, SUSPECT, 7),
    (SUSPECT, "dead", 5, DEAD, 5),
    (SUSPECT, "dead", 4, SUSPECT, 5),
    (DEAD, "alive", 5, DEAD, 5),
    (DEAD, "alive", 6, ALIVE, 6),
    (DEAD, "suspect", 7, DEAD, 5),
    (DEAD, "dead", 7, DEAD, 7),
    (DEAD, "left", 5, LEFT, 5),
    (LEFT, "alive", 4, LEFT, 5),
    (LEFT, "alive", 5, LEFT, 5),
    (LEFT, "alive", 6, ALIVE, 6),
    (LEFT, "suspect", 9, LEFT, 5),
    (LEFT, "dead", 5, LEFT, 5),
    (LEFT, "dead", 9, LEFT, 5),
]


@pytest.mark.parametrize(("state", "kind", "inc", "want", "want_inc"), RULES)
def test_incarnation_rules(
    state: MemberState, kind: str, inc: int, want: MemberState, want_inc: int
) -> None:
    solo = solo_with(state)
    item: Msg = {"k": kind, "id": nid(1), "inc": inc}
    if kind == "alive":
        item["a"] = "10.0.0.1:7946"
    elif kind != "left":
        item["by"] = nid(8)
    before = len(solo.events)
    solo.recv({"k": "gossip", "g": [item]})
    assert solo.state(1) == (want, want_inc)
    changed = [e for e in solo.events[before:] if isinstance(e, MemberStateChanged)]
    assert bool(changed) == (want is not state)


def test_alive_with_higher_incarnation_updates_address() -> None:
    solo = solo_with(ALIVE)
    solo.recv({"k": "gossip", "g": [{"k": "alive", "id": nid(1), "inc": 5, "a": "10.9.9.9:1"}]})
    assert solo.m.member(nid(1)).addr == addr(1)  # type: ignore[union-attr]
    solo.recv({"k": "gossip", "g": [{"k": "alive", "id": nid(1), "inc": 6, "a": "[fd00::1]:7"}]})
    assert solo.m.member(nid(1)).addr == ("fd00::1", 7)  # type: ignore[union-attr]
    assert MemberAddressChanged(nid(1), ("fd00::1", 7)) in solo.events


def test_unknown_member_learned_from_alive_only() -> None:
    solo = Solo(members=1)
    solo.recv({"k": "gossip", "g": [{"k": "suspect", "id": nid(30), "inc": 3, "by": nid(1)}]})
    solo.recv({"k": "gossip", "g": [{"k": "dead", "id": nid(31), "inc": 3, "by": nid(1)}]})
    assert solo.state(30) is None and solo.state(31) is None
    solo.recv({"k": "gossip", "g": [{"k": "alive", "id": nid(30), "inc": 3, "a": "10.0.0.30:1"}]})
    assert solo.state(30) == (ALIVE, 3)
    assert MemberJoined(nid(30), ("10.0.0.30", 1)) in solo.events


# ------------------------------------------------------------------ leave and rejoin


def test_leave() -> None:
    net = Net(4)
    net.run(0.5)
    net.node(3).leave(net.now)
    t_leave = net.now
    assert net.node(3).incarnation == 1 and net.node(3).left
    net.run(2.0)
    assert all(net.view(i, 3) == (LEFT, 1) for i in range(3))
    assert not [p for t, s, _, p in net.log if s == addr(3) and p["k"] == "ping" and t > t_leave]
    # Old alive messages never resurrect it; a restart at a higher incarnation does.
    for inc in (0, 1):
        net.node(0).receive(
            {"k": "gossip", "g": [{"k": "alive", "id": nid(3), "inc": inc, "a": "10.0.0.3:7946"}]},
            addr(1),
            net.now,
        )
        assert net.view(0, 3) == (LEFT, 1)
    net.crash(3)
    net.spawn(3, incarnation=2)
    net.run(2.0)
    assert all(net.view(i, 3) == (ALIVE, 2) for i in range(3))


def test_rejoin_after_dead_with_higher_incarnation() -> None:
    net = Net(5, log=False)
    net.run(0.5)
    net.crash(4)
    net.run(20.0, until=lambda: all(net.state(i, 4) is DEAD for i in range(4)))
    net.spawn(4, incarnation=1)
    net.run(1.0)
    assert all(net.view(i, 4) == (ALIVE, 1) for i in range(4))
    assert all(
        MemberStateChanged(nid(4), DEAD, ALIVE, 1) in [e for _, e in net.events[addr(i)]]
        for i in range(4)
    )


def test_restart_with_stale_incarnation_refutes_via_gossip_to_the_dead() -> None:
    net = Net(5, log=False)
    net.run(0.5)
    net.crash(4)
    net.run(20.0, until=lambda: all(net.state(i, 4) is DEAD for i in range(4)))
    net.spawn(4, incarnation=0)  # forgot its incarnation; others keep it DEAD at 0
    net.run(5.0, until=lambda: all(net.view(i, 4) == (ALIVE, 1) for i in range(4)))
    assert all(net.view(i, 4) == (ALIVE, 1) for i in range(4))


def test_tombstones_expire() -> None:
    timing = replace(LOCAL, tombstone_ttl=5.0)
    net = Net(4, timing, log=False)
    net.run(0.5)
    net.crash(3)
    net.run(20.0, until=lambda: all(net.state(i, 3) is DEAD for i in range(3)))
    dead_since = [net.node(i).member(nid(3)).since for i in range(3)]  # type: ignore[union-attr]
    net.run(4.5)
    assert all(net.view(i, 3) == (DEAD, 0) for i in range(3))
    net.run(1.0)
    assert all(net.view(i, 3) is None for i in range(3))
    for i in range(3):
        removed = [t for t, e in net.events[addr(i)] if e == MemberRemoved(nid(3))]
        assert removed == [pytest.approx(dead_since[i] + 5.0, abs=0.01)]
    assert all(len(net.node(i).members()) == 3 for i in range(3))


def test_gossip_to_the_dead_for_a_while_never_to_the_left() -> None:
    timing = replace(LOCAL, gossip_nodes=5, gossip_to_dead=2.0)
    solo = Solo(members=3, timing=timing)
    solo.recv({"k": "gossip", "g": [{"k": "dead", "id": nid(2), "inc": 0, "by": nid(1)}]})
    solo.recv({"k": "gossip", "g": [{"k": "left", "id": nid(3), "inc": 0}]})

    def gossip_targets(since: int) -> set[Addr]:
        return {a for _, m, a in solo.sent[since:] if m["k"] == "gossip"}

    n = len(solo.sent)
    solo.m.broadcast({"k": "x", "v": 1}, b"x")
    solo.run(solo.now + 0.2)
    assert gossip_targets(n) == {addr(1), addr(2)}
    solo.run(NOW0 + 2.5)
    n = len(solo.sent)
    solo.m.broadcast({"k": "x", "v": 2}, b"x")
    solo.run(solo.now + 0.2)
    assert gossip_targets(n) == {addr(1)}


# ----------------------------------------------------------------------- piggyback


def test_opaque_items_reach_the_owner_and_are_not_regossiped() -> None:
    net = Net(3)
    net.run(0.3)
    rec = {"k": "rec", "r": [b"body", b"sig" * 20]}
    net.node(0).broadcast(rec, b"rec-0")
    net._after(addr(0))
    net.run(1.0)
    for i in (1, 2):  # once per retransmission that reached it: the owner deduplicates
        got = [e for _, e in net.events[addr(i)] if isinstance(e, Piggyback)]
        assert got and all(e == Piggyback(rec) for e in got)
    assert not [m for _, s, _, m in net.log if s != addr(0) and rec in items(m)]


def test_broadcast_rejects_bad_items() -> None:
    m = Solo(members=1).m
    with pytest.raises(ValueError):
        m.broadcast({"k": "alive", "id": b"x"}, b"k")
    with pytest.raises(ValueError):
        m.broadcast({"v": 1}, b"k")
    with pytest.raises(ValueError):
        m.broadcast({"k": "x", "blob": bytes(2000)}, b"k")


def test_piggyback_retransmit_limit_and_order() -> None:
    solo = Solo(members=10)  # n = 11: limit 4 * ceil(log10(12)) = 8
    limit = retransmit_limit(LOCAL.retransmit_mult, 11)
    assert limit == 8
    solo.m.broadcast({"k": "x", "v": "replaced"}, b"a")
    solo.m.broadcast({"k": "x", "v": "a"}, b"a")  # same key: invalidates the first
    solo.m.broadcast({"k": "x", "v": "b"}, b"b")
    solo.run(solo.now + LOCAL.probe_interval)
    first = next(m for _, m, _ in solo.sent if any(i.get("v") == "a" for i in items(m)))
    order = [i["v"] for i in items(first) if i["k"] == "x"]
    assert order == ["b", "a"]  # newest first among the least transmitted
    solo.run(solo.now + 10.0)
    counts = Counter(i["v"] for _, m, _ in solo.sent for i in items(m) if i["k"] == "x")
    assert counts == {"a": limit, "b": limit}
    assert "replaced" not in counts


def test_packets_never_exceed_max_packet() -> None:
    timing = replace(LOCAL, max_packet=600)
    solo = Solo(members=10, timing=timing)
    for i in range(40):
        solo.m.broadcast({"k": "x", "i": i, "pad": bytes(150)}, b"%d" % i)
    for i in range(1, 11):  # plus membership news about everyone
        suspect_at(solo, i, by=(i % 10) + 1)
    solo.recv({"k": "ping", "seq": 1, "to": nid(0), "from": nid(1)}, addr(1))
    solo.run(solo.now + 5.0)
    sizes = [len(wire.pack(m)) for _, m, _ in solo.sent]  # roundtrip() also asserts the bound
    assert max(sizes) <= 600 and max(sizes) > 400  # filled, not starved
    first = next(m for _, m, _ in solo.sent if any(i["k"] == "x" for i in items(m)))
    assert max(i["i"] for i in items(first) if i["k"] == "x") == 39  # newest first
    counts = Counter(i["i"] for _, m, _ in solo.sent for i in items(m) if i["k"] == "x")
    assert set(counts) == set(range(40))


# ------------------------------------------------------------------- local health


def probe_starts(solo: Solo, count: int, ack: Callable[[Msg], bool]) -> list[float]:
    times = []
    for _ in range(count):
        solo.run_to_ping(ack)
        times.append(solo.now)
    return times


def test_local_health_scales_probe_interval_and_timeout() -> None:
    # A long suspicion keeps the unanswering member probed for the whole test.
    timing = replace(LOCAL, awareness_max=4, suspicion_mult=100.0)
    solo = Solo(members=1, timing=timing)  # no relays: every failed probe costs 1
    starts = probe_starts(solo, 7, ack=lambda m: False)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    # score 0, 1, 2, 3, then capped at awareness_max - 1 (memberlist awareness)
    assert gaps == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert solo.m.local_health == 3
    # Probe timeout is scaled too: the ping_req / failure waits (score + 1) * timeout.
    solo2 = Solo(members=2, timing=timing)
    solo2.m.local_health = 2
    ping = solo2.run_to_ping(ack=lambda m: False)
    t_ping = solo2.now
    n = len(solo2.sent)
    solo2.run(t_ping + 3 * timing.probe_timeout - 0.001, ack=lambda m: False)
    assert "ping_req" not in solo2.kinds(n)
    solo2.run(t_ping + 3 * timing.probe_timeout, ack=lambda m: False)
    assert "ping_req" in solo2.kinds(n) and ping["to"] in {nid(1), nid(2)}
    # Successful probes bring the score back down, one step each.
    solo.m.local_health = 3
    starts = probe_starts(solo, 5, ack=lambda m: True)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([0.8, 0.6, 0.4, 0.2])  # each gap uses the score at its start
    assert solo.m.local_health == 0


def test_no_health_multiplier_without_lifeguard() -> None:
    solo = Solo(members=1, timing=replace(LOCAL, lifeguard=False, suspicion_mult=100.0))
    starts = probe_starts(solo, 5, ack=lambda m: False)
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == pytest.approx([0.2] * 4)
    assert solo.m.local_health == 0
    solo.recv({"k": "gossip", "g": [{"k": "suspect", "id": nid(0), "inc": 0, "by": nid(1)}]})
    assert solo.m.incarnation == 1 and solo.m.local_health == 0


# ---------------------------------------------------------------- malformed input

ID = nid(1)
MALFORMED: list[tuple[Any, str]] = [
    ([1, 2], "malformed"),
    ({}, "malformed"),
    ({"k": 3}, "malformed"),
    ({"k": "warp"}, "unexpected"),
    ({"k": "ping", "to": nid(0), "from": ID}, "malformed"),
    ({"k": "ping", "seq": -1, "to": nid(0), "from": ID}, "malformed"),
    ({"k": "ping", "seq": True, "to": nid(0), "from": ID}, "malformed"),
    ({"k": "ping", "seq": 2**32, "to": nid(0), "from": ID}, "malformed"),
    ({"k": "ping", "seq": 1.5, "to": nid(0), "from": ID}, "malformed"),
    ({"k": "ping", "seq": 1, "to": b"short", "from": ID}, "malformed"),
    ({"k": "ping", "seq": 1, "to": nid(0), "from": "text"}, "malformed"),
    ({"k": "ping", "seq": 1, "to": nid(5), "from": ID}, "unexpected"),
    ({"k": "ack", "seq": 1}, "malformed"),
    ({"k": "ack", "seq": 1, "from": ID}, "stale"),
    ({"k": "nack", "seq": 1, "from": ID}, "stale"),
    ({"k": "ping_req", "seq": 1, "to": ID, "from": ID}, "malformed"),
    ({"k": "ping_req", "seq": 1, "to": ID, "ta": "nohost", "from": ID}, "malformed"),
    ({"k": "ping_req", "seq": 1, "to": ID, "ta": "h:99999", "from": ID}, "malformed"),
    ({"k": "ping_req", "seq": 1, "to": ID, "ta": ":80", "from": ID}, "malformed"),
    ({"k": "ping_req", "seq": 1, "to": ID, "ta": 80, "from": ID}, "malformed"),
    ({"k": "ping_req", "seq": 1, "to": ID, "ta": "h" * 70 + ":1", "from": ID}, "malformed"),
    ({"k": "gossip", "g": "nope"}, "malformed"),
    ({"k": "gossip", "g": [{}] * 600}, "malformed"),
    ({"k": "gossip", "g": [7]}, "malformed"),
    ({"k": "gossip", "g": [{"k": 1}]}, "malformed"),
    ({"k": "gossip", "g": [{"k": "alive", "id": ID, "inc": 1}]}, "malformed"),
    ({"k": "gossip", "g": [{"k": "alive", "id": ID, "inc": -1, "a": "h:1"}]}, "malformed"),
    ({"k": "gossip", "g": [{"k": "alive", "id": ID, "inc": 9, "a": "h"}]}, "malformed"),
    ({"k": "gossip", "g": [{"k": "suspect", "id": ID, "inc": 1}]}, "malformed"),
    ({"k": "gossip", "g": [{"k": "dead", "id": ID, "inc": False, "by": ID}]}, "malformed"),
    ({"k": "gossip", "g": [{"k": "left", "id": b"", "inc": 1}]}, "malformed"),
    ({"k": "gossip", "g": [{"k": "left", "id": ID, "inc": 2**64}]}, "malformed"),
]


@pytest.mark.parametrize(("body", "reason"), MALFORMED)
def test_malformed_messages_are_counted_not_raised(body: Any, reason: str) -> None:
    solo = Solo(members=2)
    before = solo.m.members()
    solo.recv(body)
    assert solo.m.drops == {reason: 1}
    assert solo.m.members() == before
    assert not [m for m, _ in solo.m.messages_to_send() if m["k"] != "gossip"]


def test_one_bad_item_does_not_spoil_the_rest() -> None:
    solo = Solo(members=2)
    good = {"k": "suspect", "id": nid(1), "inc": 0, "by": nid(2)}
    solo.recv({"k": "gossip", "g": [{"k": "dead", "id": b"x"}, good, {"k": "rec", "r": 1}]})
    assert solo.m.drops == {"malformed": 1}
    assert solo.state(1) == (SUSPECT, 0)
    assert Piggyback({"k": "rec", "r": 1}) in solo.events


JUNK_KEYS = st.sampled_from(["k", "seq", "to", "from", "ta", "g", "id", "inc", "a", "by"])
JUNK_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(),
    st.sampled_from(["ping", "ack", "nack", "ping_req", "gossip", "alive", "suspect", "dead"]),
    st.sampled_from(["left", "10.0.0.1:7946", "[::1]:1", "x:0"]),
    st.text(max_size=6),
    st.sampled_from([nid(0), nid(1), nid(2)]),
    st.binary(max_size=20),
)
JUNK = st.recursive(
    JUNK_SCALARS,
    lambda c: (
        st.lists(c, max_size=4) | st.dictionaries(JUNK_KEYS | st.text(max_size=2), c, max_size=6)
    ),
    max_leaves=24,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(JUNK_KEYS, JUNK, max_size=6) | JUNK)
def test_fuzzed_messages_never_raise(body: Any) -> None:
    solo = Solo(members=2)
    solo.m.receive(body, addr(1), solo.now)
    solo.m.handle_timer(solo.now + 1.0)
    for msg, _ in solo.m.messages_to_send():
        wire.pack(msg)


# ----------------------------------------------------------------- state machine

SM_NODES = 4
SM_TIMING = replace(LOCAL, tombstone_ttl=1e9, gossip_to_dead=1.0)


class MembershipMachine(RuleBasedStateMachine):
    """Random delivery orders, duplicates, losses, partitions, timers, crashes, restarts
    and leaves; no exception may escape and incarnations only move forward."""

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW0
        self.rng = random.Random(0)
        self.nodes: list[Membership | None] = [None] * SM_NODES
        self.gen = [0] * SM_NODES
        self.max_inc = [0] * SM_NODES
        self.flight: list[tuple[Addr, Addr, bytes]] = []
        self.isolated: set[Addr] = set()
        self.seen: dict[tuple[int, int, bytes], int] = {}
        self.left_at: dict[tuple[int, int, bytes], int] = {}
        for i in range(SM_NODES):
            self._start(i, 0)

    def _start(self, i: int, inc: int) -> None:
        m = Membership(nid(i), addr(i), SM_TIMING, random.Random(self.rng.random()), self.now, inc)
        for j, other in enumerate(self.nodes):
            if other is not None and j != i:
                m.add_member(nid(j), addr(j), other.incarnation, self.now)
                other.add_member(nid(i), addr(i), inc, self.now)
        self.nodes[i] = m
        self.gen[i] += 1

    def _collect(self) -> None:
        for i, m in enumerate(self.nodes):
            if m is None:
                continue
            for msg, dst in m.messages_to_send():
                data = wire.pack(msg)
                assert len(data) <= SM_TIMING.max_packet
                if addr(i) in self.isolated or dst in self.isolated:
                    continue
                self.flight.append((addr(i), dst, data))
            while m.next_event() is not None:
                pass
        del self.flight[:-300]

    def _node_at(self, a: Addr) -> Membership | None:
        for i, m in enumerate(self.nodes):
            if m is not None and addr(i) == a:
                return m
        return None

    def _deliver(self, j: int, keep: bool) -> None:
        src, dst, data = self.flight[j] if keep else self.flight.pop(j)
        node = self._node_at(dst)
        if node is not None:
            node.receive(wire.unpack(data), src, self.now)

    @rule(i=st.integers(0, 10**6), dup=st.booleans())
    def deliver(self, i: int, dup: bool) -> None:
        if self.flight:
            self._deliver(i % len(self.flight), dup)
            self._collect()

    @rule(i=st.integers(0, 10**6))
    def lose(self, i: int) -> None:
        if self.flight:
            self.flight.pop(i % len(self.flight))

    @rule(dt=st.floats(0.0, 1.5))
    def advance(self, dt: float) -> None:
        self.now += dt
        for m in self.nodes:
            t = None if m is None else m.get_timer()
            if m is not None and t is not None and t <= self.now:
                m.handle_timer(self.now)
        self._collect()

    @rule(i=st.integers(0, SM_NODES - 1))
    def poke(self, i: int) -> None:
        m = self.nodes[i]
        if m is not None:
            m.handle_timer(self.now)  # early or late: must be harmless
            self._collect()

    @rule(
        seed=st.integers(0, 2**16),
        duration=st.floats(0.05, 3.0),
        loss=st.sampled_from([0, 0.1, 0.6]),
    )
    def run(self, seed: int, duration: float, loss: float) -> None:
        """Let the cluster run in order for a while, losing a fraction of messages."""
        rng = random.Random(seed)
        end = self.now + duration
        while self.now < end:
            self.now += 0.01
            flight, self.flight = self.flight, []
            for src, dst, data in flight:
                node = self._node_at(dst)
                if node is not None and rng.random() >= loss:
                    node.receive(wire.unpack(data), src, self.now)
            for m in self.nodes:
                t = None if m is None else m.get_timer()
                if m is not None and t is not None and t <= self.now:
                    m.handle_timer(self.now)
            self._collect()

    @rule(i=st.integers(0, SM_NODES - 1))
    def crash(self, i: int) -> None:
        m = self.nodes[i]
        if m is not None:
            self.max_inc[i] = max(self.max_inc[i], m.incarnation)
            self.nodes[i] = None

    @rule(i=st.integers(0, SM_NODES - 1))
    def restart(self, i: int) -> None:
        if self.nodes[i] is None:
            self.max_inc[i] += 1
            self._start(i, self.max_inc[i])
            self._collect()

    @rule(i=st.integers(0, SM_NODES - 1))
    def leave(self, i: int) -> None:
        m = self.nodes[i]
        if m is not None:
            m.leave(self.now)
            self.max_inc[i] = max(self.max_inc[i], m.incarnation)
            self._collect()

    @rule(i=st.integers(0, SM_NODES - 1))
    def partition(self, i: int) -> None:
        self.isolated ^= {addr(i)}

    @rule(i=st.integers(0, SM_NODES - 1), body=st.dictionaries(JUNK_KEYS, JUNK, max_size=6))
    def garbage(self, i: int, body: Msg) -> None:
        m = self.nodes[i]
        if m is not None:
            m.receive(body, addr((i + 1) % SM_NODES), self.now)
            self._collect()

    @invariant()
    def incarnations_only_grow(self) -> None:
        for i, m in enumerate(self.nodes):
            if m is None:
                continue
            self.max_inc[i] = max(self.max_inc[i], m.incarnation)
            for v in m.members():
                key = (i, self.gen[i], v.node_id)
                assert v.incarnation >= self.seen.get(key, 0), (i, v)
                self.seen[key] = v.incarnation
                if v.state is LEFT:
                    self.left_at[key] = max(self.left_at.get(key, 0), v.incarnation)
                elif v.state is ALIVE and key in self.left_at:
                    assert v.incarnation > self.left_at[key], (i, v)


MembershipMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMembershipMachine = MembershipMachine.TestCase


# ---------------------------------------------------------------------- convergence


def test_fifty_nodes_detect_a_crash_without_false_positives() -> None:
    """50 nodes, 1% loss, one crash: everyone marks it DEAD within the bound the formulas
    give, and no live node is ever declared DEAD."""
    n, timing = 50, LOCAL
    net = Net(n, timing, seed=7, loss=0.01, log=False)
    net.run(2.0)
    victim = 17
    net.crash(victim)
    t_crash = net.now
    # Bound: the victim is probed at least once per round of (n - 1) periods by every node
    # (a probe lasts one period; allow the health multiplier to double it), then the
    # suspicion runs at most max = suspicion_max_mult * min, plus dissemination slack.
    _, high = suspicion_bounds(timing, n)
    bound = 2 * (n - 1) * timing.probe_interval + high + 2.0
    others = [i for i in range(n) if i != victim]

    def all_dead() -> bool:
        return all(net.state(i, victim) is DEAD for i in others)

    net.run(bound, until=all_dead)
    assert all_dead(), [net.view(i, victim) for i in others]
    detected = net.now - t_crash
    assert detected <= bound
    net.run(3.0)
    false_dead = [
        (a, e)
        for a, evs in net.events.items()
        for _, e in evs
        if isinstance(e, MemberStateChanged) and e.new is DEAD and e.node_id != nid(victim)
    ]
    assert false_dead == []
    assert all(
        net.view(i, j) == (ALIVE, net.node(j).incarnation) for i in others for j in others if i != j
    )


def test_add_members_builds_the_view_add_member_builds() -> None:
    """The bulk form (restored views, the simulator's bootstrap) leaves the same members,
    states, incarnations and probe targets (in another random order), and the same
    events when asked for them."""
    one, bulk, quiet = (
        Membership(nid(0), addr(0), LOCAL, random.Random(1), NOW0, learn_unknown=False)
        for _ in range(3)
    )
    # Something already known or heard of goes the add_member way inside the bulk call.
    for m in (one, bulk, quiet):
        m.add_member(nid(3), addr(3), 4, NOW0)
        m.receive({"k": "gossip", "g": [{"k": "suspect", "id": nid(5), "inc": 2, "by": nid(3)}]},
                  addr(3), NOW0)  # fmt: skip
        m.next_event()
    todo = [(nid(i), addr(i), i % 3) for i in range(0, 40)]
    for x in todo:
        one.add_member(*x, NOW0)
    bulk.add_members(todo, NOW0)
    quiet.add_members(todo, NOW0, events=False)

    def view(m: Membership) -> list[tuple[bytes, MemberState, int]]:
        return sorted((v.node_id, v.state, v.incarnation) for v in m.members())

    def drained(m: Membership) -> list[Event]:
        return list(iter(m.next_event, None))

    assert view(one) == view(bulk) == view(quiet)
    assert view(one)[5][1:] == (SUSPECT, 2)  # the pending suspicion applied
    ev_one, ev_bulk = drained(one), drained(bulk)
    assert sorted(map(repr, ev_one)) == sorted(map(repr, ev_bulk))
    # Quiet: only what add_member reports for the one that was pending.
    assert [type(e) for e in drained(quiet)] == [MemberJoined, MemberStateChanged]
    for m in (one, bulk, quiet):
        assert sorted(m._probe_list[m._probe_idx :]) == sorted(nid(i) for i in range(1, 40))
    with pytest.raises(ValueError, match="bytes"):
        bulk.add_members([(b"short", addr(1), 0)], NOW0)


def test_shared_view_builds_the_view_tuples_build_and_stays_shared_until_changed() -> None:
    """A SharedView (the simulator's bootstrap) gives a core the same member table, probe
    order, events, digests and push-pull entries as the same members given as tuples,
    and a core that changes a member copies that entry: other cores holding the same
    view do not see the change."""
    members = [(nid(i), addr(i), i % 2) for i in range(40)]
    view = SharedView(members, NOW0)
    cores = {
        name: Membership(nid(0), addr(0), LOCAL, random.Random(7), NOW0)
        for name in ("tuples", "shared", "bystander")
    }
    cores["tuples"].add_members(members, NOW0)
    cores["shared"].add_members(view, NOW0)
    cores["bystander"].add_members(view, NOW0, events=False)

    def snapshot(m: Membership) -> list[Any]:
        m.set_version(nid(6), 3)
        m.push_pull(NOW0 + 0.5, addr(9))
        # A partner whose digest matches nothing: the core answers with every entry.
        out = m.messages_to_send()
        nb = out[-1][0]["nb"]
        digest = {"k": "pp", "ph": 0, "sid": 1, "from": nid(9), "nb": nb, "h": b"\0" * 4 * nb}
        m.receive(digest, addr(9), NOW0 + 0.5)
        out += m.messages_to_send()
        return [m.members(), m._probe_list, out, list(iter(m.next_event, None))]

    before = snapshot(cores["tuples"])
    assert snapshot(cores["shared"]) == before
    news = [
        {"k": "suspect", "id": nid(3), "inc": 1, "by": nid(9)},
        {"k": "dead", "id": nid(4), "inc": 0, "by": nid(9)},
        {"k": "alive", "id": nid(5), "inc": 4, "a": "10.0.0.55:7946"},
        {"k": "left", "id": nid(8), "inc": 0},
    ]
    for name in ("tuples", "shared"):
        cores[name].receive({"k": "gossip", "g": news}, addr(9), NOW0 + 1)
    after = snapshot(cores["tuples"])
    assert after != before
    assert snapshot(cores["shared"]) == after
    # The bystander still sees every member ALIVE at its first incarnation.
    assert [(v.state, v.incarnation) for v in cores["bystander"].members()[1:]] == [
        (ALIVE, i % 2) for i in range(1, 40)
    ]
    # The bag positions are the module's shared ints, not one new int per entry (only
    # -5..256 are shared by CPython itself).
    big = Membership(nid(0), addr(0), LOCAL, random.Random(7), NOW0)
    big.add_members(
        SharedView([(i.to_bytes(16, "big"), addr(1), 0) for i in range(1, 3000)], NOW0), NOW0
    )
    bag = big._alive
    assert all(bag.pos[x] is membership._POSITIONS[i] for i, x in enumerate(bag.items))
    shared_entry = cores["bystander"]._members[nid(3)]
    with pytest.raises(AttributeError, match="read-only"):
        shared_entry.inc = 5
    # A core that already knows members takes the view member by member.
    known = Membership(nid(0), addr(0), LOCAL, random.Random(7), NOW0)
    known.add_member(nid(3), addr(3), 9, NOW0)
    known.add_members(view, NOW0)
    three = known.member(nid(3))
    assert three is not None and (three.state, three.incarnation) == (ALIVE, 9)
    assert len(known.members()) == 40
    with pytest.raises(ValueError, match="time"):
        known.add_members(view, NOW0 + 1)
    with pytest.raises(ValueError, match="bytes"):
        known.add_members(SharedView([(b"short", addr(1), 0)], NOW0), NOW0)
    with pytest.raises(ValueError, match="once"):
        SharedView([(nid(1), addr(1), 0)] * 2, NOW0)


def test_shuffle_draws_what_random_shuffle_draws() -> None:
    """The core's faster shuffle permutes exactly as ``random.Random.shuffle`` and leaves
    the generator in the same state, so runs of the simulator stay reproducible."""

    class Sub(random.Random):
        pass

    for seed in range(20):
        for n in (0, 1, 2, 3, 4, 5, 8, 9, 100, 1025):
            for cls in (random.Random, Sub):
                a, b = list(range(n)), list(range(n))
                ra, rb = cls(seed), cls(seed)
                ra.shuffle(a)
                shuffle(rb, b)
                assert a == b
                assert ra.random() == rb.random()


def test_first_push_pull_is_staggered_over_the_scaled_interval() -> None:
    """Nodes started together must not all push-pull within the base interval and then
    in lockstep every scaled interval: the first exchange falls uniformly within the
    interval scaled for the cluster size (memberlist's pushPullTrigger stagger)."""
    n = 200
    lan = PROFILES["lan"]
    scaled = push_pull_scale(lan.push_pull_interval, n)
    assert scaled == 4 * lan.push_pull_interval
    firsts = []
    for seed in range(40):
        m = Membership(nid(0), addr(0), lan, random.Random(seed), NOW0)
        m.add_members(
            [(bytes([1 + i // 256, i % 256]) * 8, addr(1), 0) for i in range(n - 1)], NOW0
        )
        now = NOW0
        for _ in range(10_000):
            t = m.get_timer()
            assert t is not None
            now = t
            m.handle_timer(now)
            out = m.messages_to_send()
            for msg, to in out:  # answer probes so nobody is suspected meanwhile
                if msg["k"] == "ping":
                    m.receive({"k": "ack", "seq": msg["seq"], "from": msg["to"]}, to, now)
            if any(msg["k"] == "pp" for msg, _ in out):
                break
        else:
            raise AssertionError("no push-pull")
        firsts.append(now - NOW0)
    assert max(firsts) < scaled
    # Spread over the scaled interval, not bunched in the first 30 s: a quarter would
    # be, on average; all but one would be under the old stagger.
    assert sum(1 for f in firsts if f > lan.push_pull_interval) >= 20
