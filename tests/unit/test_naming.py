"""The zone view (meshd.core.naming): names, collisions, conflicts, removal, determinism."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.core.ipam import AddressPlan
from meshd.core.membership import MemberState
from meshd.core.naming import (
    Host,
    Member,
    Pointer,
    ZoneView,
    ip_name4,
    ip_name6,
    ip_name_groups,
    reverse_name,
    reverse_zones,
)

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)
Z = "mesh.internal."
PLAN16 = AddressPlan.parse("10.200.0.0/16", "fd00:200::/48")
PLAN8 = AddressPlan.parse("10.0.0.0/8", "fd00::/40")
PLAN24 = AddressPlan.parse("10.1.2.0/24", "fd00:1::/64", block_prefix4=28)
PLAN12 = AddressPlan.parse("10.192.0.0/12", "fd00:200::/48")
PLAN20 = AddressPlan.parse("10.200.0.0/20", "fd00:200::/50")
PLANS = [PLAN16, PLAN8, PLAN24, PLAN12, PLAN20]


def nid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def member(
    i: int, name: str | None = None, hostname: str | None = None, offset: int | None = None,
    admitted: float | None = None,
) -> Member:  # fmt: skip
    return Member(
        node_id=nid(i),
        name=name or f"n{i}",
        hostname=hostname,
        offset=i if offset is None else offset,
        admitted_at=float(i) if admitted is None else admitted,
    )


def view(*members: Member, plan: AddressPlan = PLAN16, leader: int | None = 1) -> ZoneView:
    return ZoneView.build(
        plan, Z, [(m, ALIVE) for m in members], nid(leader) if leader else None, self_id=nid(1)
    )


def host(v: ZoneView, name: str) -> Host:
    e = v.get(name)
    assert isinstance(e, Host), (name, e)
    return e


def snapshot(v: ZoneView) -> tuple[object, ...]:
    return (list(v.entries()), v.conflicts(), v.serial, sorted(v._ent.items()), v.ns_name())


# ------------------------------------------------------------------ address names


def test_reference_names_in_a_slash_16() -> None:
    assert ip_name_groups(PLAN16) == (2, 1)
    v4, v6 = PLAN16.address(5)
    assert ip_name4(v4, 2) == "node-0-5"
    assert ip_name6(v6, 1) == "node-5"
    v4, v6 = PLAN16.address(0x1_2A)
    assert (ip_name4(v4, 2), ip_name6(v6, 1)) == ("node-1-42", "node-12a")


@pytest.mark.parametrize(
    ("plan", "groups"),
    [(PLAN8, (3, 2)), (PLAN24, (2, 1)), (PLAN12, (3, 2)), (PLAN20, (2, 1)), (PLAN16, (2, 1))],
)
def test_group_counts_follow_the_plan(plan: AddressPlan, groups: tuple[int, int]) -> None:
    assert ip_name_groups(plan) == groups


def test_a_slash_8_gets_three_octets_so_far_apart_members_never_collide() -> None:
    a, b = member(2, offset=0x01_00_05), member(3, offset=0x02_00_05)  # 10.1.0.5, 10.2.0.5
    v = view(member(1), a, b, plan=PLAN8)
    assert host(v, "node-1-0-5.mesh.internal.").a == IPv4Address("10.1.0.5")
    assert host(v, "node-2-0-5.mesh.internal.").a == IPv4Address("10.2.0.5")
    assert host(v, "node-1-5.mesh.internal.").aaaa == IPv6Address("fd00::1:5")
    assert host(v, "node-2-5.mesh.internal.").aaaa == IPv6Address("fd00::2:5")
    assert v.get("node-0-5.mesh.internal.") is None
    assert v.conflicts() == []


def test_every_address_of_a_slash_24_has_its_own_names() -> None:
    names4, names6 = set(), set()
    g4, g6 = ip_name_groups(PLAN24)
    for off in range(PLAN24.size):
        v4, v6 = PLAN24.address(off)
        names4.add(ip_name4(v4, g4))
        names6.add(ip_name6(v6, g6))
    assert len(names4) == len(names6) == PLAN24.size
    assert not names4 & names6


plans = st.sampled_from(PLANS)


@given(plans, st.data())
@settings(max_examples=200, deadline=None)
def test_address_names_are_unique_within_any_plan(plan: AddressPlan, data: st.DataObject) -> None:
    a, b = data.draw(st.lists(st.integers(0, plan.size - 1), min_size=2, max_size=2, unique=True))
    g4, g6 = ip_name_groups(plan)
    (a4, a6), (b4, b6) = plan.address(a), plan.address(b)
    names = {ip_name4(a4, g4), ip_name4(b4, g4), ip_name6(a6, g6), ip_name6(b6, g6)}
    assert len(names) == 4


@given(plans, st.integers(0, 2**32))
@settings(max_examples=200, deadline=None)
def test_an_address_name_is_reserved_for_exactly_its_address(plan: AddressPlan, n: int) -> None:
    off = n % plan.size
    v4, v6 = plan.address(off)
    v = ZoneView(plan, Z)
    g4, g6 = ip_name_groups(plan)
    assert v._reserved(f"{ip_name4(v4, g4)}.{Z}") == v4
    assert v._reserved(f"{ip_name6(v6, g6)}.{Z}") == v6


def test_reverse_names_match_the_standard_library() -> None:
    for text in ("10.200.0.5", "fd00:200::5", "fd00:200::1:ff"):
        ip = ip_address(text)
        assert reverse_name(ip) == ip.reverse_pointer + "."


@pytest.mark.parametrize(
    ("plan", "zones"),
    [
        (PLAN16, ["200.10.in-addr.arpa.", "0.0.0.0.0.0.2.0.0.0.d.f.ip6.arpa."]),
        (PLAN8, ["10.in-addr.arpa.", "0.0.0.0.0.0.0.0.d.f.ip6.arpa."]),
        (PLAN24, ["2.1.10.in-addr.arpa.", "0.0.0.0.0.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa."]),
    ],
)
def test_reverse_zones_on_boundaries(plan: AddressPlan, zones: list[str]) -> None:
    assert list(reverse_zones(plan)) == zones


def test_reverse_zones_off_boundaries_are_split_at_the_next_one() -> None:
    zones = reverse_zones(PLAN20)  # /20 -> sixteen /24 zones; /50 -> four /52 zones
    assert zones[:16] == tuple(f"{i}.200.10.in-addr.arpa." for i in range(16))
    assert len(zones) == 20
    assert all(z.endswith("0.0.0.0.0.0.2.0.0.0.d.f.ip6.arpa.") for z in zones[16:])
    v = ZoneView(PLAN20, Z)
    assert v.find_zone("5.15.200.10.in-addr.arpa.") == "15.200.10.in-addr.arpa."
    assert v.find_zone("5.16.200.10.in-addr.arpa.") is None  # outside the plan: not ours


@given(plans, st.integers(0, 2**32))
@settings(max_examples=100, deadline=None)
def test_every_overlay_address_is_in_exactly_one_reverse_zone(plan: AddressPlan, n: int) -> None:
    v = ZoneView(plan, Z)
    for ip in plan.address(n % plan.size):
        rev = reverse_name(ip)
        apex = v.find_zone(rev)
        assert apex is not None
        assert sum(rev.endswith("." + z) for z in v.reverse) == 1


# ----------------------------------------------------------------------- the zone


def test_names_addresses_and_pointers() -> None:
    v = view(member(1, "alpha", "web.prod"), member(2, "beta"))
    a = host(v, "alpha.mesh.internal.")
    assert (a.a, a.aaaa) == (IPv4Address("10.200.0.1"), IPv6Address("fd00:200::1"))
    assert host(v, "web.prod.mesh.internal.") == a
    assert host(v, "node-0-2.mesh.internal.") == host(v, "beta.mesh.internal.")
    assert host(v, "node-2.mesh.internal.").aaaa == IPv6Address("fd00:200::2")
    assert host(v, "leader.mesh.internal.") == a
    ptr = v.get("2.0.200.10.in-addr.arpa.")
    assert isinstance(ptr, Pointer) and ptr.target == "beta.mesh.internal."
    ptr6 = v.get(reverse_name(IPv6Address("fd00:200::1")))
    assert isinstance(ptr6, Pointer) and ptr6.target == "alpha.mesh.internal."
    assert v.conflicts() == []
    assert v.ns_name() == "alpha.mesh.internal."
    assert v.soa().mname == "alpha.mesh.internal."


def test_lookups_are_by_lower_case_names_and_input_case_does_not_matter() -> None:
    v = view(member(1, "Alpha", "Web.Prod.MESH.internal."))
    assert v.get("alpha.mesh.internal.") is not None
    assert v.get("web.prod.mesh.internal.") is not None  # the zone suffix is not doubled


def test_empty_non_terminals_exist_and_unknown_names_do_not() -> None:
    v = view(member(1, "alpha", "a.b.c"))
    assert v.exists("b.c.mesh.internal.") and v.exists("c.mesh.internal.")
    assert v.get("c.mesh.internal.") is None
    assert v.exists("0.200.10.in-addr.arpa.")  # parent of 1.0.200.10.in-addr.arpa.
    assert not v.exists("9.200.10.in-addr.arpa.")
    assert not v.exists("nope.mesh.internal.")
    assert v.exists("mesh.internal.") and v.find_zone("x.y.mesh.internal.") == Z
    assert v.find_zone("example.com.") is None and v.find_zone(".") is None
    v.remove(nid(1))
    assert not v.exists("c.mesh.internal.") and v._ent == {}


def test_invalid_names_are_reported_not_served() -> None:
    v = view(
        member(1, "alpha"), member(2, "Bad_Name", "-x-"), member(3, "c", "a" * 63 + ".b" * 100)
    )
    kinds = {(c.node_id, c.kind) for c in v.conflicts()}
    assert kinds == {(nid(2), "node name"), (nid(2), "hostname"), (nid(3), "hostname")}
    assert all(c.winner is None for c in v.conflicts())
    assert host(v, "node-0-2.mesh.internal.").a == IPv4Address("10.200.0.2")  # still named
    ptr = v.get("2.0.200.10.in-addr.arpa.")
    assert isinstance(ptr, Pointer) and ptr.target == "node-0-2.mesh.internal."


def test_zone_must_be_a_dns_name_outside_arpa() -> None:
    with pytest.raises(ValueError):
        ZoneView(PLAN16, "bad_zone!")
    with pytest.raises(ValueError):
        ZoneView(PLAN16, "10.in-addr.arpa.")
    assert ZoneView(PLAN16, "Corp.Example").zone == "corp.example."


# ---------------------------------------------------------------------- conflicts


def test_two_members_with_one_node_name_the_earlier_admission_wins() -> None:
    old = member(7, "web", admitted=100.0)
    new = member(3, "web", admitted=200.0)  # lower id, but admitted later
    v = view(member(1), old, new)
    assert host(v, "web.mesh.internal.").node_id == nid(7)
    [c] = v.conflicts()
    assert (c.name, c.kind, c.node_id, c.winner) == (
        "web.mesh.internal.",
        "node name",
        nid(3),
        nid(7),
    )
    ptr = v.get("3.0.200.10.in-addr.arpa.")  # the loser's PTR falls back to its address name
    assert isinstance(ptr, Pointer) and ptr.target == "node-0-3.mesh.internal."


def test_equal_admission_times_fall_back_to_the_lower_node_id() -> None:
    v = view(member(1), member(9, "web", admitted=5.0), member(4, "web", admitted=5.0))
    assert host(v, "web.mesh.internal.").node_id == nid(4)


def test_a_node_name_beats_an_earlier_members_hostname() -> None:
    v = view(member(1, "alpha", "beta", admitted=1.0), member(2, "beta", admitted=50.0))
    assert host(v, "beta.mesh.internal.").node_id == nid(2)
    [c] = v.conflicts()
    assert (c.kind, c.node_id, c.winner) == ("hostname", nid(1), nid(2))


def test_two_hostnames_and_the_winner_leaving_hands_the_name_over() -> None:
    a, b = member(2, hostname="db", admitted=2.0), member(3, hostname="db", admitted=3.0)
    v = view(member(1), a, b)
    assert host(v, "db.mesh.internal.").node_id == nid(2)
    assert v.update(a, LEFT)
    assert host(v, "db.mesh.internal.").node_id == nid(3)
    assert v.conflicts() == []


def test_reserved_names_are_refused_unless_they_are_the_members_own() -> None:
    v = view(
        member(1, "alpha"),
        member(2, "leader"),
        member(3, "node-0-9", hostname="node-7"),  # 10.200.0.9 / fd00:200::7 are others'
        member(4, "node-4", hostname="node-0-4"),  # its own address names: fine
    )
    refused = {(c.name, c.node_id) for c in v.conflicts()}
    assert refused == {
        ("leader.mesh.internal.", nid(2)),
        ("node-0-9.mesh.internal.", nid(3)),
        ("node-7.mesh.internal.", nid(3)),
    }
    assert host(v, "leader.mesh.internal.").node_id == nid(1)
    assert v.get("node-0-9.mesh.internal.") is None  # nobody holds 10.200.0.9
    assert host(v, "node-4.mesh.internal.").node_id == nid(4)
    ptr = v.get("4.0.200.10.in-addr.arpa.")
    assert isinstance(ptr, Pointer) and ptr.target == "node-4.mesh.internal."


def test_names_outside_the_address_name_pattern_are_free() -> None:
    v = view(member(1), member(2, "node-01"), member(3, "node-0-300"), member(4, "node-g"))
    assert v.conflicts() == []
    for name in ("node-01", "node-0-300", "node-g"):
        assert v.get(f"{name}.mesh.internal.") is not None


def test_a_duplicate_address_is_reported_and_the_earlier_member_keeps_it() -> None:
    v = view(member(1), member(2, offset=5, admitted=1.0), member(3, offset=5, admitted=2.0))
    assert host(v, "node-0-5.mesh.internal.").node_id == nid(2)
    assert {c.name for c in v.conflicts() if c.node_id == nid(3)} == {
        "node-0-5.mesh.internal.", "node-5.mesh.internal.",
        reverse_name(IPv4Address("10.200.0.5")), reverse_name(IPv6Address("fd00:200::5")),
    }  # fmt: skip


# ------------------------------------------------------------------ who is in the zone


def test_suspect_members_stay_dead_and_left_ones_disappear() -> None:
    a, b, c = member(1, "alpha"), member(2, "beta", "www"), member(3, "gamma")
    v = view(a, b, c)
    names = {n for n, _ in v.entries()}
    assert v.update(b, SUSPECT) is False  # still in, nothing changed
    assert {n for n, _ in v.entries()} == names
    assert v.update(b, DEAD)
    for gone in ("beta.mesh.internal.", "www.mesh.internal.", "node-0-2.mesh.internal.",
                 "node-2.mesh.internal.", "2.0.200.10.in-addr.arpa."):  # fmt: skip
        assert v.get(gone) is None and not v.exists(gone)
    assert v.update(c, LEFT) and v.get("gamma.mesh.internal.") is None
    assert v.update(c, None) is False  # already gone
    assert v.update(b, ALIVE) and v.get("www.mesh.internal.") is not None
    v4, v6 = PLAN16.address(3)
    gamma = {"gamma.mesh.internal.", "node-0-3.mesh.internal.", "node-3.mesh.internal.",
             reverse_name(v4), reverse_name(v6)}  # fmt: skip
    assert gamma <= names
    assert {n for n, _ in v.entries()} == names - gamma


def test_the_leader_name_follows_the_leader_and_its_state() -> None:
    a, b = member(1, "alpha"), member(2, "beta")
    v = view(a, b)
    assert host(v, "leader.mesh.internal.").node_id == nid(1)
    assert v.set_leader(nid(2))
    assert host(v, "leader.mesh.internal.").node_id == nid(2)
    assert v.update(b, DEAD) and v.get("leader.mesh.internal.") is None
    assert not v.set_leader(nid(2))


def test_updates_report_whether_anything_changed_and_bump_the_version() -> None:
    v = view(member(1, "alpha"))
    version, serial = v.version, v.serial
    assert v.update(member(1, "alpha"), ALIVE) is False and v.version == version
    assert v.update(member(1, "alpha", "web"), ALIVE)
    assert v.version > version and v.serial != serial
    assert v.update(member(1, "alpha"), ALIVE)
    assert v.serial == serial  # the same content has the same serial
    assert v.remove(nid(99)) is False


def test_a_member_that_moves_to_another_address_takes_its_names_along() -> None:
    """Same names, same admission, another lease offset: every name of the member
    (node name, hostname, PTRs) follows, and the old address names are gone."""
    v = ZoneView(PLAN16, Z, self_id=nid(1))
    v.update(member(2, "web", "svc", 5), ALIVE)
    version = v.version
    assert v.update(member(2, "web", "svc", 6), ALIVE) and v.version > version
    for name in ("web.mesh.internal.", "svc.mesh.internal."):
        entry = v.get(name)
        assert isinstance(entry, Host) and str(entry.a) == "10.200.0.6", name
    assert v.get("5.0.200.10.in-addr.arpa.") is None
    ptr = v.get("6.0.200.10.in-addr.arpa.")
    assert isinstance(ptr, Pointer) and ptr.target == "web.mesh.internal."
    assert v.get("node-0-5.mesh.internal.") is None
    fresh = ZoneView.build(PLAN16, Z, [(member(2, "web", "svc", 6), ALIVE)], None, self_id=nid(1))
    assert snapshot(v) == snapshot(fresh)


def test_rows_list_every_record() -> None:
    v = view(member(1, "alpha"))
    rows = v.rows()
    assert {"name": "alpha.mesh.internal.", "type": "A", "address": "10.200.0.1", "ttl": 5,
            "node_id": nid(1).hex()} in rows  # fmt: skip
    assert {r["type"] for r in rows} == {"A", "AAAA", "PTR"}
    assert len(rows) == 2 * 4 + 2  # alpha, node-0-1, node-1, leader; two PTRs


def test_built_from_real_signed_records() -> None:
    from meshd.core.node import Node

    from .test_node_gossip import cluster

    net, nodes = cluster(3)
    net.advance(3.0)
    views = []
    for n in nodes:
        v = ZoneView(n.plan, n.config.zone, self_id=n.sign.node_id)

        def state_of(i: bytes, n: Node = n) -> MemberState | None:
            st = n.member_state(i)
            return st[0] if st is not None else None

        assert v.sync(n.store, state_of, n.leader)
        views.append(v)
    for name, addr in (("leader", "10.200.0.1"), ("n2", "10.200.0.2"), ("n3", "10.200.0.3")):
        assert str(host(views[0], f"{name}.mesh.internal.").a) == addr
    assert [list(v.entries()) for v in views[1:]] == [list(views[0].entries())] * 2
    assert views[0].sync(nodes[0].store, lambda i: ALIVE, nodes[0].leader) is False
    assert views[0].sync([], lambda i: ALIVE, nodes[0].leader)  # level-triggered: all gone
    assert len(views[0]) == 0


# -------------------------------------------------------------------- determinism

names = st.sampled_from(["web", "db", "alpha", "leader", "node-0-3", "node-2", "x.y", "Web"])
members_st = st.lists(
    st.builds(
        lambda i, name, host, off, adm: member(i, name, host, off, float(adm)),
        st.integers(1, 40),
        names,
        st.none() | names,
        st.integers(1, 30),
        st.integers(0, 5),
    ),
    max_size=14,
    unique_by=lambda m: m.node_id,
)
states = st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT, None])


@given(members_st, st.lists(states, min_size=14, max_size=14), st.randoms(), plans)
@settings(max_examples=60, deadline=None)
def test_the_zone_does_not_depend_on_the_order_members_arrive(
    ms: list[Member], sts: list[MemberState | None], rnd: random.Random, plan: AddressPlan
) -> None:
    pairs = list(zip(ms, sts, strict=False))
    leader = ms[0].node_id if ms else None
    a = ZoneView.build(plan, Z, pairs, leader, self_id=nid(1))
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    b = ZoneView.build(plan, Z, shuffled, leader, self_id=nid(1))
    assert snapshot(a) == snapshot(b)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 13),
            states,
            st.none() | names,  # None: keep the member's names (a pure move or state change)
            st.none() | names,
            st.none() | st.integers(1, 30),  # None: keep its address
        ),
        max_size=40,
    ),
    members_st,
)
@settings(max_examples=60, deadline=None)
def test_any_history_of_updates_ends_where_a_fresh_build_starts(
    ops: list[tuple[int, MemberState | None, str | None, str | None, int | None]],
    ms: list[Member],
) -> None:
    """Incremental maintenance (renames, moves to another address, state changes,
    removals, leader moves) equals building the final view from scratch."""
    if not ms:
        return
    v = ZoneView(PLAN16, Z, self_id=nid(1))
    final: dict[bytes, tuple[Member, MemberState | None]] = {}
    for k, (idx, state, name, hostname, offset) in enumerate(ops):
        base = ms[idx % len(ms)]
        prev = final.get(base.node_id, (base, None))[0]
        if name is None:
            name, hostname = prev.name, prev.hostname
        offset = prev.offset if offset is None else offset
        m = Member(base.node_id, name, hostname, offset, base.admitted_at)
        v.update(m, state)
        final[m.node_id] = (m, state)
        if k % 7 == 3:
            v.set_leader(m.node_id)
    fresh = ZoneView.build(PLAN16, Z, list(final.values()), v.leader, self_id=nid(1))
    assert snapshot(v) == snapshot(fresh)
    assert len(v._claims) == len(fresh._claims)
    for m, _ in final.values():
        v.remove(m.node_id)
    assert list(v.entries()) == [] and v._ent == {} and v._claims == {} and v.serial == 0
