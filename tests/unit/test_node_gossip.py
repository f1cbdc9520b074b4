"""Membership inside the node: records as the only way in, gossip, push-pull, persistence.

Real node cores (real signatures) on the in-memory network of ``corenet`` with a
fake clock and the LAN profile the agent uses by default.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pytest

from meshd import persist
from meshd.cli import CliError, Options, resolve_timing
from meshd.core import wire
from meshd.core.membership import PROFILES, MemberState, suspicion_bounds
from meshd.core.node import GOSSIP_MTU, Node
from meshd.core.pull import RECORD_WANT_RETRY, RECORD_WANT_TRIES
from meshd.core.records import sign_record
from meshd.core.wire import DropReason
from meshd.state import DataDir

from .corenet import Net
from .test_core_join import LEADER, addr, token

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)


def cluster(n: int, net: Net | None = None) -> tuple[Net, list[Node]]:
    """A leader and ``n - 1`` joined members on ``net`` (a fresh test network by default)."""
    net = net if net is not None else Net()
    leader = net.init("leader", LEADER)
    nodes = [leader]
    for i in range(2, n + 1):
        node = net.join(f"n{i}", addr(i), token(net, leader), [LEADER])
        assert isinstance(node, Node), node
        nodes.append(node)
    return net, nodes


def state(viewer: Node, subject: Node) -> MemberState | None:
    st = viewer.member_state(subject.sign.node_id)
    return None if st is None else st[0]


def swim_packet(sender: Node, msg: dict[str, object]) -> bytes:
    return sender.keyring.seal(wire.pack({"t": "swim", "m": msg}), sender._rand)


def test_every_member_becomes_alive_everywhere() -> None:
    net, nodes = cluster(5)
    net.advance(3.0)
    for v in nodes:
        assert len(v.store) == 5
        assert all(state(v, s) is ALIVE for s in nodes if s is not v)


def test_gossip_datagrams_fit_the_overlay_mtu() -> None:
    net, _ = cluster(5)
    net.sent.clear()
    net.advance(40.0)  # probes, gossip with records, a push-pull round
    sizes = [len(d) for _, _, d in net.sent]
    assert sizes and max(sizes) <= GOSSIP_MTU


def test_a_crashed_member_is_declared_dead_by_all_and_nobody_else() -> None:
    net, nodes = cluster(5)
    net.advance(2.0)
    victim = nodes[3]
    del net.nodes[addr(4)]
    _, high = suspicion_bounds(PROFILES["lan"], 5)
    net.advance(high + 5.0)
    others = [v for v in nodes if v is not victim]
    assert all(state(v, victim) is DEAD for v in others)
    assert all(state(v, s) is ALIVE for v in others for s in others if s is not v)


def test_alive_gossip_about_an_unknown_node_adds_nobody() -> None:
    net, nodes = cluster(2)
    a, b = nodes
    stranger = bytes(range(16))
    pkt = swim_packet(b, {"k": "gossip", "g": [{"k": "alive", "id": stranger, "inc": 9,
                                                 "a": "192.0.2.99:7946"}]})  # fmt: skip
    a.receive(pkt, addr(2), net.now)
    assert a.member_state(stranger) is None and a.store.get(stranger) is None


def test_a_forged_record_is_dropped_and_never_announced() -> None:
    net, nodes = cluster(3)
    a, b, _ = nodes
    forged = sign_record(
        b.sign, seq=99, name="evil", hostname=None, wg_key=b.wg.public,
        endpoints=["192.0.2.66:7946"], now=net.now, version="x", admission=a._admission_blob,
    )  # fmt: skip
    # A pulled record arrives as a push (the answer to an ``rq``).
    pkt = b.keyring.seal(
        wire.pack({"t": "push", "recs": [forged.to_wire()], "leases": [], "ack": False}), b._rand
    )
    before = a.drops.get(DropReason.BAD_SIGNATURE, 0)
    a.receive(pkt, addr(2), net.now)
    assert a.drops.get(DropReason.BAD_SIGNATURE, 0) == before + 1
    assert a.store.get(a.sign.node_id).seq != 99  # type: ignore[union-attr]
    assert all(r.name != "evil" for r in a.store)
    items = []
    for k in range(50):  # ten seconds of a's gossip and probes, taken before sealing
        a.swim.handle_timer(net.now + 0.2 * k)
        items += [it for msg, _ in a.swim.messages_to_send() for it in msg.get("g", [])]
    assert items and not [it for it in items if it.get("k") == "v" and it.get("s") == 99]


def test_an_announcement_pulls_the_record_from_its_sender_once() -> None:
    net, nodes = cluster(3)
    a, b, c = nodes
    net.advance(2.0)
    b.set_hostname("db.example", net.now)  # b's record goes to seq + 1
    seq = b.seq
    for viewer in (a, c):
        assert viewer.store.get(b.sign.node_id).seq < seq  # type: ignore[union-attr]
    announce = swim_packet(c, {"k": "gossip", "g": [{"k": "v", "id": b.sign.node_id, "s": seq}]})
    for _ in range(3):  # repeated announcements within a second: one request
        a.receive(announce, addr(2), net.now)
    out = a.datagrams_to_send()
    rqs = [(a.keyring.open(d), dst) for d, dst in out]
    rqs = [(wire.unpack(body), dst) for body, dst in rqs]
    rqs = [(m, dst) for m, dst in rqs if m["t"] == "rq"]
    assert rqs == [({"t": "rq", "ids": [b.sign.node_id]}, addr(2))]


def record_requests(node: Node, out: list[tuple[bytes, tuple[str, int]]]) -> list[object]:
    """The record ids ``node`` asks for in these datagrams of its."""
    bodies = [wire.unpack(node.keyring.open(d)) for d, _ in out]
    return [m["ids"] for m in bodies if isinstance(m, dict) and m.get("t") == "rq"]


def test_a_record_request_whose_answer_is_lost_is_retried() -> None:
    """One announcement, then the request or the record is lost: ``a`` asks again every
    RECORD_WANT_RETRY, RECORD_WANT_TRIES times, instead of waiting for another
    announcement (gossiped out by then) or for push-pull; it stops once the record came."""
    net, nodes = cluster(3)
    a, b, c = nodes
    net.advance(2.0)
    b.set_hostname("db.example", net.now)
    announce = swim_packet(c, {"k": "gossip", "g": [{"k": "v", "id": b.sign.node_id, "s": b.seq}]})
    a.receive(announce, addr(3), net.now)
    asked = [net.now] if record_requests(a, a.datagrams_to_send()) else []
    t = net.now
    for _ in range(200):  # ten seconds of a's timers, nothing delivered
        t += 0.05
        a.handle_timer(t)
        if record_requests(a, a.datagrams_to_send()) == [[b.sign.node_id]]:
            asked.append(t)
    assert len(asked) == RECORD_WANT_TRIES
    assert all(y - x >= RECORD_WANT_RETRY for x, y in itertools.pairwise(asked))
    # The answer that finally comes ends the requests.
    a.receive(announce, addr(3), t)
    a.datagrams_to_send()
    a.receive(
        b.keyring.seal(
            wire.pack({"t": "push", "recs": [b.record.blob.to_wire()], "leases": [], "ack": False}),
            b._rand,
        ),
        addr(2),
        t,
    )
    assert a.store.get(b.sign.node_id).seq == b.seq  # type: ignore[union-attr]
    for k in range(1, 60):
        a.handle_timer(t + 0.05 * k)
        assert record_requests(a, a.datagrams_to_send()) == []


def test_record_changes_spread_as_announcements() -> None:
    net, nodes = cluster(6)
    net.advance(3.0)
    net.sent.clear()
    nodes[4].set_hostname("db.example", net.now)
    net.run_until(
        lambda: (
            all(
                n.store.get(nodes[4].sign.node_id).hostname == "db.example"  # type: ignore[union-attr]
                for n in nodes
            )
            or None
        ),
        5.0,
    )
    assert all(n.store.get(nodes[4].sign.node_id).hostname == "db.example" for n in nodes)  # type: ignore[union-attr]
    # The full record crossed the network about once per member, not once per
    # retransmission: pushes are the pulled records.
    pushes = 0
    for _, _, data in net.sent:
        body = wire.unpack(nodes[0].keyring.open(data)) if data[1] == 1 else None
        if body and body["t"] == "push":
            pushes += len(body["recs"])
    assert pushes <= 2 * (len(nodes) - 1)


def test_garbage_swim_bodies_are_counted() -> None:
    net, nodes = cluster(2)
    a, b = nodes
    for body in ({"t": "swim"}, {"t": "swim", "m": 5}, {"t": "rq", "ids": [b"x"]}):
        a.receive(b.keyring.seal(wire.pack(body), b._rand), addr(2), net.now)
    assert a.drops[DropReason.MALFORMED] == 3
    a.receive(swim_packet(b, {"k": "nope"}), addr(2), net.now)
    assert a.swim.drops["unexpected"] == 1


def test_a_node_that_missed_a_join_catches_up_by_push_pull() -> None:
    net, nodes = cluster(4)
    net.advance(2.0)
    deaf = nodes[3]
    deaf_addr = addr(4)
    net.drop_fn = lambda data, src, dst: dst == deaf_addr
    late = net.join("late", addr(9), token(net, nodes[0]), [LEADER], max_time=5)
    assert isinstance(late, Node)
    net.advance(5.0)  # the new record's retransmissions are spent
    assert deaf.store.get(late.sign.node_id) is None
    net.drop_fn = lambda data, src, dst: False
    interval = PROFILES["lan"].push_pull_interval
    net.run_until(lambda: deaf.store.get(late.sign.node_id), interval + 5)
    assert deaf.store.get(late.sign.node_id) is not None
    assert state(deaf, late) is ALIVE


def test_graceful_leave_spreads_left() -> None:
    net, nodes = cluster(4)
    net.advance(2.0)
    leaver = nodes[2]
    leaver.leave(net.now)
    net.advance(5.0)
    assert all(state(v, leaver) is LEFT for v in nodes if v is not leaver)


def test_restart_restores_the_view_and_outbids_the_old_life(tmp_path: Path) -> None:
    net, nodes = cluster(4)
    net.advance(2.0)
    victim, me = nodes[3], nodes[1]
    del net.nodes[addr(4)]
    net.advance(40.0)
    assert state(me, victim) is DEAD
    inc = me.swim.incarnation
    d = DataDir(tmp_path / "me")
    persist.save_new(d, me, {})
    again, _ = persist.load(d, net.now)
    assert again.swim.incarnation == inc + 1
    assert state(again, victim) is DEAD  # not resurrected by the restart
    assert all(state(again, s) is ALIVE for s in nodes if s not in (victim, me))


def test_restarted_member_comes_back_alive(tmp_path: Path) -> None:
    net, nodes = cluster(4)
    net.advance(2.0)
    victim = nodes[3]
    d = DataDir(tmp_path / "victim")
    persist.save_new(d, victim, {})
    del net.nodes[addr(4)]
    net.advance(40.0)
    assert all(state(v, victim) is DEAD for v in nodes[:3])
    again, _ = persist.load(d, net.now)
    net.add(addr(4), again)
    net.advance(5.0)
    assert all(state(v, victim) is ALIVE for v in nodes[:3])


# --------------------------------------------------------------------- timing options


def opts(tmp_path: Path, *flags: str, config: str | None = None) -> Options:
    ns = argparse.Namespace(profile=None, timing=list(flags) or None, config=None)
    if config is not None:
        path = tmp_path / "meshd.toml"
        path.write_text(config)
        ns.config = str(path)
    return Options(ns)


def test_timing_defaults_to_lan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHD_TIMING", raising=False)
    monkeypatch.delenv("MESHD_PROFILE", raising=False)
    assert resolve_timing(opts(tmp_path)) == PROFILES["lan"]


def test_timing_file_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHD_PROFILE", "wan")
    monkeypatch.setenv("MESHD_TIMING", "probe_timeout=2s,gossip_nodes=5")
    o = opts(tmp_path, "probe_timeout=1500ms", "lifeguard=off",
             config='[timing]\nprobe_timeout = "2.5s"\nsuspicion_mult = 5\n')  # fmt: skip
    t = resolve_timing(o)
    assert t.probe_interval == PROFILES["wan"].probe_interval
    assert (t.probe_timeout, t.gossip_nodes, t.suspicion_mult, t.lifeguard) == (1.5, 5, 5.0, False)


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ("probe_intervall=1s", "unknown timing"),
        ("probe_interval", "NAME=VALUE"),
        ("probe_interval=soon", "not a duration"),
        ("gossip_nodes=many", "whole number"),
        ("lifeguard=maybe", "true or false"),
        ("probe_timeout=5s", "must not exceed"),
    ],
)
def test_bad_timing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, words: str
) -> None:
    monkeypatch.delenv("MESHD_TIMING", raising=False)
    monkeypatch.delenv("MESHD_PROFILE", raising=False)
    with pytest.raises(CliError, match=words):
        resolve_timing(opts(tmp_path, flag))
