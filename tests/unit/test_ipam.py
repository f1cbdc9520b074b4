"""Address plan, block leases and address assignment (meshd.core.ipam)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from meshd.core.ipam import (
    AddressPlan,
    BlockAllocator,
    BlockLease,
    InvalidCidr,
    IpamError,
    LeaseTable,
    NoAvailableBlocks,
    NoAvailableIps,
    UnknownLease,
)

DEFAULT = AddressPlan.parse()
# 4 blocks of 4: block 0 loses offset 0, block 3 loses offset 15.
TINY = AddressPlan.parse("10.0.0.0/28", "fd00::/124", block_prefix4=30)


def _roundtrip_json(value: object) -> Any:
    return json.loads(json.dumps(value))


# --- AddressPlan ---------------------------------------------------------------------------


def test_defaults() -> None:
    assert DEFAULT.cidr4 == IPv4Network("10.200.0.0/16")
    assert DEFAULT.cidr6 == IPv6Network("fd00:200::/48")
    assert DEFAULT.block_prefix4 == 28
    assert DEFAULT.block_size == 16
    assert DEFAULT.num_blocks == 4096
    assert DEFAULT.size == 65536


def test_mirror_mapping() -> None:
    v4, v6 = DEFAULT.address(5)
    assert v4 == IPv4Address("10.200.0.5")
    assert v6 == IPv6Address("fd00:200::5")
    assert DEFAULT.offset_of("10.200.0.5") == 5
    assert DEFAULT.offset_of("fd00:200::5") == 5
    assert DEFAULT.offset_of(IPv4Address("10.200.1.2")) == 258
    assert DEFAULT.offset_of(IPv6Address("fd00:200::102")) == 258
    assert DEFAULT.address(65535) == (IPv4Address("10.200.255.255"), IPv6Address("fd00:200::ffff"))


def test_blocks_mirror() -> None:
    assert DEFAULT.block(0) == (IPv4Network("10.200.0.0/28"), IPv6Network("fd00:200::/124"))
    assert DEFAULT.block(1) == (IPv4Network("10.200.0.16/28"), IPv6Network("fd00:200::10/124"))
    assert DEFAULT.block(4095) == (
        IPv4Network("10.200.255.240/28"),
        IPv6Network("fd00:200::fff0/124"),
    )
    assert DEFAULT.block_of_offset(15) == 0
    assert DEFAULT.block_of_offset(16) == 1
    assert DEFAULT.block_of_offset(65535) == 4095
    assert list(DEFAULT.offsets(2)) == list(range(32, 48))


@pytest.mark.parametrize(
    ("cidr4", "cidr6", "bp", "blocks", "size"),
    [
        ("10.0.0.0/8", "fd00::/64", 28, 2**20, 16),
        ("10.0.0.0/8", "fd00::/104", 16, 256, 65536),
        ("192.168.7.0/24", "fd12:3456::/64", 28, 16, 16),
        ("192.168.7.0/24", "fd12:3456::/120", 24, 1, 256),
        ("172.16.0.0/12", "fd00::/48", 20, 256, 4096),
        ("10.0.0.0/30", "fd00::/126", 30, 1, 4),
        ("100.64.0.0/10", "fd00:1::/64", 30, 2**20, 4),
    ],
)
def test_other_sizes(cidr4: str, cidr6: str, bp: int, blocks: int, size: int) -> None:
    plan = AddressPlan.parse(cidr4, cidr6, bp)
    assert plan.num_blocks == blocks
    assert plan.block_size == size
    last = plan.num_blocks - 1
    v4, v6 = plan.block(last)
    assert v4.broadcast_address == plan.cidr4.broadcast_address
    assert v4.prefixlen == bp and v6.prefixlen == 96 + bp
    assert plan.offset_of(v6.network_address) == plan.offset_of(v4.network_address)


def test_eight_wide_mirror() -> None:
    plan = AddressPlan.parse("10.0.0.0/8", "fd00:200::/48")
    assert plan.address(plan.offset_of("10.1.2.3"))[1] == IPv6Address("fd00:200::1:203")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"cidr4": "10.200.0.1/16"}, ["host bits", "did you mean 10.200.0.0/16"]),
        ({"cidr6": "fd00:200::1/48"}, ["host bits", "fd00:200::/48"]),
        ({"cidr4": "fd00::/48"}, ["IPv6", "not IPv4"]),
        ({"cidr6": "10.0.0.0/8"}, ["IPv4", "not IPv6"]),
        ({"cidr4": "10.0.0.0/31"}, ["10.0.0.0/31", "no room"]),
        ({"cidr4": "10.0.0.0/32"}, ["10.0.0.0/32", "no room"]),
        ({"cidr4": "10.0.0.0/29"}, ["smaller than one /28 block"]),
        ({"cidr4": "10.0.0.0/24", "block_prefix4": 23}, ["smaller than one /23 block"]),
        ({"block_prefix4": 15}, ["/15", "out of range"]),
        ({"block_prefix4": 31}, ["/31", "out of range"]),
        ({"cidr4": "10.0.0.0/8", "cidr6": "fd00::/112"}, ["too small to mirror", "/104"]),
        ({"cidr4": "127.0.0.0/16"}, ["loopback", "127.0.0.0/8"]),
        ({"cidr4": "0.0.0.0/16"}, ["0.0.0.0/8"]),
        ({"cidr4": "169.254.0.0/16"}, ["link-local", "169.254.0.0/16"]),
        ({"cidr4": "224.1.0.0/16"}, ["multicast", "224.0.0.0/4"]),
        ({"cidr4": "240.0.0.0/16"}, ["240.0.0.0/4"]),
        ({"cidr4": "64.0.0.0/2"}, ["127.0.0.0/8"]),
        ({"cidr6": "::/48"}, ["unspecified", "::/128"]),
        ({"cidr6": "::/127"}, ["::/128"]),
        ({"cidr6": "fe80::/64"}, ["link-local", "fe80::/10"]),
        ({"cidr6": "ff02::/64"}, ["multicast", "ff00::/8"]),
        ({"cidr4": "10.200.0.0"}, ["no prefix length"]),
        ({"cidr4": "banana/16"}, ["'banana/16'", "not a valid"]),
        ({"cidr4": ""}, ["no prefix length"]),
        ({"cidr6": "fe80::%eth0/64"}, ["scope"]),
        ({"cidr4": 16}, ["must be a string"]),
        ({"block_prefix4": "28"}, ["integer"]),
        ({"block_prefix4": True}, ["integer"]),
    ],
)
def test_parse_errors(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(InvalidCidr) as err:
        AddressPlan.parse(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_parse_tolerates_whitespace_and_netmasks() -> None:
    assert AddressPlan.parse(" 10.200.0.0/16 ") == DEFAULT
    assert AddressPlan.parse("10.200.0.0/255.255.0.0") == DEFAULT


@pytest.mark.parametrize(
    ("cidr4", "avoid", "shown"),
    [
        ("10.0.0.0/8", ["10.1.2.3"], "10.1.2.3"),
        ("10.0.0.0/8", ["10.1.2.3:51820"], "10.1.2.3"),
        ("10.0.0.0/8", ["192.168.0.0/16", "10.9.0.0/16"], "10.9.0.0/16"),
        ("10.200.0.0/16", ["10.0.0.0/8"], "10.0.0.0/8"),
        ("10.200.0.0/16", ["[fd00:200::7]:51820"], "fd00:200::7"),
        ("10.200.0.0/16", ["fd00:200:0:1::/64"], "fd00:200:0:1::/64"),
    ],
)
def test_parse_avoid(cidr4: str, avoid: list[str], shown: str) -> None:
    with pytest.raises(InvalidCidr) as err:
        AddressPlan.parse(cidr4, avoid=avoid)
    msg = str(err.value)
    assert "overlaps" in msg and shown in msg
    assert cidr4 in msg or "fd00:200::/48" in msg


def test_parse_avoid_label_and_harmless_entries() -> None:
    with pytest.raises(InvalidCidr, match=r"overlaps 10\.1\.2\.3 \(advertise address\)"):
        AddressPlan.parse("10.0.0.0/8", avoid={"10.1.2.3": "advertise address"})
    with pytest.raises(InvalidCidr, match=r"overlaps 10\.1\.2\.3"):
        AddressPlan.parse("10.0.0.0/8", avoid="10.1.2.3")  # a bare string is one entry
    ok = AddressPlan.parse(
        avoid=["192.168.1.10:51820", "[2001:db8::1]:51820", "node1.example.com:51820", "", "x"]
    )
    assert ok == DEFAULT
    with pytest.raises(InvalidCidr, match="strings"):
        AddressPlan.parse(avoid=[3])  # type: ignore[list-item]


def test_single_block_plan() -> None:
    plan = AddressPlan.parse("10.0.0.0/28", "fd00::/64", 28)
    assert plan.num_blocks == 1
    alloc = BlockAllocator(plan, [0])
    got = [alloc.assign(f"m{i}") for i in range(14)]
    assert got == list(range(1, 15))  # both the network and broadcast offsets are skipped
    with pytest.raises(NoAvailableIps):
        alloc.assign("one-too-many")


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidCidr, match="no room"):
        AddressPlan(IPv4Network("10.0.0.0/31"), IPv6Network("fd00::/64"), 28)
    with pytest.raises(InvalidCidr, match="IPv6 network"):
        AddressPlan(IPv4Network("10.0.0.0/16"), IPv4Network("10.1.0.0/16"))  # type: ignore[arg-type]


def test_lookups_out_of_range() -> None:
    bad: object
    for bad in (-1, 4096, 10**30, True, "1", 1.0):
        with pytest.raises(IpamError, match="block"):
            DEFAULT.block(bad)  # type: ignore[arg-type]
    for bad in (-1, 65536, 10**30, None):
        with pytest.raises(IpamError, match="offset"):
            DEFAULT.address(bad)  # type: ignore[arg-type]
        with pytest.raises(IpamError, match="offset"):
            DEFAULT.block_of_offset(bad)  # type: ignore[arg-type]
        with pytest.raises(IpamError, match="offset"):
            DEFAULT.is_reserved(bad)  # type: ignore[arg-type]
    for addr in ("10.201.0.1", "fd00:201::1", "fd00:200::1:0", "nonsense", "10.200.0.0/16"):
        with pytest.raises(IpamError):
            DEFAULT.offset_of(addr)
    with pytest.raises(IpamError):
        DEFAULT.offset_of(42)  # type: ignore[arg-type]


def test_reserved_offsets() -> None:
    assert DEFAULT.is_reserved(0)
    assert DEFAULT.is_reserved(65535)
    assert not DEFAULT.is_reserved(1)
    assert not DEFAULT.is_reserved(15)
    assert not DEFAULT.is_reserved(16)
    assert not DEFAULT.is_reserved(65534)
    assert [TINY.usable_in_block(b) for b in range(4)] == [3, 4, 4, 3]


def test_plan_dict_roundtrip() -> None:
    for plan in (DEFAULT, TINY, AddressPlan.parse("10.0.0.0/8", "fd00::/64", 20)):
        d = _roundtrip_json(plan.to_dict())
        assert AddressPlan.from_dict(d) == plan


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        [],
        "10.200.0.0/16",
        {},
        {"cidr4": "10.200.0.0/16", "cidr6": "fd00:200::/48"},
        {"cidr4": "10.200.0.0/16", "cidr6": "fd00:200::/48", "block_prefix4": "28"},
        {"cidr4": "10.200.0.0/16", "cidr6": "fd00:200::/48", "block_prefix4": 28.0},
        {"cidr4": "10.200.0.0/16", "cidr6": "fd00:200::/48", "block_prefix4": 2**80},
        {"cidr4": "10.200.0.0/16", "cidr6": None, "block_prefix4": 28},
        {"cidr4": ["10.200.0.0/16"], "cidr6": "fd00:200::/48", "block_prefix4": 28},
        {"cidr4": "10.200.0.1/16", "cidr6": "fd00:200::/48", "block_prefix4": 28},
    ],
)
def test_plan_from_dict_garbage(garbage: object) -> None:
    with pytest.raises(InvalidCidr):
        AddressPlan.from_dict(garbage)


# --- LeaseTable ----------------------------------------------------------------------------


def test_lease_table_grants_lowest_free_block() -> None:
    table = LeaseTable(TINY)
    a = table.grant("a", "L", 10.0)
    b = table.grant("b", "L", 11.0, ttl=5.0)
    assert (a.block, a.holder, a.granted_by, a.granted_at, a.expires) == (0, "a", "L", 10.0, None)
    assert (b.block, b.expires) == (1, 16.0)
    assert table.grant("a", "L", 12.0).block == 2
    assert table.release(1, "b") == b
    assert table.grant("c", "L", 13.0).block == 1
    assert table.grant("c", "L", 13.0).block == 3
    with pytest.raises(NoAvailableBlocks, match=r"all 4 address blocks of 10\.0\.0\.0/28"):
        table.grant("d", "L", 14.0)
    assert [x.block for x in table.leases()] == [0, 1, 2, 3]
    assert [x.block for x in table.held_by("a")] == [0, 2]
    assert table.holder_of(1) == "c"
    assert table.holder_of(99) is None


def test_lease_table_release() -> None:
    table = LeaseTable(TINY)
    table.grant("a", "L", 0.0)
    with pytest.raises(UnknownLease, match="leased to a, not b"):
        table.release(0, "b")
    with pytest.raises(UnknownLease, match="not leased"):
        table.release(1, "a")
    table.grant("a", "L", 0.0)
    table.grant("b", "L", 0.0)
    assert [x.block for x in table.release_holder("a")] == [0, 1]
    assert table.release_holder("a") == []
    assert [x.holder for x in table.leases()] == ["b"]


def test_lease_table_expire() -> None:
    table = LeaseTable(TINY)
    table.grant("a", "L", 0.0, ttl=10.0)
    table.grant("b", "L", 0.0)
    table.grant("c", "L", 5.0, ttl=10.0)
    assert table.expire(9.9) == []
    assert [x.holder for x in table.expire(10.0)] == ["a"]  # expires <= now
    assert [x.holder for x in table.expire(1e9)] == ["c"]
    assert [x.holder for x in table.leases()] == ["b"]


def test_lease_table_grant_block_and_bad_ttl() -> None:
    table = LeaseTable(TINY)
    assert table.grant_block(2, "a", "L", 0.0).block == 2
    with pytest.raises(IpamError, match="already leased to a"):
        table.grant_block(2, "b", "L", 0.0)
    with pytest.raises(IpamError, match="outside"):
        table.grant_block(4, "b", "L", 0.0)
    for ttl in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(IpamError, match="ttl"):
            table.grant("b", "L", 0.0, ttl=ttl)
    with pytest.raises(IpamError, match="holder"):
        table.grant("", "L", 0.0)
    assert [x.block for x in table.leases()] == [2]  # failed grants leave no trace


def test_lease_table_init_rejects_bad_leases() -> None:
    with pytest.raises(IpamError, match="twice"):
        LeaseTable(TINY, [BlockLease(1, "a", "L", 0, None), BlockLease(1, "b", "L", 0, None)])
    with pytest.raises(IpamError, match="outside"):
        LeaseTable(TINY, [BlockLease(4, "a", "L", 0, None)])
    with pytest.raises(IpamError):
        LeaseTable(TINY, [{"block": 1}])  # type: ignore[list-item]


def test_lease_table_roundtrip() -> None:
    table = LeaseTable(DEFAULT)
    table.grant("a", "L", 1.5)
    table.grant("b", "L", 2.0, ttl=30)
    table.grant_block(77, "c", "b", 3)
    data = _roundtrip_json(table.to_list())
    again = LeaseTable.from_list(DEFAULT, data)
    assert again.leases() == table.leases()
    assert again.to_list() == table.to_list()


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        {},
        "[]",
        [None],
        [[]],
        [{}],
        [{"block": "0", "holder": "a", "granted_by": "L", "granted_at": 0, "expires": None}],
        [{"block": True, "holder": "a", "granted_by": "L", "granted_at": 0, "expires": None}],
        [{"block": -1, "holder": "a", "granted_by": "L", "granted_at": 0, "expires": None}],
        [{"block": 4, "holder": "a", "granted_by": "L", "granted_at": 0, "expires": None}],
        [{"block": 0, "holder": "", "granted_by": "L", "granted_at": 0, "expires": None}],
        [{"block": 0, "holder": 7, "granted_by": "L", "granted_at": 0, "expires": None}],
        [{"block": 0, "holder": "a", "granted_by": None, "granted_at": 0, "expires": None}],
        [{"block": 0, "holder": "a", "granted_by": "L", "granted_at": "0", "expires": None}],
        [{"block": 0, "holder": "a", "granted_by": "L", "granted_at": 10**400, "expires": None}],
        [{"block": 0, "holder": "a", "granted_by": "L", "granted_at": float("nan")}],
        [{"block": 0, "holder": "a", "granted_by": "L", "granted_at": 0, "expires": "soon"}],
        [{"block": 0, "holder": "a", "granted_by": "L", "granted_at": 0, "expires": False}],
        [
            {"block": 0, "holder": "a", "granted_by": "L", "granted_at": 0, "expires": None},
            {"block": 0, "holder": "b", "granted_by": "L", "granted_at": 0, "expires": None},
        ],
    ],
)
def test_lease_table_from_list_garbage(garbage: object) -> None:
    with pytest.raises(IpamError):
        LeaseTable.from_list(TINY, garbage)


def test_block_lease_dict_roundtrip() -> None:
    lease = BlockLease(3, "holder", "leader", 1.25, 61.25)
    assert BlockLease.from_dict(_roundtrip_json(lease.to_dict())) == lease
    forever = BlockLease(0, "h", "", 0.0, None)
    assert BlockLease.from_dict(_roundtrip_json(forever.to_dict())) == forever


# --- BlockAllocator ------------------------------------------------------------------------


def test_allocator_assigns_lowest_free_and_skips_reserved() -> None:
    alloc = BlockAllocator(TINY, [3, 0])
    assert alloc.blocks() == [0, 3]
    assert alloc.free_count() == 6
    got = [alloc.assign(name) for name in "abcdef"]
    assert got == [1, 2, 3, 12, 13, 14]  # never 0 (network) nor 15 (broadcast)
    assert alloc.free_count() == 0
    with pytest.raises(NoAvailableIps) as err:
        alloc.assign("g")
    assert "6" in str(err.value) and "2 block" in str(err.value)
    alloc.add_block(1)
    assert alloc.assign("g") == 4


def test_allocator_without_blocks() -> None:
    alloc = BlockAllocator(TINY)
    assert alloc.free_count() == 0
    with pytest.raises(NoAvailableIps, match="no address block"):
        alloc.assign("a")


def test_allocator_idempotent_assign() -> None:
    alloc = BlockAllocator(DEFAULT, [5])
    first = alloc.assign("joiner")
    assert first == 80
    assert alloc.assign("joiner") == first
    assert alloc.assign("joiner") == first
    assert alloc.assign("other") == 81
    assert alloc.assignment("joiner") == first
    assert alloc.free_count() == 14


def test_allocator_release_then_reassign() -> None:
    alloc = BlockAllocator(TINY, [1])
    assert [alloc.assign(n) for n in "abc"] == [4, 5, 6]
    assert alloc.release("b") == 5
    assert alloc.release("b") is None
    assert alloc.assignment("b") is None
    assert alloc.assign("d") == 5  # lowest free first
    assert alloc.assign("b") == 7
    assert alloc.assignments() == {"a": 4, "d": 5, "c": 6, "b": 7}
    assert list(alloc.assignments().values()) == [4, 5, 6, 7]


def test_allocator_remove_block() -> None:
    alloc = BlockAllocator(TINY, [0, 1])
    for n in "abcde":
        alloc.assign(n)
    assert alloc.remove_block(0) == ["a", "b", "c"]
    assert alloc.assignments() == {"d": 4, "e": 5}
    assert alloc.blocks() == [1]
    with pytest.raises(UnknownLease):
        alloc.remove_block(0)
    alloc.add_block(0)
    alloc.add_block(0)  # already held: no-op
    assert alloc.assign("a") == 1


def test_allocator_bad_input() -> None:
    alloc = BlockAllocator(TINY, [0])
    with pytest.raises(IpamError):
        alloc.assign("")
    for bad in (4, -1, True, "0"):
        with pytest.raises(IpamError):
            alloc.add_block(bad)  # type: ignore[arg-type]
    with pytest.raises(IpamError, match="not in a block"):
        BlockAllocator(TINY, [0], {"a": 5})
    with pytest.raises(IpamError, match="reserved"):
        BlockAllocator(TINY, [0], {"a": 0})
    with pytest.raises(IpamError, match="reserved"):
        BlockAllocator(TINY, [3], {"a": 15})
    with pytest.raises(IpamError, match="both a and b"):
        BlockAllocator(TINY, [0], {"a": 1, "b": 1})


def test_allocator_roundtrip() -> None:
    alloc = BlockAllocator(DEFAULT, [9, 2])
    for n in ("x", "y", "z"):
        alloc.assign(n)
    alloc.release("y")
    data = _roundtrip_json(alloc.to_dict())
    again = BlockAllocator.from_dict(DEFAULT, data)
    assert again.to_dict() == alloc.to_dict()
    assert again.blocks() == [2, 9]
    assert again.assign("w") == alloc.assign("w")
    assert again.free_count() == alloc.free_count()


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        [],
        {},
        {"blocks": [0]},
        {"assignments": {}},
        {"blocks": "0", "assignments": {}},
        {"blocks": [0], "assignments": []},
        {"blocks": [None], "assignments": {}},
        {"blocks": [[0]], "assignments": {}},
        {"blocks": [1.0], "assignments": {}},
        {"blocks": [4], "assignments": {}},
        {"blocks": [-1], "assignments": {}},
        {"blocks": [0, 0], "assignments": {}},
        {"blocks": [0], "assignments": {"a": "1"}},
        {"blocks": [0], "assignments": {"a": None}},
        {"blocks": [0], "assignments": {"a": 1.0}},
        {"blocks": [0], "assignments": {"a": 10**40}},
        {"blocks": [0], "assignments": {"a": 5}},
        {"blocks": [0], "assignments": {"a": 0}},
        {"blocks": [0], "assignments": {"a": 1, "b": 1}},
        {"blocks": [0], "assignments": {"": 1}},
        {"blocks": [0], "assignments": {1: 1}},
    ],
)
def test_allocator_from_dict_garbage(garbage: object) -> None:
    with pytest.raises(IpamError):
        BlockAllocator.from_dict(TINY, garbage)


# --- properties ----------------------------------------------------------------------------

PLANS = [
    TINY,
    AddressPlan.parse("10.0.0.0/30", "fd00::/126", 30),  # one block, both ends reserved
    AddressPlan.parse("10.0.0.0/27", "fd00::/64", 29),
    AddressPlan.parse("192.168.0.0/24", "fd00:1::/120", 28),
]
HOLDERS = ["h1", "h2", "h3"]
ASSIGNEES = st.sampled_from(["a", "b", "c", "d", "e", "f", "g"])


class MeshIpam(RuleBasedStateMachine):
    """A leader's LeaseTable and one BlockAllocator per holder, driven at random."""

    @initialize(plan=st.sampled_from(PLANS))
    def setup(self, plan: AddressPlan) -> None:
        self.plan = plan
        self.table = LeaseTable(plan)
        self.allocs = {h: BlockAllocator(plan) for h in HOLDERS}
        self.now = 0.0

    @rule(holder=st.sampled_from(HOLDERS), ttl=st.none() | st.sampled_from([1.0, 5.0]))
    def grant(self, holder: str, ttl: float | None) -> None:
        full = len(self.table.leases()) == self.plan.num_blocks
        try:
            lease = self.table.grant(holder, "leader", self.now, ttl)
        except NoAvailableBlocks:
            assert full
            return
        assert not full
        free = [b for b in range(self.plan.num_blocks) if self.table.holder_of(b) is None]
        assert free == [] or lease.block < min(free)  # lowest free block first
        self.allocs[holder].add_block(lease.block)

    @rule(holder=st.sampled_from(HOLDERS), data=st.data())
    def release_block(self, holder: str, data: st.DataObject) -> None:
        held = self.table.held_by(holder)
        if not held:
            with pytest.raises(UnknownLease):
                self.table.release(0, holder + "-not")
            return
        lease = data.draw(st.sampled_from(held))
        self.table.release(lease.block, holder)
        alloc = self.allocs[holder]
        before = alloc.assignments()
        lost = alloc.remove_block(lease.block)
        assert lost == [w for w, o in before.items() if self.plan.block_of_offset(o) == lease.block]

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0]))
    def expire(self, dt: float) -> None:
        self.now += dt
        for lease in self.table.expire(self.now):
            assert lease.expires is not None and lease.expires <= self.now
            self.allocs[lease.holder].remove_block(lease.block)

    @rule(holder=st.sampled_from(HOLDERS), who=ASSIGNEES)
    def assign(self, holder: str, who: str) -> None:
        alloc = self.allocs[holder]
        had = alloc.assignment(who)
        used = set(alloc.assignments().values())
        candidates = [
            o
            for b in alloc.blocks()
            for o in self.plan.offsets(b)
            if o not in used and not self.plan.is_reserved(o)
        ]
        try:
            offset = alloc.assign(who)
        except NoAvailableIps:
            assert had is None and not candidates
            return
        if had is not None:
            assert offset == had  # idempotent
        else:
            assert offset == min(candidates)  # lowest free offset first
        assert alloc.assign(who) == offset

    @rule(holder=st.sampled_from(HOLDERS), who=ASSIGNEES)
    def release(self, holder: str, who: str) -> None:
        alloc = self.allocs[holder]
        had = alloc.assignment(who)
        assert alloc.release(who) == had
        assert alloc.assignment(who) is None

    @rule()
    def persist_and_reload(self) -> None:
        self.table = LeaseTable.from_list(self.plan, _roundtrip_json(self.table.to_list()))
        self.allocs = {
            h: BlockAllocator.from_dict(self.plan, _roundtrip_json(a.to_dict()))
            for h, a in self.allocs.items()
        }

    @invariant()
    def no_address_twice(self) -> None:
        seen: dict[int, str] = {}
        for holder, alloc in self.allocs.items():
            blocks = alloc.blocks()
            assert blocks == [x.block for x in self.table.held_by(holder)]
            usable = sum(self.plan.usable_in_block(b) for b in blocks)
            assert alloc.free_count() == usable - len(alloc.assignments())
            for who, offset in alloc.assignments().items():
                assert offset not in seen, f"{offset} given to {seen[offset]} and {who}"
                seen[offset] = f"{holder}/{who}"
                assert not self.plan.is_reserved(offset)
                assert self.plan.block_of_offset(offset) in blocks

    @invariant()
    def no_block_twice(self) -> None:
        blocks = [x.block for x in self.table.leases()]
        assert blocks == sorted(set(blocks))
        assert all(0 <= b < self.plan.num_blocks for b in blocks)


MeshIpam.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, database=None
)
TestMeshIpam = MeshIpam.TestCase


@given(plan=st.sampled_from([*PLANS, DEFAULT]), data=st.data())
@settings(max_examples=100, deadline=None)
def test_mirror_is_consistent(plan: AddressPlan, data: st.DataObject) -> None:
    offset = data.draw(st.integers(0, plan.size - 1))
    v4, v6 = plan.address(offset)
    assert plan.offset_of(v4) == plan.offset_of(v6) == plan.offset_of(str(v6)) == offset
    block = plan.block_of_offset(offset)
    net4, net6 = plan.block(block)
    assert v4 in net4 and v6 in net6
    assert offset in plan.offsets(block)


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["10.200.0.0/16", "fd00:200::/48", "10.0.0.0/28", "a", ""])
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
small_int = st.integers(-2, 20) | st.booleans() | st.floats(-1, 20)
lease_like = st.fixed_dictionaries(
    {
        "block": small_int | json_leaf,
        "holder": st.sampled_from(["a", "b", ""]) | json_leaf,
        "granted_by": st.sampled_from(["L", ""]) | json_leaf,
        "granted_at": small_int | json_leaf,
    },
    optional={"expires": small_int | json_leaf},
)
allocator_like = st.fixed_dictionaries(
    {
        "blocks": st.lists(small_int, max_size=5) | json_value,
        "assignments": st.dictionaries(
            st.sampled_from(["a", "b", "c", ""]) | st.text(max_size=3), small_int, max_size=5
        )
        | json_value,
    }
)
plan_like = st.fixed_dictionaries(
    {
        "cidr4": st.sampled_from(["10.200.0.0/16", "10.0.0.0/28", "10.0.0.1/28", "x"]) | json_leaf,
        "cidr6": st.sampled_from(["fd00:200::/48", "fd00::/124", "::1/128"]) | json_leaf,
        "block_prefix4": st.integers(10, 34) | json_leaf,
    }
)


@given(
    plan_d=plan_like | json_value,
    leases=st.lists(lease_like, max_size=5) | json_value,
    alloc_d=allocator_like | json_value,
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_from_dict_only_raises_ipam_error(plan_d: Any, leases: Any, alloc_d: Any) -> None:
    try:
        plan = AddressPlan.from_dict(plan_d)
    except IpamError:
        plan = TINY
    else:
        assert AddressPlan.from_dict(plan.to_dict()) == plan
    for entry in leases if isinstance(leases, list) else [leases]:
        try:
            lease = BlockLease.from_dict(entry)
        except IpamError:
            continue
        assert BlockLease.from_dict(lease.to_dict()) == lease
    try:
        table = LeaseTable.from_list(plan, leases)
    except IpamError:
        pass
    else:
        assert LeaseTable.from_list(plan, table.to_list()).leases() == table.leases()
    try:
        alloc = BlockAllocator.from_dict(plan, alloc_d)
    except IpamError:
        pass
    else:
        assert BlockAllocator.from_dict(plan, alloc.to_dict()).to_dict() == alloc.to_dict()


def _cidr_text(version: Literal[4, 6]) -> st.SearchStrategy[str]:
    addrs = st.ip_addresses(v=version).map(str)
    bits = 32 if version == 4 else 128
    prefixes = st.integers(0, bits + 2).map(str) | st.text("0123456789x ", max_size=4)
    return st.tuples(addrs, prefixes).map("/".join)


cidr_text = (
    _cidr_text(4)
    | _cidr_text(6)
    | st.ip_addresses().map(str)
    | st.text(max_size=30)
    | st.text("0123456789abcdef.:/%[] ", max_size=30)
    | st.sampled_from(["10.200.0.0/16", "fd00:200::/48", "10.0.0.0/8", "fd00::/64"])
)


@given(
    cidr4=cidr_text,
    cidr6=cidr_text,
    bp=st.integers(-5, 40) | st.sampled_from([28, 24, 16, 30]),
    avoid=st.lists(cidr_text | st.ip_addresses().map(str), max_size=3),
)
@settings(max_examples=200, deadline=None)
def test_parse_only_raises_invalid_cidr(cidr4: str, cidr6: str, bp: int, avoid: list[str]) -> None:
    try:
        plan = AddressPlan.parse(cidr4, cidr6, bp, avoid)
    except InvalidCidr as exc:
        assert str(exc)
        return
    assert plan.num_blocks >= 1
    assert plan.cidr6.num_addresses >= plan.cidr4.num_addresses
    assert plan.cidr4.prefixlen <= plan.block_prefix4 == bp
    assert AddressPlan.from_dict(plan.to_dict()) == plan
    assert plan.offset_of(plan.address(plan.size - 2)[1]) == plan.size - 2
