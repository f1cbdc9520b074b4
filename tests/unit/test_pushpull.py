"""Push-pull anti-entropy and owner-vouched membership in meshd/core/membership.py.

Fake clock throughout; the harnesses come from test_membership (``Solo`` plays the
rest of the cluster by hand, ``Net`` is a lossy discrete-event network that
msgpack-round-trips every message and checks ``max_packet``).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.core import wire
from meshd.core.membership import (
    MAX_PP_BUCKETS,
    PP_SERVE_PER_SECOND,
    SYNC_ATTEMPTS,
    Membership,
    MemberState,
    Refuted,
    SyncNeeded,
    push_pull_scale,
)
from tests.unit.test_membership import (
    ALIVE,
    DEAD,
    LEFT,
    LOCAL,
    NOW0,
    SUSPECT,
    Addr,
    Msg,
    Net,
    addr,
    nid,
    roundtrip,
)

NO_PP = replace(LOCAL, push_pull_interval=0)


def core(i: int, timing: Any = NO_PP, *, learn: bool = True) -> Membership:
    return Membership(nid(i), addr(i), timing, random.Random(i), NOW0, learn_unknown=learn)


def drain(m: Membership) -> list[tuple[Msg, Addr]]:
    return [(roundtrip(msg, m.timing), to) for msg, to in m.messages_to_send()]


def events(m: Membership) -> list[Any]:
    out = []
    while (ev := m.next_event()) is not None:
        out.append(ev)
    return out


def pair(shared: range = range(0), inc: int = 0) -> tuple[Membership, Membership]:
    """Nodes 0 and 1, knowing each other and members ``shared`` at ``inc``."""
    a, b = core(0), core(1)
    for m in (a, b):
        for i in shared:
            m.add_member(nid(i), addr(i), inc, NOW0)
    a.add_member(nid(1), addr(1), 0, NOW0)
    b.add_member(nid(0), addr(0), 0, NOW0)
    return a, b


def exchange(a: Membership, b: Membership, now: float = NOW0) -> int:
    """Run one whole push-pull from ``a`` to ``b`` without loss; return datagrams used."""
    drain(a)
    drain(b)
    a.push_pull(now, b.self_addr)
    queue = [(msg, a.self_addr, b) for msg, _ in drain(a)]
    used = 0
    while queue:
        msg, src, dst = queue.pop(0)
        used += 1
        dst.receive(msg, src, now)
        other = a if dst is b else b
        queue.extend((m, dst.self_addr, other) for m, _ in drain(dst) if m["k"] == "pp")
    return used


def test_scale_follows_memberlist() -> None:
    assert push_pull_scale(30.0, 10) == 30.0
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 33) == 60.0
    assert push_pull_scale(30.0, 64) == 60.0
    assert push_pull_scale(30.0, 1_000) == 30.0 * 6
    assert push_pull_scale(30.0, 10_000) == 30.0 * 10


def test_views_in_sync_cost_one_datagram() -> None:
    a, b = pair(range(2, 40), 3)
    assert exchange(a, b) == 1


def test_only_differing_buckets_are_sent() -> None:
    a, b = pair(range(2, 200))
    b.receive({"k": "gossip", "g": [{"k": "alive", "id": nid(77), "inc": 5, "a": "10.0.0.77:1"}]},
              addr(9), NOW0)  # fmt: skip
    drain(b)
    a.push_pull(NOW0, b.self_addr)
    ((digest, _),) = drain(a)
    b.receive(digest, a.self_addr, NOW0)
    answer = drain(b)
    assert len(answer) == 1
    entries = answer[0][0]["e"]
    assert len(answer[0][0]["d"]) == 1 and nid(77) in [e[0] for e in entries]
    assert len(entries) < 200 // 4  # one bucket of 16, not the whole view
    a.receive(answer[0][0], b.self_addr, NOW0)
    assert a.member(nid(77)).incarnation == 5  # type: ignore[union-attr]


def test_large_view_is_chunked_and_fully_learned() -> None:
    a, b = core(0), core(1)
    b.add_member(nid(0), addr(0), 0, NOW0)
    for i in range(2, 252):
        b.add_member(nid(i), (f"10.1.{i}.{i}", 7946), i, NOW0)
    used = exchange(a, b)
    assert used > 10  # many datagrams, each checked against max_packet by roundtrip()
    assert len(a.members()) == 252
    assert all(a.member(nid(i)).incarnation == i for i in range(2, 252))  # type: ignore[union-attr]


def test_digest_buckets_are_bounded() -> None:
    a = core(0)
    for i in range(1, 5_000):
        a.add_member(i.to_bytes(16, "big"), addr(1), 0, NOW0)
    a.push_pull(NOW0, addr(1))
    ((msg, _),) = drain(a)
    assert msg["nb"] == MAX_PP_BUCKETS and len(wire.pack(msg)) <= a.timing.max_packet


def test_remote_dead_only_makes_us_suspect() -> None:
    a, b = pair(range(5, 6), 2)
    a.receive({"k": "gossip", "g": [{"k": "dead", "id": nid(5), "inc": 2, "by": nid(0)}]},
              addr(9), NOW0)  # fmt: skip
    assert a.member(nid(5)).state is DEAD  # type: ignore[union-attr]
    exchange(a, b)
    assert b.member(nid(5)).state is SUSPECT  # type: ignore[union-attr]


def test_left_spreads_and_is_never_undone_by_push_pull() -> None:
    a, b = pair(range(5, 6), 2)
    a.receive({"k": "gossip", "g": [{"k": "left", "id": nid(5), "inc": 2}]}, addr(9), NOW0)
    exchange(a, b)
    assert b.member(nid(5)).state is LEFT  # type: ignore[union-attr]
    exchange(b, a)  # a's alive view of nothing older can bring it back
    assert a.member(nid(5)).state is LEFT and b.member(nid(5)).state is LEFT  # type: ignore[union-attr]


def test_accused_node_refutes_through_push_pull() -> None:
    a, b = pair()
    b.receive({"k": "gossip", "g": [{"k": "dead", "id": nid(0), "inc": 0, "by": nid(1)}]},
              addr(9), NOW0)  # fmt: skip
    events(a)
    exchange(a, b)
    assert a.incarnation == 1
    assert Refuted(1, 0) in events(a)


def test_sync_needed_names_the_partner_with_newer_versions() -> None:
    a, b = pair(range(5, 7))
    a.set_version(nid(5), 7)
    b.set_version(nid(5), 3)
    b.set_version(nid(6), 2)
    a.set_version(nid(6), 2)
    b.self_version = 4
    events(a)
    events(b)
    exchange(a, b)
    assert [e for e in events(b) if isinstance(e, SyncNeeded)] == [SyncNeeded(addr(0), (nid(5),))]
    assert [e for e in events(a) if isinstance(e, SyncNeeded)] == [SyncNeeded(addr(1), (nid(1),))]


def test_answers_are_rate_limited() -> None:
    b = core(1)
    b.add_member(nid(2), addr(2), 0, NOW0)
    digest = {"k": "pp", "ph": 0, "sid": 1, "from": nid(0), "nb": 1, "h": b"\0" * 4}
    for _ in range(PP_SERVE_PER_SECOND + 3):
        b.receive(dict(digest), addr(0), NOW0)
    assert len(drain(b)) == PP_SERVE_PER_SECOND
    assert b.drops["rate_limited"] == 3
    b.receive(dict(digest), addr(0), NOW0 + 1.5)
    assert len(drain(b)) == 1


def test_unsolicited_answer_is_dropped() -> None:
    a = core(0)
    entry = [nid(9), 4, 0, 0, "10.0.0.9:1"]
    a.receive({"k": "pp", "ph": 1, "sid": 5, "from": nid(1), "nb": 1, "d": [0], "e": [entry]},
              addr(1), NOW0)  # fmt: skip
    assert a.drops == {"stale": 1} and a.member(nid(9)) is None


@pytest.mark.parametrize(
    "patch",
    [
        {"nb": 3},
        {"nb": 256},
        {"ph": 3},
        {"d": [1]},
        {"d": "x"},
        {"e": [[nid(9), 1, 0, 0]]},
        {"e": [[nid(9), -1, 0, 0, "a:1"]]},
        {"e": [[nid(9), 1, 4, 0, "a:1"]]},
        {"e": [[nid(9), 1, 0, True, "a:1"]]},
        {"e": [[b"short", 1, 0, 0, "a:1"]]},
        {"e": [[nid(9), 1, 0, 0, "no port"]]},
        {"e": [[nid(8), 1, 0, 0, "10.0.0.8:1"], [nid(9), 1, 0, 0, 5]]},
    ],
)
def test_malformed_push_pull_is_counted_and_changes_nothing(patch: dict[str, Any]) -> None:
    a = core(0)
    a.push_pull(NOW0, addr(1))
    ((digest, _),) = drain(a)
    msg = {"k": "pp", "ph": 1, "sid": digest["sid"], "from": nid(1), "nb": 1, "d": [0],
           "e": [[nid(9), 1, 0, 0, "10.0.0.9:1"]]}  # fmt: skip
    msg.update(patch)
    a.receive(msg, addr(1), NOW0)
    assert sum(a.drops.values()) == 1 and a.member(nid(8)) is None and a.member(nid(9)) is None
    assert drain(a) == []  # no answer to a bad message


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["k", "ph", "sid", "from", "nb", "h", "d", "e"]),
        st.one_of(
            st.integers(-2, 300), st.binary(max_size=40), st.text(max_size=5),
            st.lists(st.lists(st.one_of(st.integers(-1, 5), st.binary(min_size=16, max_size=16),
                                        st.text(max_size=12)), max_size=6), max_size=4),
        ),
    )
)  # fmt: skip
def test_fuzzed_push_pull_never_raises(body: dict[str, Any]) -> None:
    body["k"] = "pp"
    a = core(0)
    a.add_member(nid(1), addr(1), 0, NOW0)
    a.push_pull(NOW0, addr(1))
    drain(a)
    before = a.members()
    a.receive(body, addr(1), NOW0)
    if a.drops:
        assert a.members() == before


# ---------------------------------------------------------- owner-vouched membership


def test_gossip_alone_never_adds_a_member_when_the_owner_vouches() -> None:
    a = core(0, learn=False)
    a.receive({"k": "gossip", "g": [{"k": "alive", "id": nid(7), "inc": 3, "a": "10.0.0.7:1"}]},
              addr(1), NOW0)  # fmt: skip
    assert a.member(nid(7)) is None
    b = core(1, learn=False)
    b.add_member(nid(0), addr(0), 0, NOW0)
    b.add_member(nid(8), addr(8), 0, NOW0)
    b.set_version(nid(8), 2)
    exchange(a, b)
    assert a.member(nid(8)) is None
    assert SyncNeeded(addr(1), (nid(8),)) in events(a)


@pytest.mark.parametrize(
    ("heard", "expect"),
    [
        ({"k": "alive", "id": nid(7), "inc": 3, "a": "10.0.0.70:1"}, (ALIVE, 3)),
        ({"k": "suspect", "id": nid(7), "inc": 3, "by": nid(2)}, (SUSPECT, 3)),
        ({"k": "dead", "id": nid(7), "inc": 3, "by": nid(2)}, (DEAD, 3)),
        ({"k": "left", "id": nid(7), "inc": 3}, (LEFT, 3)),
        ({"k": "dead", "id": nid(7), "inc": 0, "by": nid(2)}, (DEAD, 1)),  # no: older
    ],
)
def test_what_was_heard_applies_once_the_owner_adds_the_member(
    heard: Msg, expect: tuple[MemberState, int]
) -> None:
    a = core(0, learn=False)
    a.receive({"k": "gossip", "g": [heard]}, addr(1), NOW0)
    a.add_member(nid(7), addr(7), 1, NOW0)
    v = a.member(nid(7))
    assert v is not None
    if heard["inc"] < 1:
        assert (v.state, v.incarnation) == (ALIVE, 1)
    else:
        assert (v.state, v.incarnation) == expect
    if heard["k"] == "alive":
        assert v.addr == ("10.0.0.70", 1)


def test_restore_a_persisted_dead_member() -> None:
    a = core(0)
    a.add_member(nid(3), addr(3), 4, NOW0, state=DEAD)
    assert a.member(nid(3)).state is DEAD  # type: ignore[union-attr]
    a.add_member(nid(4), addr(4), 2, NOW0, state=LEFT)
    assert a.member(nid(4)).state is LEFT  # type: ignore[union-attr]


# ------------------------------------------------------------------- whole clusters


def test_partition_heals_within_one_push_pull_interval() -> None:
    timing = replace(LOCAL, push_pull_interval=2.0)
    net = Net(12, timing, seed=3, log=False)
    left, right = set(range(6)), set(range(6, 12))
    side = {addr(i): i in left for i in range(12)}
    net.blocked = lambda src, dst, msg: side[src] != side[dst]
    net.run(0.5)
    net.run(20.0, until=lambda: all(net.state(i, j) is DEAD for i in left for j in right))
    assert all(net.state(i, j) is DEAD for i in left for j in right)
    net.run(3.0)  # long after every partner choice could land within its own side
    net.blocked = lambda src, dst, msg: False
    healed_at = net.now

    def whole() -> bool:
        return all(net.state(i, j) is ALIVE for i in range(12) for j in range(12) if i != j)

    net.run(10.0, until=whole)
    assert whole()
    # One interval (2 s) for a cross-cut exchange, plus gossip of the refutations.
    assert net.now - healed_at <= 2.0 + 1.5


def test_no_push_pull_no_healing() -> None:
    """The control for the test above: without anti-entropy the halves stay apart."""
    net = Net(8, NO_PP, seed=3, log=False)
    side = {addr(i): i < 4 for i in range(8)}
    net.blocked = lambda src, dst, msg: side[src] != side[dst]
    net.run(20.0, until=lambda: all(net.state(i, j) is DEAD for i in range(4) for j in range(4, 8)))
    net.run(35.0)  # past gossip_to_dead (30 s): nobody talks across any more
    net.blocked = lambda src, dst, msg: False
    net.run(10.0)
    assert all(net.state(i, j) is DEAD for i in range(4) for j in range(4, 8))


def test_sync_retries_until_two_partners_answer() -> None:
    """A start-up sync whose partners are not listening yet tries again, one probe
    interval apart, and stops once two partners have answered."""
    a = core(0)
    peers = {i: core(i) for i in (1, 2, 3)}
    for i, p in peers.items():
        a.add_member(nid(i), addr(i), 0, NOW0)
        p.add_member(nid(0), addr(0), 0, NOW0)
        p.add_member(nid(9), addr(9), 4, NOW0)  # something a lacks: views differ
    drain(a)
    a.sync(NOW0)
    assert len([m for m in drain(a) if m[0]["k"] == "pp"]) == 1  # lost: nobody listens yet
    now, digests = NOW0, 0
    for _ in range(200):
        now = a.get_timer() or now
        a.handle_timer(now)
        for msg, dst in drain(a):
            if msg["k"] != "pp" or msg["ph"] != 0:
                continue
            digests += 1
            assert now >= NOW0 + digests * a.timing.probe_interval  # one try per interval
            partner = next(p for p in peers.values() if p.self_addr == dst)
            partner.receive(msg, a.self_addr, now)
            for reply, _ in drain(partner):
                if reply["k"] == "pp":
                    a.receive(reply, partner.self_addr, now)
        if not a._sync_left:
            break
    assert digests == 2  # two more tries, both answered
    assert a.member(nid(9)) is not None
    later = now + 10 * a.timing.probe_interval
    a.handle_timer(later)
    assert [m for m in drain(a) if m[0]["k"] == "pp" and m[0]["ph"] == 0] == []  # done


def test_sync_gives_up_after_bounded_attempts() -> None:
    a = core(0)
    a.add_member(nid(1), addr(1), 0, NOW0)
    drain(a)
    a.sync(NOW0)
    sent = len([m for m in drain(a) if m[0]["k"] == "pp"])
    now = NOW0
    for _ in range(50):
        t = a.get_timer()
        assert t is not None
        now = t
        a.handle_timer(now)
        sent += len([m for m in drain(a) if m[0]["k"] == "pp"])
        if now > NOW0 + 20 * a.timing.probe_interval:
            break
    assert sent == SYNC_ATTEMPTS  # NO_PP: no scheduled push-pull besides the sync
