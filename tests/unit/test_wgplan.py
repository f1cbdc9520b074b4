"""The WireGuard plan (meshd.core.wgplan): desired peers from the membership view, and the
minimal operations from actual to desired. Pure functions; properties with hypothesis."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.core.membership import MemberState
from meshd.core.node import Node
from meshd.core.wgplan import (
    KEEPALIVE,
    ROAM_GRACE,
    AddPeer,
    PeerSpec,
    PeerStatus,
    RemovePeer,
    UpdatePeer,
    apply_ops,
    desired_peers,
    normalize_cidr,
    normalize_endpoint,
    plan_peers,
    record_wg_endpoint,
)

from .corenet import Net
from .test_core_join import addr
from .test_node_gossip import cluster

NOW = 1_790_000_000.0


def key(i: int) -> bytes:
    return bytes([i]) * 32


def spec(i: int, endpoint: str | None = "192.0.2.9:51820", keepalive: int = KEEPALIVE) -> PeerSpec:
    return PeerSpec(
        key(i), endpoint, frozenset({f"10.200.0.{i}/32", f"fd00:200::{i:x}/128"}), keepalive
    )


def status(s: PeerSpec, **kw: object) -> PeerStatus:
    return dataclasses.replace(
        PeerStatus(s.public_key, s.endpoint, s.allowed_ips, s.keepalive), **kw
    )


# ------------------------------------------------------------------------------- plan


def test_empty_to_desired_adds_every_peer_in_key_order() -> None:
    want = {key(i): spec(i) for i in (3, 1, 2)}
    ops = plan_peers(want, {}, NOW)
    assert ops == [AddPeer(spec(1)), AddPeer(spec(2)), AddPeer(spec(3))]


def test_desired_equals_actual_is_empty() -> None:
    want = {key(i): spec(i) for i in range(1, 5)}
    actual = {k: status(s) for k, s in want.items()}
    assert plan_peers(want, actual, NOW) == []


def test_removes_come_first_then_updates_then_adds() -> None:
    want = {key(1): spec(1, "192.0.2.1:1"), key(3): spec(3)}
    actual = {key(1): status(spec(1)), key(2): status(spec(2))}
    ops = plan_peers(want, actual, NOW)
    assert ops == [
        RemovePeer(key(2)),
        UpdatePeer(key(1), endpoint="192.0.2.1:1"),
        AddPeer(spec(3)),
    ]


def test_update_changes_only_what_differs() -> None:
    want = spec(1)
    other_ips = frozenset({"10.200.0.99/32"})
    ops = plan_peers({key(1): want}, {key(1): status(want, allowed_ips=other_ips)}, NOW)
    assert ops == [UpdatePeer(key(1), allowed_ips=want.allowed_ips)]
    ops = plan_peers({key(1): want}, {key(1): status(want, keepalive=0)}, NOW)
    assert ops == [UpdatePeer(key(1), keepalive=KEEPALIVE)]


def test_key_change_is_remove_old_add_new() -> None:
    """A member that re-keys: same addresses, new key -> the old peer goes, the new comes."""
    old, new = spec(1), dataclasses.replace(spec(1), public_key=key(7))
    ops = plan_peers({new.public_key: new}, {old.public_key: status(old)}, NOW)
    assert ops == [RemovePeer(old.public_key), AddPeer(new)]
    after = apply_ops({old.public_key: status(old)}, ops)
    assert set(after) == {new.public_key}
    assert after[new.public_key].allowed_ips == old.allowed_ips


def test_roaming_endpoint_is_kept_while_the_handshake_is_fresh() -> None:
    want = spec(1, "192.0.2.1:51820")
    roamed = status(want, endpoint="203.0.113.7:40000", last_handshake=NOW - 30)
    assert plan_peers({key(1): want}, {key(1): roamed}, NOW) == []
    stale = dataclasses.replace(roamed, last_handshake=NOW - ROAM_GRACE - 1)
    assert plan_peers({key(1): want}, {key(1): stale}, NOW) == [
        UpdatePeer(key(1), endpoint="192.0.2.1:51820")
    ]
    never = dataclasses.replace(roamed, last_handshake=None)
    assert plan_peers({key(1): want}, {key(1): never}, NOW) == [
        UpdatePeer(key(1), endpoint="192.0.2.1:51820")
    ]


def test_no_desired_endpoint_leaves_the_learned_one() -> None:
    want = spec(1, None)
    assert plan_peers({key(1): want}, {key(1): status(want, endpoint="192.0.2.5:9")}, NOW) == []
    assert plan_peers({key(1): want}, {}, NOW) == [AddPeer(want)]


def test_apply_ops_models_allowed_ips_as_unique_across_peers() -> None:
    a, b = spec(1), spec(2)
    actual = {key(1): status(a), key(2): status(b)}
    after = apply_ops(actual, [UpdatePeer(key(2), allowed_ips=a.allowed_ips | b.allowed_ips)])
    assert after[key(1)].allowed_ips == frozenset()
    assert after[key(2)].allowed_ips == a.allowed_ips | b.allowed_ips


def test_update_of_a_vanished_peer_does_not_recreate_it() -> None:
    assert apply_ops({}, [UpdatePeer(key(1), endpoint="192.0.2.1:1")]) == {}


def test_normalizers() -> None:
    assert normalize_endpoint("[::ffff:192.0.2.1]:51820") == "192.0.2.1:51820"
    assert normalize_endpoint("[FD00::0001]:1") == "[fd00::1]:1"
    with pytest.raises(ValueError):
        normalize_endpoint("example.com:51820")
    assert normalize_cidr("10.200.0.5") == "10.200.0.5/32"
    assert normalize_cidr("FD00:200:0::5/128") == "fd00:200::5/128"
    assert normalize_cidr("::ffff:10.0.0.0/104") == "10.0.0.0/8"


# ------------------------------------------------------------------------- properties

_keys = st.integers(1, 12)
_ep = st.one_of(
    st.none(),
    st.builds(lambda h, p: f"192.0.2.{h}:{p}", st.integers(1, 4), st.integers(1, 3)),
)
_ka = st.sampled_from([0, 25, 10])
_hs = st.one_of(st.none(), st.floats(NOW - 2 * ROAM_GRACE, NOW))


@st.composite
def _peer_tables(draw: st.DrawFn, with_stats: bool) -> dict[bytes, PeerStatus]:
    """Peers with disjoint allowed IPs (WireGuard guarantees it for actual peers; the
    desired view guarantees it by construction)."""
    ids = draw(st.lists(_keys, unique=True, max_size=8))
    pool = [f"10.200.0.{i}/32" for i in range(1, 9)] + [f"fd00::{i:x}/128" for i in range(1, 5)]
    owner = draw(st.lists(st.sampled_from([None, *ids]), min_size=len(pool), max_size=len(pool)))
    out = {}
    for i in ids:
        ips = frozenset(ip for ip, o in zip(pool, owner, strict=True) if o == i)
        out[key(i)] = PeerStatus(
            key(i),
            draw(_ep),
            ips,
            draw(_ka),
            draw(_hs) if with_stats else None,
            draw(st.integers(0, 10**9)) if with_stats else 0,
            draw(st.integers(0, 10**9)) if with_stats else 0,
        )
    return out


@settings(max_examples=150, deadline=None)
@given(_peer_tables(with_stats=False), _peer_tables(with_stats=True))
def test_applying_the_plan_yields_the_desired_state(
    want_t: dict[bytes, PeerStatus], actual: dict[bytes, PeerStatus]
) -> None:
    desired = {k: s.spec() for k, s in want_t.items()}
    ops = plan_peers(desired, actual, NOW)
    after = apply_ops(actual, ops)
    # Converged: planning again finds nothing to do (idempotent).
    assert plan_peers(desired, after, NOW) == []
    # Exactly the desired peers, with the desired keys, IPs and keepalive; the endpoint
    # is the desired one except where the rules keep the one WireGuard learned.
    assert set(after) == set(desired)
    for k, want in desired.items():
        got = after[k]
        assert got.allowed_ips == want.allowed_ips
        assert got.keepalive == want.keepalive
        had = actual.get(k)
        fresh = (
            had is not None
            and had.endpoint is not None
            and had.last_handshake is not None
            and NOW - had.last_handshake < ROAM_GRACE
        )
        if want.endpoint is not None and not fresh:
            assert got.endpoint == want.endpoint
        elif had is not None:
            assert got.endpoint in (had.endpoint, want.endpoint)
        # Counters survive updates.
        if had is not None:
            assert (got.rx_bytes, got.tx_bytes) == (had.rx_bytes, had.tx_bytes)
    # Minimal: one operation per peer at most, and none for peers already right.
    touched = [op.peer.public_key if isinstance(op, AddPeer) else op.public_key for op in ops]
    assert len(touched) == len(set(touched))
    for k in touched:
        assert k not in desired or k not in actual or actual[k].spec() != desired[k]


@settings(max_examples=100, deadline=None)
@given(_peer_tables(with_stats=False))
def test_plan_of_desired_against_itself_is_empty(want_t: dict[bytes, PeerStatus]) -> None:
    desired = {k: s.spec() for k, s in want_t.items()}
    assert plan_peers(desired, want_t, NOW) == []
    assert apply_ops(want_t, []) == want_t


# ------------------------------------------------------------------------ desired view


def _cluster(n: int) -> tuple[Net, list[Node]]:
    net, nodes = cluster(n)
    net.advance(3.0)
    return net, nodes


def _desired(viewer: Node) -> dict[bytes, PeerSpec]:
    def state_of(nid: bytes) -> MemberState | None:
        s = viewer.member_state(nid)
        return None if s is None else s[0]

    return desired_peers(
        viewer.store,
        state_of,
        viewer.plan,
        self_id=viewer.sign.node_id,
        self_key=viewer.wg.public,
    ).peers


def test_desired_peers_from_real_records() -> None:
    _, nodes = _cluster(4)
    viewer = nodes[0]
    want = _desired(viewer)
    assert set(want) == {n.wg.public for n in nodes[1:]}
    for n in nodes[1:]:
        p = want[n.wg.public]
        v4, v6 = n.addresses()
        assert p.allowed_ips == {f"{v4}/32", f"{v6}/128"}
        assert p.keepalive == 25
        assert p.endpoint == f"{n.config.endpoints[0].split(':')[0]}:51820"


def test_dead_and_left_members_have_no_peer() -> None:
    net, nodes = _cluster(5)
    viewer = nodes[0]
    del net.nodes[addr(4)]  # crash n4
    nodes[4].leave(net.now)  # n5 leaves gracefully
    net.advance(60.0)
    want = _desired(viewer)
    assert nodes[3].wg.public not in want
    assert nodes[4].wg.public not in want
    assert set(want) == {nodes[1].wg.public, nodes[2].wg.public}


def test_suspect_keeps_its_peer_and_unknown_has_none() -> None:
    _, nodes = _cluster(3)
    viewer = nodes[0]
    recs = list(viewer.store)
    states = {nodes[1].sign.node_id: MemberState.SUSPECT}
    d = desired_peers(
        recs,
        states.get,
        viewer.plan,
        self_id=viewer.sign.node_id,
        endpoint=record_wg_endpoint,
    )
    assert set(d.peers) == {nodes[1].wg.public}  # nodes[2]: no SWIM state -> unknown
    assert d.owners == {nodes[1].wg.public: nodes[1].sign.node_id}


def test_duplicate_key_and_address_conflicts_keep_the_lowest_node_id() -> None:
    _, nodes = _cluster(3)
    viewer = nodes[0]
    a, b = sorted(
        (r for r in viewer.store if r.node_id != viewer.sign.node_id), key=lambda r: r.node_id
    )
    same_key = dataclasses.replace(b, wg_key=a.wg_key)
    d = desired_peers(
        [a, same_key],
        lambda _nid: MemberState.ALIVE,
        viewer.plan,
        self_id=viewer.sign.node_id,
        endpoint=record_wg_endpoint,
    )
    assert set(d.peers) == {a.wg_key} and b.node_id in d.conflicts
    same_addr = dataclasses.replace(b, admission=a.admission)
    d = desired_peers(
        [a, same_addr],
        lambda _nid: MemberState.ALIVE,
        viewer.plan,
        self_id=viewer.sign.node_id,
        endpoint=record_wg_endpoint,
    )
    assert set(d.peers) == {a.wg_key} and "address" in d.conflicts[b.node_id]


def test_endpoint_needs_an_ip_literal() -> None:
    _, nodes = _cluster(2)
    rec = nodes[0].store.get(nodes[1].sign.node_id)
    assert rec is not None
    named = dataclasses.replace(rec, endpoints=("host.example:7946",))
    assert record_wg_endpoint(named) is None
    v6 = dataclasses.replace(rec, endpoints=("[2001:db8::1]:7946",), wg_port=51999)
    assert record_wg_endpoint(v6) == "[2001:db8::1]:51999"
    assert record_wg_endpoint(dataclasses.replace(rec, wg_port=0)) is None
    assert record_wg_endpoint(dataclasses.replace(rec, endpoints=())) is None


def test_each_member_is_dialled_at_the_port_its_signed_record_carries() -> None:
    """Members need not share --wg-port: the port travels in the signed record, and a
    member without a WireGuard interface (port 0) gets a peer with no endpoint."""
    net, nodes = _cluster(3)
    nodes[1].config.wg_port = 51999
    nodes[1].announce(net.now)
    nodes[2].config.wg_port = 0
    nodes[2].announce(net.now)
    net.advance(3.0)
    want = _desired(nodes[0])
    host1 = nodes[1].config.endpoints[0].split(":")[0]
    assert want[nodes[1].wg.public].endpoint == f"{host1}:51999"
    assert want[nodes[2].wg.public].endpoint is None
    rec = nodes[0].store.get(nodes[1].sign.node_id)
    assert rec is not None and rec.wg_port == 51999 and rec.seq == nodes[1].seq
