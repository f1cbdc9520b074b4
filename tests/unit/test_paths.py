"""Gossip path choice (meshd/core/paths.py): overlay while the tunnel answers, bootstrap
channel as the fallback. Fake clock throughout; the node-level tests route overlay
addresses on the deterministic test network and break tunnels to check that a broken
tunnel never costs a false suspicion."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from meshd.core.membership import MemberState, MemberStateChanged
from meshd.core.node import Node
from meshd.core.paths import GossipPaths, Observed, Path, PathChanged, PathPolicy
from meshd.core.wire import Addr

from .corenet import Net
from .test_core_join import addr
from .test_node_gossip import cluster

NOW = 1_790_000_000.0
A = b"a" * 16
B = b"b" * 16
GOSSIP_A: Addr = ("192.0.2.1", 7946)
OVER_A: Addr = ("10.200.0.1", 7946)
POLICY = PathPolicy(answer_timeout=0.25, holddown=10.0, holddown_max=160.0)


def paths() -> GossipPaths:
    p = GossipPaths(POLICY)
    p.learn(A, GOSSIP_A, OVER_A, ("fd00:200::1",))
    p.learn(B, ("192.0.2.2", 7946), ("10.200.0.2", 7946))
    return p


def events(p: GossipPaths) -> list[PathChanged]:
    out = []
    while (ev := p.next_event()) is not None:
        out.append(ev)
    return out


def test_policy_from_probe_timers_and_validation() -> None:
    pol = PathPolicy.for_probes(1.0, 0.5)
    assert (pol.answer_timeout, pol.holddown, pol.holddown_max) == (0.25, 10.0, 160.0)
    with pytest.raises(ValueError):
        PathPolicy(0, 1, 1)
    with pytest.raises(ValueError):
        PathPolicy(1, 10, 5)


def test_bootstrap_channel_until_a_tunnel_is_up() -> None:
    p = paths()
    assert p.outbound(b"x", GOSSIP_A, NOW, probe=True) == GOSSIP_A
    assert p.outbound(b"x", ("192.0.2.99", 1), NOW, probe=True) == ("192.0.2.99", 1)  # joiner
    assert p.get_timer() is None  # nothing waits on the bootstrap channel
    p.tunnel(A, "192.0.2.1:51820", None, NOW)  # a peer without a handshake: not up
    assert p.outbound(b"x", GOSSIP_A, NOW, probe=False) == GOSSIP_A
    p.tunnel(A, "192.0.2.1:51820", NOW - 5, NOW)
    assert p.outbound(b"x", GOSSIP_A, NOW, probe=False) == OVER_A
    assert events(p) == [PathChanged(A, Path.OVERLAY, "tunnel up")]
    d = p.describe(NOW)
    assert d["tx"] == {"overlay": 1, "underlay": 3} and d["members_on_overlay"] == 1
    # a handshake older than WireGuard's REJECT_AFTER_TIME: the tunnel is stale
    later = NOW - 5 + POLICY.fresh
    assert p.outbound(b"x", GOSSIP_A, later, probe=False) == GOSSIP_A
    assert events(p) == [PathChanged(A, Path.UNDERLAY, "stale")]


def test_answered_probe_keeps_the_overlay() -> None:
    p = paths()
    p.tunnel(A, "192.0.2.1:51820", NOW, NOW)
    assert p.outbound(b"ping", GOSSIP_A, NOW, probe=True) == OVER_A
    assert p.get_timer() == NOW + POLICY.answer_timeout
    assert p.inbound(OVER_A, NOW + 0.01) == GOSSIP_A  # the ack, credited and translated
    assert p.get_timer() is None
    assert p.handle_timer(NOW + 1) == []
    assert p.path_of(A) is Path.OVERLAY
    d = p.describe(NOW)
    assert d["rx"] == {"overlay": 1, "underlay": 0} and d["fallbacks"] == 0


def test_an_ack_on_the_bootstrap_channel_also_answers_the_probe() -> None:
    """The member may answer on the bootstrap channel (it chooses its own path): the ack's
    sequence number still proves that our probe went through the tunnel."""
    p = paths()
    p.tunnel(A, "192.0.2.1:51820", NOW, NOW)
    p.tunnel(B, "192.0.2.2:51820", NOW, NOW)
    assert p.outbound(b"ping", GOSSIP_A, NOW, probe=True, seq=41) == OVER_A
    assert p.outbound(b"ping", ("192.0.2.2", 7946), NOW, probe=True, seq=42) != GOSSIP_A
    assert p.inbound(GOSSIP_A, NOW + 0.01) == GOSSIP_A  # unrelated traffic: no answer
    p.answered(99)  # an ack for something else
    p.answered(41)
    assert p.handle_timer(NOW + 1) == [(b"ping", ("192.0.2.2", 7946))]  # only B fell back
    assert p.path_of(A) is Path.OVERLAY and p.path_of(B) is Path.UNDERLAY
    p.answered(42)  # late: the hold-down stays
    assert p.outbound(b"x", ("192.0.2.2", 7946), NOW + 2, probe=False) == ("192.0.2.2", 7946)


def test_answers_go_back_the_way_the_question_came() -> None:
    """A member that fell back pings us over the bootstrap channel: our ack goes back
    there too, even though our own overlay path to it looks fine (it may not be)."""
    p = paths()
    p.tunnel(A, "192.0.2.1:51820", NOW, NOW)
    p.inbound(GOSSIP_A, NOW)  # its ping came over the bootstrap channel
    assert p.outbound(b"ack", GOSSIP_A, NOW, probe=False, reply=True) == GOSSIP_A
    assert p.outbound(b"gossip", GOSSIP_A, NOW, probe=False) == OVER_A  # not an answer
    p.inbound(OVER_A, NOW + 1)  # now it talks through the tunnel
    assert p.outbound(b"ack", GOSSIP_A, NOW + 1, probe=False, reply=True) == OVER_A


def test_inbound_from_every_overlay_form_is_credited() -> None:
    p = paths()
    for host in ("10.200.0.1", "fd00:200::1", "::ffff:10.200.0.1"):
        assert p.inbound((host, 40000), NOW) == GOSSIP_A
    assert p.inbound(("192.0.2.1", 7946), NOW) == ("192.0.2.1", 7946)
    assert p.inbound(("10.200.0.77", 7946), NOW) == ("10.200.0.77", 7946)  # not a member
    assert p.describe(NOW)["rx"] == {"overlay": 3, "underlay": 2}
    # overlay traffic from a member is itself evidence of a live tunnel
    assert p.outbound(b"x", GOSSIP_A, NOW + 1, probe=False) == OVER_A


def test_unanswered_probe_falls_back_resends_and_holds_down() -> None:
    p = paths()
    p.tunnel(A, "192.0.2.1:51820", NOW, NOW)
    p.outbound(b"ping1", GOSSIP_A, NOW, probe=True)
    p.outbound(b"gossip", GOSSIP_A, NOW + 0.05, probe=False)  # not resent: no answer due
    p.outbound(b"ping2", GOSSIP_A, NOW + 0.1, probe=True)
    assert p.handle_timer(NOW + 0.2) == []  # not yet
    resend = p.handle_timer(NOW + 0.25)
    assert resend == [(b"ping1", GOSSIP_A), (b"ping2", GOSSIP_A)]
    assert events(p)[-1] == PathChanged(A, Path.UNDERLAY, "no answer")
    assert p.holddown_until(A) == NOW + 0.25 + 10
    assert p.outbound(b"x", GOSSIP_A, NOW + 5, probe=True) == GOSSIP_A  # held down
    assert p.get_timer() is None
    # after the hold-down the overlay is tried again; a second failure doubles it
    t = NOW + 10.25
    assert p.outbound(b"ping3", GOSSIP_A, t, probe=True) == OVER_A
    assert p.handle_timer(t + 0.25) == [(b"ping3", GOSSIP_A)]
    assert p.holddown_until(A) == t + 0.25 + 20
    # an answered probe resets the backoff
    t2 = t + 20.25
    p.outbound(b"ping4", GOSSIP_A, t2, probe=True)
    p.inbound(OVER_A, t2 + 0.01)
    p.outbound(b"ping5", GOSSIP_A, t2 + 1, probe=True)
    p.handle_timer(t2 + 1.25)
    assert p.holddown_until(A) == t2 + 1.25 + 10
    d = p.describe(t2 + 2)
    assert d["fallbacks"] == 3 and d["resent"] == 4 and d["members_held_down"] == 1


def test_holddown_is_capped_and_resends_are_bounded() -> None:
    p = paths()
    t = NOW
    for _ in range(8):
        p.tunnel(A, "192.0.2.1:51820", t, t)
        for i in range(10):
            assert p.outbound(b"p%d" % i, GOSSIP_A, t, probe=True) == OVER_A
        assert len(p.handle_timer(t + 0.25)) == POLICY.resend_limit
        until = p.holddown_until(A)
        assert until is not None and until - (t + 0.25) <= POLICY.holddown_max
        t = until
    assert p.holddown_until(A) == pytest.approx(t)
    assert until - (t - POLICY.holddown_max) == pytest.approx(POLICY.holddown_max)


def test_a_rebuilt_tunnel_ends_the_holddown() -> None:
    p = paths()
    p.tunnel(A, "192.0.2.1:51820", NOW, NOW)
    p.outbound(b"ping", GOSSIP_A, NOW, probe=True)
    p.handle_timer(NOW + 0.25)
    p.tunnel(A, "192.0.2.1:51820", NOW, NOW + 2)  # same old handshake: still held down
    assert p.outbound(b"x", GOSSIP_A, NOW + 2, probe=False) == GOSSIP_A
    p.tunnel(A, "192.0.2.1:51820", NOW + 3, NOW + 3)  # a new handshake
    assert p.outbound(b"x", GOSSIP_A, NOW + 3, probe=False) == OVER_A


def test_observed_endpoint_and_member_down() -> None:
    p = paths()
    assert p.observed(A) is None
    assert p.tunnel(A, "198.51.100.7:40001", NOW, NOW) is True
    assert p.tunnel(A, "198.51.100.7:40001", NOW + 120, NOW + 121) is False
    assert p.observed(A) == Observed("198.51.100.7:40001", NOW + 120, NOW + 121)
    assert p.tunnel(A, "198.51.100.7:40999", NOW + 130, NOW + 131) is True  # NAT rebinding
    assert p.tunnel(bytes(16), "1.2.3.4:5", NOW, NOW) is False  # unknown member
    p.outbound(b"x", GOSSIP_A, NOW + 131, probe=True)
    p.down(A)
    assert p.get_timer() is None
    assert p.outbound(b"x", GOSSIP_A, NOW + 132, probe=False) == GOSSIP_A
    p.forget(A)
    assert p.observed(A) is None and p.inbound(OVER_A, NOW) == OVER_A


# --------------------------------------------------------------- nodes on a test network


class OverlayNet(Net):
    """The test network plus WireGuard as far as gossip sees it: a datagram to a member's
    overlay address arrives from the sender's overlay address, unless that tunnel is
    broken (then it is lost, as in a deleted peer or interface)."""

    broken: set[frozenset[Addr]]

    def overlay_of(self, node: Node) -> Addr:
        return (node.addresses()[0], 7946)

    def _deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        owners = {self.overlay_of(n): a for a, n in self.nodes.items()}
        if dst in owners:
            real = owners[dst]
            self.sent.append((src, dst, data))
            if frozenset({src, real}) in getattr(self, "broken", set()):
                return
            self.nodes[real].receive(data, self.overlay_of(self.nodes[src]), self.now)
            return
        super()._deliver(src, dst, data)

    def report_tunnels(self) -> None:
        """Every node's data plane reports a fresh handshake with every unbroken peer."""
        for a, node in self.nodes.items():
            for b, other in self.nodes.items():
                if a != b and frozenset({a, b}) not in getattr(self, "broken", set()):
                    node.tunnel_report(other.sign.node_id, f"{b[0]}:51820", self.now, self.now)

    def run(self, seconds: float, report_every: float = 5.0) -> None:
        end = self.now + seconds
        while self.now < end:
            self.report_tunnels()
            self.advance(min(report_every, end - self.now))


def _cluster(n: int) -> tuple[OverlayNet, list[Node]]:
    net = OverlayNet()
    net.broken = set()
    _, nodes = cluster(n, net)
    net.advance(3.0)
    return net, nodes


def _false_alarms(net: Net) -> list[MemberStateChanged]:
    return [
        ev
        for evs in net.events.values()
        for ev in evs
        if isinstance(ev, MemberStateChanged) and ev.new in (MemberState.SUSPECT, MemberState.DEAD)
    ]


def _tx(nodes: list[Node]) -> dict[str, int]:
    out = {"overlay": 0, "underlay": 0}
    for n in nodes:
        for k, v in n.paths.stats.tx.items():
            out[k] += v
    return out


def test_gossip_moves_to_the_overlay_once_tunnels_are_up() -> None:
    net, nodes = _cluster(4)
    before = _tx(nodes)
    net.run(30.0)
    after = _tx(nodes)
    overlay = after["overlay"] - before["overlay"]
    underlay = after["underlay"] - before["underlay"]
    assert overlay > 0 and overlay / (overlay + underlay) > 0.95, (overlay, underlay)
    assert sum(n.paths.stats.fallbacks for n in nodes) == 0
    assert all(
        n.paths.path_of(m.sign.node_id) is Path.OVERLAY for n in nodes for m in nodes if m is not n
    )
    assert not _false_alarms(net)
    # overlay sources never leak into the membership view
    for n in nodes:
        for m in n.swim.members():
            assert IPv4Address(m.addr[0]) not in n.plan.cidr4


def test_broken_tunnels_fall_back_without_false_suspicion() -> None:
    net, nodes = _cluster(4)
    net.run(10.0)
    victim = addr(3)
    v = net.nodes[victim]
    # the victim's interface is gone: every tunnel to it drops traffic, while the
    # others' last handshakes still look fresh for up to 180 s
    net.broken = {frozenset({victim, a}) for a in net.nodes if a != victim}
    for a, n in net.nodes.items():  # stale reports keep saying "fresh handshake"
        if a != victim:
            n.tunnel_report(v.sign.node_id, f"{victim[0]}:51820", net.now - 1, net.now)
    fb0 = sum(n.paths.stats.fallbacks for n in nodes)
    net.advance(60.0)
    assert not _false_alarms(net), _false_alarms(net)
    assert sum(n.paths.stats.fallbacks for n in nodes) > fb0
    for a, n in net.nodes.items():
        if a != victim:
            assert n.paths.path_of(v.sign.node_id) is Path.UNDERLAY
            state = n.member_state(v.sign.node_id)
            assert state is not None and state[0] is MemberState.ALIVE
    # the others still talk to each other over the overlay
    assert nodes[0].paths.path_of(nodes[1].sign.node_id) is Path.OVERLAY
    # repaired: a new handshake ends the hold-down and gossip returns to the overlay
    net.broken = set()
    net.run(10.0)
    for a, n in net.nodes.items():
        if a != victim:
            assert n.paths.path_of(v.sign.node_id) is Path.OVERLAY
    assert not _false_alarms(net)


def test_dead_member_is_not_gossiped_to_over_its_tunnel() -> None:
    net, nodes = _cluster(3)
    net.run(10.0)
    gone = nodes[2]
    del net.nodes[addr(3)]  # crashed: nothing answers on either path
    net.run(60.0)
    assert nodes[0].member_state(gone.sign.node_id) is not None
    state = nodes[0].member_state(gone.sign.node_id)
    assert state is not None and state[0] is MemberState.DEAD
    assert nodes[0].paths.path_of(gone.sign.node_id) is Path.UNDERLAY


def test_observed_endpoint_is_kept_by_the_core() -> None:
    net, nodes = _cluster(2)
    other = nodes[1].sign.node_id
    assert nodes[0].observed_endpoint(other) is None
    assert nodes[0].tunnel_report(other, "198.51.100.9:40000", net.now - 3, net.now)
    assert nodes[0].observed_endpoint(other) == Observed("198.51.100.9:40000", net.now - 3, net.now)


def test_meshd_peers_shows_the_gossip_path() -> None:
    from meshd.cli import _peers_table

    row = {
        "name": "h2",
        "addresses": {"ipv4": "10.200.0.2", "ipv6": "fd00:200::2"},
        "state": "alive",
        "connection": "direct",
        "wg_endpoint": "192.0.2.2:51822",
        "endpoints": ["192.0.2.2:7946"],
        "last_handshake": None,
        "gossip_path": "overlay",
    }
    header, line = _peers_table([row]).splitlines()
    assert header.split()[-1] == "GOSSIP" and line.split()[-1] == "overlay"
    assert _peers_table([{**row, "gossip_path": None}]).splitlines()[1].split()[-1] == "-"
