"""Every parser that sees untrusted bytes either succeeds or raises its module's rejection.

For each decoder: random bytes, byte-level mutations of a genuine object (flip, cut,
append, overwrite, insert, delete) and structured mutations of its msgpack body (drop
a field, give a field a value of another type, add junk, replace the whole thing),
re-signed with the right key where the signature is checked first, so the checks
behind it see the hostile fields. The only exception allowed out is ``WireError``
(``TokenError`` for ``parse_token``); whatever is accepted must satisfy the
invariants its caller relies on. ``JoinClient.receive`` and ``Node.receive`` never
raise at all (their callers are the agent's datagram loop).
"""

from __future__ import annotations

import base64
import functools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.core import join, wire
from meshd.core.admission import (
    ADMISSION_DOMAIN,
    LEASE_DOMAIN,
    Admission,
    Lease,
    TokenClaims,
    TokenError,
    issue_admission,
    mint_token,
    parse_token,
    sign_lease,
    token_secret,
    verify_admission,
    verify_lease,
)
from meshd.core.crypto import SignedBlob, SigningKey, WireGuardKey, mac, node_id
from meshd.core.ipam import AddressPlan
from meshd.core.join import JoinClient, JoinFailed, JoinGrant, JoinState, JoinSucceeded
from meshd.core.node import CONTROL_DOMAIN, Admitted, ControlFailed, Node, Op
from meshd.core.records import RECORD_DOMAIN, PeerRecord, RecordStore, sign_record, verify_record
from meshd.core.wire import DropReason, Keyring, Kind, WireError
from protocols.vectors.generate import seed

from .corenet import Net

T = TypeVar("T")

NOW = 1_790_000_000.0
PLAN = AddressPlan.parse("10.200.0.0/16", "fd00:200::/48", 28)
CA = SigningKey(seed(1))
HOLDER = SigningKey(seed(2))
MEMBER = SigningKey(seed(3))
MEMBER_WG = WireGuardKey(seed(4))
KEYRING = Keyring([seed(5), seed(6)])
TOKEN_KEY = seed(7)
RID = seed(9)[:16]
JOINER_EPH = WireGuardKey(seed(11))
SEED_EPH = WireGuardKey(seed(12))
STRANGER = SigningKey(seed(13))

FAST = settings(max_examples=100, deadline=None)
MEDIUM = settings(max_examples=50, deadline=None)
SLOW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# X25519 public keys whose shared secret is all zeros (RFC 7748 section 6.1).
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
    (2**255 - 19 + 1).to_bytes(32, "little"),
]


def accept_or_reject(fn: Callable[[], T], allowed: type[Exception] = WireError) -> T | None:
    """``fn()``'s result, or None if it raised ``allowed``; anything else fails the test."""
    try:
        return fn()
    except allowed:
        return None


# ------------------------------------------------------------------------ the genuine set

LEASE = sign_lease(CA, 0, HOLDER.public, NOW)
ADMISSION = issue_admission(HOLDER, LEASE, MEMBER.public, MEMBER_WG.public, 2, NOW)
RECORD = sign_record(
    MEMBER,
    seq=3,
    name="node2",
    hostname="db.example",
    wg_key=MEMBER_WG.public,
    endpoints=["192.0.2.10:7946", "[2001:db8::1]:7946"],
    now=NOW,
    version="0.1.0",
    admission=ADMISSION.blob,
)
SEALED = KEYRING.seal(
    wire.pack({"t": "push", "recs": [RECORD.to_wire()], "leases": [], "ack": True}),
    lambda n: bytes(n),
)
TOKEN, CLAIMS = mint_token(TOKEN_KEY, HOLDER.node_id, CA.public, seed(8)[:8], NOW, 3600, 1)
SECRET = token_secret(TOKEN_KEY, CLAIMS.raw)
REQUEST_FIELDS: dict[str, Any] = {
    "rid": RID,
    "ck": seed(10)[:16],
    "tok": CLAIMS.raw,
    "eph": JOINER_EPH.public,
    "sk": MEMBER.public,
    "wg": MEMBER_WG.public,
    "name": "node2",
    "host": None,
    "ep": ["192.0.2.10:7946"],
}
REQUEST = join.encode_request(
    request_id=RID,
    cookie=seed(10)[:16],
    claims_raw=CLAIMS.raw,
    secret=SECRET,
    reply_key=JOINER_EPH.public,
    sign=MEMBER,
    wg_key=MEMBER_WG.public,
    name="node2",
    hostname=None,
    endpoints=["192.0.2.10:7946"],
)
COOKIE = join.encode_cookie(RID, seed(10)[:16])
ERRORS = [join.encode_error(RID, code, SECRET) for code in join.JoinErrorCode] + [
    join.encode_error(RID, join.JoinErrorCode.BAD_TOKEN, None)
]
GRANT = JoinGrant(
    admission=ADMISSION.blob,
    ca_public=CA.public,
    keyring=tuple(KEYRING.keys()),
    token_key=TOKEN_KEY,
    plan=PLAN,
    zone="mesh.internal.",
    leader=HOLDER.node_id,
    seed=HOLDER.node_id,
    records=(RECORD,),
    leases=(LEASE.blob,),
)
REPLY = join.seal_reply(GRANT.encode() * 3, RID, SECRET, JOINER_EPH.public, SEED_EPH)
assert len(REPLY) > 1  # several chunks, so reassembly is exercised

# ---------------------------------------------------------------------------- strategies

INTS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(
        [0, 1, -1, 2, 15, 16, 17, 31, 32, 4095, 4096, 65534, 65535, 65536, 2**31, 2**40, 2**63]
    ),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([NOW, NOW + 3600, 0.0, -0.0, float("nan"), float("inf")]),
)
BINS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([8, 16, 32, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
)
TEXTS = st.one_of(
    st.text(max_size=24),
    st.sampled_from(
        [
            "",
            "push",
            "ctl",
            "rsp",
            "release",
            "lease",
            "tok_use",
            "192.0.2.1:7946",
            "[2001:db8::1]:7946",
            "[::1",
            ":7946",
            "host:0",
            "host:99999",
            "host:²",
            "a:b:c",
            "10.200.0.0/16",
            "10.200.0.1/16",
            "fd00:200::/48",
            "fd00::%eth0/48",
            "0.0.0.0/0",
            "x" * 300,
        ]
    ),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXTS, BINS)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(TEXTS, inner, max_size=4),
    ),
    max_leaves=10,
)


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_ops: int = 4) -> bytes:
    """``data`` after a few byte-level edits."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "cut", "append", "set", "insert", "delete"]))
        if op == "append":
            buf += draw(st.binary(min_size=1, max_size=16))
            continue
        if not buf:
            continue
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del buf[i:]
        elif op == "set":
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i : i + draw(st.integers(1, 8))]
    return bytes(buf)


def similar(value: Any) -> st.SearchStrategy[Any]:
    """A hostile value of the same msgpack type as ``value`` (wrong length, range, text)."""
    if isinstance(value, bytes):
        n = len(value)
        return st.one_of(
            st.binary(min_size=n, max_size=n),
            st.binary(max_size=n + 2),
            st.just(value[:-1] + bytes([value[-1] ^ 1]) if value else b"\x00"),
        )
    if isinstance(value, bool):
        return st.one_of(st.booleans(), INTS)
    if isinstance(value, int):
        return st.one_of(INTS, st.integers(value - 40, value + 40), st.just(float(value)))
    if isinstance(value, float):
        near = st.floats(value - 10, value + 10) if math.isfinite(value) else FLOATS
        return st.one_of(FLOATS, INTS, near)
    if isinstance(value, str):
        return st.one_of(TEXTS, st.just(""), st.just(value * 70))
    if isinstance(value, list):
        items = similar(value[0]) if value else VALUES
        return st.lists(st.one_of(items, VALUES), max_size=len(value) + 2)
    if isinstance(value, dict):
        return mutated_map(value)
    return VALUES


@st.composite
def mutated_map(draw: st.DrawFn, m: dict[str, Any], max_ops: int = 3) -> Any:
    """``m`` with fields dropped, retyped, given hostile values of their own type or added,
    or replaced by something else entirely."""
    out = dict(m)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from([*["drop", "retype", "similar", "similar", "add"] * 2, "whole"]))
        keys = sorted(out, key=repr)
        if op == "drop" and keys:
            del out[draw(st.sampled_from(keys))]
        elif op == "retype" and keys:
            out[draw(st.sampled_from(keys))] = draw(VALUES)
        elif op == "similar" and keys:
            key = draw(st.sampled_from(keys))
            out[key] = draw(similar(out[key]))
        elif op == "add":
            out[draw(TEXTS)] = draw(VALUES)
        elif op == "whole":
            return draw(VALUES)
    return out


@st.composite
def pair_shape(draw: st.DrawFn, body: bytes, sig: bytes) -> Any:
    """The wire form of a signed object, usually right, sometimes misshapen."""
    if draw(st.integers(0, 3)):
        return [body, sig]
    return draw(
        st.sampled_from(
            [
                [body],
                [body, sig, b""],
                [sig, body],
                [body, sig[:63]],
                [body.decode("latin-1"), sig],
                body,
                None,
            ]
        )
    )


def fields_of(blob: SignedBlob) -> dict[str, Any]:
    m = wire.unpack(blob.body)
    assert isinstance(m, dict)
    return m


@dataclass(frozen=True)
class ChainKeys:
    """Who signs each level of a chain; the defaults are the module's genuine set."""

    ca: SigningKey
    holder: SigningKey
    member: SigningKey
    lease: dict[str, Any]
    admission: dict[str, Any]
    record: dict[str, Any]


DEFAULT_KEYS = ChainKeys(
    CA, HOLDER, MEMBER, fields_of(LEASE.blob), fields_of(ADMISSION.blob), fields_of(RECORD)
)


@dataclass(frozen=True)
class Chain:
    lease: SignedBlob
    admission: SignedBlob
    record: SignedBlob
    lease_wire: Any
    admission_wire: Any
    record_wire: Any


@st.composite
def chains(draw: st.DrawFn, keys: ChainKeys = DEFAULT_KEYS) -> Chain:
    """A lease -> admission -> record chain with hostile edits at one or more levels.

    Each level is re-signed after its edits (usually by the right key and domain),
    so the checks behind each signature see the edited fields."""
    levels = draw(
        st.lists(st.sampled_from(["lease", "admission", "record"]), min_size=1, max_size=2)
    )

    def sign(default: SigningKey, domain: bytes, body: bytes, level: str) -> bytes:
        if level in levels and draw(st.integers(0, 7)) == 0:
            default = draw(st.sampled_from([STRANGER, keys.ca, keys.holder, keys.member]))
            domain = draw(st.sampled_from([CONTROL_DOMAIN, LEASE_DOMAIN, RECORD_DOMAIN]))
        return default.sign(domain, body)

    def body_of(fields: Any, level: str) -> bytes:
        body = wire.pack(fields)
        if level in levels and draw(st.integers(0, 7)) == 0:
            body = draw(mutated(body))  # broken msgpack, signed anyway
        return body

    lf: Any = keys.lease
    if draw(st.integers(0, 7)) == 0:  # a genuine release record of the block
        lf = {**lf, "hold": b"", "hsk": b"", "seq": lf["seq"] + 1}
    if "lease" in levels:
        lf = draw(mutated_map(lf))
    lbody = body_of(lf, "lease")
    lsig = sign(keys.ca, LEASE_DOMAIN, lbody, "lease")
    lwire = draw(pair_shape(lbody, lsig)) if "lease" in levels else [lbody, lsig]

    af: Any = {**keys.admission, "lease": lwire}
    if "admission" in levels:
        af = draw(mutated_map(af))
    abody = body_of(af, "admission")
    asig = sign(keys.holder, ADMISSION_DOMAIN, abody, "admission")
    awire = draw(pair_shape(abody, asig)) if "admission" in levels else [abody, asig]

    rf: Any = {**keys.record, "cert": awire}
    if "record" in levels:
        rf = draw(mutated_map(rf))
    rbody = body_of(rf, "record")
    rsig = sign(keys.member, RECORD_DOMAIN, rbody, "record")
    rwire = draw(pair_shape(rbody, rsig)) if "record" in levels else [rbody, rsig]
    return Chain(
        SignedBlob(lbody, lsig),
        SignedBlob(abody, asig),
        SignedBlob(rbody, rsig),
        lwire,
        awire,
        rwire,
    )


# -------------------------------------------------------------------------- invariants


def check_lease(lease: Lease, ca_public: bytes, plan: AddressPlan) -> None:
    assert 0 <= lease.block < plan.num_blocks
    assert lease.seq >= 0
    if lease.released:
        assert lease.holder_key == b""
    else:
        assert lease.holder == node_id(lease.holder_key)
    assert lease.granted_at >= 0
    assert verify_lease(lease.blob, ca_public, plan) == lease


def check_admission(adm: Admission, ca_public: bytes, plan: AddressPlan, now: float) -> None:
    check_lease(adm.lease, ca_public, plan)
    assert not adm.lease.released
    assert adm.subject == node_id(adm.sign_key)
    assert len(adm.sign_key) == 32 and len(adm.wg_key) == 32
    assert plan.block_of_offset(adm.offset) == adm.lease.block
    assert not plan.is_reserved(adm.offset)
    assert adm.expires is None or adm.expires > now


def check_record(rec: PeerRecord, ca_public: bytes, plan: AddressPlan, now: float) -> None:
    check_admission(rec.admission, ca_public, plan, now)
    assert rec.node_id == rec.admission.subject == node_id(rec.sign_key)
    assert rec.sign_key == rec.admission.sign_key
    assert rec.wg_key == rec.admission.wg_key
    assert 0 < len(rec.name) <= 63
    assert len(rec.endpoints) <= 16
    assert 0 <= rec.wg_port <= 65535 and isinstance(rec.wg_port, int)
    assert rec.seq >= 0


def check_plain(obj: Any, depth: int = 1) -> None:
    """What ``wire.unpack`` may hand out: msgpack types, string keys, bounded nesting."""
    assert depth <= wire.MAX_DEPTH or not isinstance(obj, list | dict)
    if isinstance(obj, dict):
        assert len(obj) <= wire.MAX_MAP
        for k, v in obj.items():
            assert isinstance(k, str), f"non-string map key {k!r}"
            check_plain(v, depth + 1)
    elif isinstance(obj, list):
        assert len(obj) <= wire.MAX_ARRAY
        for v in obj:
            check_plain(v, depth + 1)
    else:
        assert obj is None or isinstance(obj, bool | int | float | str | bytes)


# ------------------------------------------------------------------- envelope, msgpack


class TestWire:
    @FAST
    @given(st.one_of(st.binary(max_size=600), VALUES.map(wire.pack).flatmap(mutated)))
    def test_unpack(self, data: bytes) -> None:
        obj = accept_or_reject(lambda: wire.unpack(data))
        if obj is not None:
            check_plain(obj)

    @FAST
    @given(
        st.one_of(
            VALUES,
            st.dictionaries(st.one_of(TEXTS, st.binary(max_size=4)), VALUES, max_size=3),
        )
    )
    def test_unpack_packed_values(self, value: Any) -> None:
        obj = accept_or_reject(lambda: wire.unpack(wire.pack(value)))
        if obj is not None:
            check_plain(obj)

    @staticmethod
    def rejected(data: bytes) -> bool:
        return accept_or_reject(lambda: wire.unpack(data)) is None

    def test_unpack_refuses_binary_map_keys(self) -> None:
        # protocols/wire.md section 3: string map keys only
        for data in (wire.pack({b"t": 1}), wire.pack({"a": [{b"k": 1}]}), b"\x81\xc4\x01t\x01"):
            assert self.rejected(data)
        assert not self.rejected(wire.pack({"t": {"k": b"v"}}))

    def test_unpack_deep_and_wide(self) -> None:
        for data in (b"\x91" * 100_000, b"\x81\xa1a" * 20_000, b"\xdd\xff\xff\xff\xff"):
            assert self.rejected(data)

    @FAST
    @given(
        st.one_of(
            st.binary(max_size=8),
            st.builds(
                lambda k, n: bytes([1, k]) + bytes(n), st.integers(0, 255), st.integers(0, 8)
            ),
            st.integers(wire.MAX_PACKET - 4, wire.MAX_PACKET + 4).map(
                lambda n: b"\x01\x01" + bytes(n)
            ),
        )
    )
    def test_parse_header(self, data: bytes) -> None:
        kind = accept_or_reject(lambda: wire.parse_header(data))
        if kind is not None:
            assert 2 <= len(data) <= wire.MAX_PACKET and data[0] == wire.VERSION
            assert kind == data[1]

    @FAST
    @given(
        st.one_of(
            st.binary(max_size=200),
            mutated(SEALED),
            st.binary(max_size=64).map(lambda b: SEALED[:18] + b),
            st.binary(max_size=64).map(lambda b: b"\x01\x01" + KEYRING.primary_id + b),
        )
    )
    def test_keyring_open(self, data: bytes) -> None:
        body = accept_or_reject(lambda: KEYRING.open(data))
        if body is not None:  # only the genuine packet opens
            assert data == SEALED


# ------------------------------------------------------------------------ signed blobs


class TestSignedBlob:
    @FAST
    @given(
        st.one_of(
            st.binary(max_size=300),
            mutated(RECORD.encode()),
            mutated(LEASE.blob.encode()),
            VALUES.map(wire.pack),
            st.tuples(BINS, BINS).map(lambda p: wire.pack(list(p))),
        )
    )
    def test_decode(self, data: bytes) -> None:
        blob = accept_or_reject(lambda: SignedBlob.decode(data, "blob"))
        if blob is not None:
            assert len(blob.signature) == 64
            assert blob.encode() == wire.pack([blob.body, blob.signature])

    @FAST
    @given(VALUES)
    def test_from_wire(self, obj: Any) -> None:
        accept_or_reject(lambda: SignedBlob.from_wire(obj, "blob"))


class TestVerify:
    @MEDIUM
    @given(chains())
    def test_structured_chain(self, chain: Chain) -> None:
        lease = accept_or_reject(lambda: verify_lease(chain.lease, CA.public, PLAN))
        if lease is not None:
            check_lease(lease, CA.public, PLAN)
        adm = accept_or_reject(lambda: verify_admission(chain.admission, CA.public, PLAN, NOW))
        if adm is not None:
            check_admission(adm, CA.public, PLAN, NOW)
        rec = accept_or_reject(lambda: verify_record(chain.record, CA.public, PLAN, NOW))
        if rec is not None:
            check_record(rec, CA.public, PLAN, NOW)
        store = RecordStore(CA.public, PLAN)
        for _ in range(2):  # the second pass is answered by the cache
            got = accept_or_reject(lambda: store.offer(chain.record, NOW))
            assert (got is None) == (rec is None)
            accept_or_reject(lambda: store.offer_lease(chain.lease))

    @FAST
    @given(
        which=st.sampled_from(["lease", "admission", "record"]),
        data=st.data(),
    )
    def test_byte_mutations(self, which: str, data: st.DataObject) -> None:
        genuine = {"lease": LEASE.blob, "admission": ADMISSION.blob, "record": RECORD}[which]
        if data.draw(st.booleans()):
            blob = SignedBlob(data.draw(mutated(genuine.body)), genuine.signature)
        else:
            blob = SignedBlob(genuine.body, data.draw(mutated(genuine.signature)))
        for verify in (
            lambda: check_lease(verify_lease(blob, CA.public, PLAN), CA.public, PLAN),
            lambda: check_admission(
                verify_admission(blob, CA.public, PLAN, NOW), CA.public, PLAN, NOW
            ),
            lambda: check_record(verify_record(blob, CA.public, PLAN, NOW), CA.public, PLAN, NOW),
        ):
            accept_or_reject(verify)
        # a signature over edited bytes never verifies
        if blob != genuine:
            assert accept_or_reject(lambda: verify_lease(blob, CA.public, PLAN)) is None
            assert accept_or_reject(lambda: verify_record(blob, CA.public, PLAN, NOW)) is None

    @FAST
    @given(body=st.one_of(VALUES.map(wire.pack), st.binary(max_size=200)), signer=st.integers(0, 2))
    def test_random_bodies_signed_by_the_right_key(self, body: bytes, signer: int) -> None:
        key = (CA, HOLDER, MEMBER)[signer]
        for domain, verify in (
            (LEASE_DOMAIN, lambda b: verify_lease(b, CA.public, PLAN)),
            (ADMISSION_DOMAIN, lambda b: verify_admission(b, CA.public, PLAN, NOW)),
            (RECORD_DOMAIN, lambda b: verify_record(b, CA.public, PLAN, NOW)),
        ):
            blob = SignedBlob(body, key.sign(domain, body))
            accept_or_reject(functools.partial(verify, blob))


@pytest.mark.parametrize(
    "wgp", [None, "missing", True, -1, 65536, 2**40, 51820.0, "51820", b"\xca\x6c"]
)
def test_record_wg_port_is_a_required_int_in_range(wgp: Any) -> None:
    """The WireGuard port is part of the signed record: missing, a bool, a float, text or
    out of 0-65535 is malformed even with a valid signature."""
    fields = fields_of(RECORD)
    if wgp == "missing":
        del fields["wgp"]
    else:
        fields["wgp"] = wgp
    body = wire.pack(fields)
    blob = SignedBlob(body, MEMBER.sign(RECORD_DOMAIN, body))
    with pytest.raises(WireError) as exc:
        verify_record(blob, CA.public, PLAN, NOW)
    assert exc.value.reason is DropReason.MALFORMED


def test_record_wg_port_round_trips() -> None:
    assert verify_record(RECORD, CA.public, PLAN, NOW).wg_port == 51820
    fields = fields_of(RECORD)
    for port in (0, 1, 65535):
        fields["wgp"] = port
        body = wire.pack(fields)
        blob = SignedBlob(body, MEMBER.sign(RECORD_DOMAIN, body))
        assert verify_record(blob, CA.public, PLAN, NOW).wg_port == port
    with pytest.raises(ValueError):
        sign_record(
            MEMBER, seq=1, name="x", hostname=None, wg_key=MEMBER_WG.public, endpoints=[],
            now=NOW, version="v", admission=ADMISSION.blob, wg_port=70000,
        )  # fmt: skip


# ------------------------------------------------------------------------------ tokens


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


TOKEN_CHARS = st.sampled_from(list("meshd1.=-_+/ AZaz09\n\t\x00é€\U0001f600"))


@st.composite
def mutated_text(draw: st.DrawFn, text: str) -> str:
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        i = draw(st.integers(0, max(len(chars) - 1, 0)))
        if op == "insert" or not chars:
            chars.insert(i, draw(TOKEN_CHARS))
        elif op == "set":
            chars[i] = draw(TOKEN_CHARS)
        elif op == "delete":
            del chars[i]
        else:
            del chars[i:]
    return "".join(chars)


class TestTokens:
    @FAST
    @given(
        st.one_of(
            st.binary(max_size=120),
            mutated(CLAIMS.raw),
            mutated_map(wire.unpack(CLAIMS.raw)).map(wire.pack),
        )
    )
    def test_claims_decode(self, raw: bytes) -> None:
        claims = accept_or_reject(lambda: TokenClaims.decode(raw))
        if claims is not None:
            assert (len(claims.token_id), len(claims.issuer), len(claims.cluster)) == (8, 16, 8)
            assert 0 <= claims.max_uses <= 2**31 and claims.raw == raw

    @FAST
    @given(
        st.one_of(
            st.text(max_size=200),
            mutated_text(TOKEN),
            st.builds(
                lambda claims, secret, sep: sep.join(("meshd1", b64(claims), b64(secret))),
                st.one_of(
                    st.binary(max_size=80), mutated_map(wire.unpack(CLAIMS.raw)).map(wire.pack)
                ),
                st.binary(max_size=40),
                st.sampled_from([".", "..", " . "]),
            ),
            st.text(max_size=20).map(lambda s: "meshd1." + s + "." + s),
            st.just("meshd1." + "A" * 600 + ".AAAA"),
        )
    )
    def test_parse_token_only_token_error(self, text: str) -> None:
        got = accept_or_reject(lambda: parse_token(text), TokenError)
        if got is not None:
            claims, secret = got
            assert len(secret) == 16 and len(claims.token_id) == 8


# -------------------------------------------------------------------------- join codec


class TestJoinCodec:
    @FAST
    @given(
        st.one_of(
            st.binary(max_size=300),
            mutated(REQUEST),
            st.binary(max_size=300).map(lambda b: b"\x01\x10" + b),
            st.integers(2000, 2100).map(lambda n: REQUEST[:2] + bytes(n)),
        )
    )
    def test_decode_request_bytes(self, data: bytes) -> None:
        req = accept_or_reject(lambda: join.decode_request(data))
        if req is not None:
            authed = req.authenticate(SECRET)
            assert authed == (data == REQUEST)

    @FAST
    @given(mutated_map(REQUEST_FIELDS), st.booleans())
    def test_decode_request_structured(self, fields: Any, right_key: bool) -> None:
        signed_part = wire.header(Kind.JOIN_REQUEST) + wire.pack(fields)
        signer = MEMBER if right_key else STRANGER
        sig = signer.sign(join.REQUEST_DOMAIN, signed_part)
        data = signed_part + sig + mac(SECRET, signed_part + sig)
        req = accept_or_reject(lambda: join.decode_request(data))
        if req is not None:
            assert len(req.request_id) == 16 and len(req.cookie) in (0, 16)
            assert len(req.reply_key) == len(req.sign_key) == len(req.wg_key) == 32
            assert 0 < len(req.name) <= 63 and len(req.endpoints) <= 8
            assert req.authenticate(SECRET) == (right_key and req.sign_key == MEMBER.public)
            assert not req.authenticate(bytes(16))

    @FAST
    @given(st.one_of(st.binary(max_size=80), mutated(COOKIE), st.binary(min_size=34, max_size=34)))
    def test_decode_cookie(self, data: bytes) -> None:
        got = accept_or_reject(lambda: join.decode_cookie(data))
        if got is not None:
            assert len(got[0]) == len(got[1]) == 16

    @FAST
    @given(
        st.one_of(
            st.binary(max_size=60),
            st.sampled_from(ERRORS).flatmap(mutated),
            st.builds(
                lambda code, tail: ERRORS[0][:18] + bytes([code]) + tail,
                st.integers(0, 255),
                st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)),
            ),
        ),
        st.one_of(st.just(SECRET), st.binary(max_size=33)),
    )
    def test_decode_error(self, data: bytes, secret: bytes) -> None:
        got = accept_or_reject(lambda: join.decode_error(data, secret))
        if got is not None:
            rid, code, authed = got
            assert len(rid) == 16 and code in join.JoinErrorCode
            if authed:
                assert secret == SECRET and data in ERRORS

    @FAST
    @given(
        st.one_of(
            st.binary(max_size=1300),
            st.sampled_from(REPLY).flatmap(mutated),
            st.builds(
                lambda idx, total, body: REPLY[0][:50] + struct.pack("!HH", idx, total) + body,
                st.integers(0, 65535),
                st.integers(0, 65535),
                st.binary(max_size=1200),
            ),
        )
    )
    def test_decode_reply_chunk(self, data: bytes) -> None:
        chunk = accept_or_reject(lambda: join.decode_reply_chunk(data))
        if chunk is not None:
            assert 0 <= chunk.index < chunk.total <= join.MAX_CHUNKS
            assert 0 < len(chunk.data) <= join.CHUNK_DATA

    @FAST
    @given(
        st.one_of(
            st.binary(max_size=300),
            mutated(GRANT.encode()),
            mutated_map(wire.unpack(GRANT.encode())).map(wire.pack),
            mutated_map(GRANT.plan.to_dict()).map(
                lambda plan: wire.pack({**wire.unpack(GRANT.encode()), "plan": plan})
            ),
        )
    )
    def test_grant_decode(self, data: bytes) -> None:
        grant = accept_or_reject(lambda: JoinGrant.decode(data))
        if grant is not None:
            assert 1 <= len(grant.keyring) <= 16
            assert all(len(k) == 32 for k in grant.keyring)
            assert len(grant.ca_public) == 32 and len(grant.token_key) == 32
            assert AddressPlan.from_dict(grant.plan.to_dict()) == grant.plan
            Keyring(list(grant.keyring))  # what the new member builds from it


# --------------------------------------------------------------------- join client loop


SEED_ADDR = ("192.0.2.1", 7946)
OTHER_ADDR = ("203.0.113.9", 7946)


def client(reply_key: WireGuardKey = JOINER_EPH) -> JoinClient:
    return JoinClient(
        token=TOKEN,
        seeds=[SEED_ADDR],
        sign=MEMBER,
        wg_key=MEMBER_WG.public,
        reply_key=reply_key,
        request_id=RID,
        name="node2",
        hostname=None,
        endpoints=["192.0.2.10:7946"],
        now=NOW,
    )


def drive(c: JoinClient, packets: list[tuple[bytes, tuple[str, int]]]) -> None:
    c.handle_timer(NOW)
    for data, addr in packets:
        c.receive(data, addr, NOW)  # must never raise
    c.handle_timer(NOW + 1)
    event = c.next_event()
    if isinstance(event, JoinSucceeded):
        assert c.state is JoinState.JOINED
        adm = verify_admission(event.grant.admission, event.grant.ca_public, event.grant.plan, NOW)
        assert adm.subject == MEMBER.node_id and adm.wg_key == MEMBER_WG.public
        assert event.seed_addr == SEED_ADDR


ADDRS = st.sampled_from([SEED_ADDR, SEED_ADDR, OTHER_ADDR])
GENUINE_PACKETS = [COOKIE, *ERRORS, *REPLY]


class TestJoinClientReceive:
    @FAST
    @given(
        st.lists(
            st.tuples(
                st.one_of(
                    st.binary(max_size=200),
                    st.sampled_from(GENUINE_PACKETS).flatmap(mutated),
                    st.sampled_from(GENUINE_PACKETS),
                    st.sampled_from([Kind.SEALED, Kind.JOIN_REQUEST]).map(
                        lambda k: bytes([1, k]) + bytes(40)
                    ),
                ),
                ADDRS,
            ),
            max_size=6,
        )
    )
    def test_random_and_mutated_packets(self, packets: list[tuple[bytes, tuple[str, int]]]) -> None:
        drive(client(), packets)

    @FAST
    @given(
        eph=st.one_of(st.sampled_from(LOW_ORDER), st.binary(min_size=32, max_size=32)),
        index=st.integers(0, 3),
        total=st.integers(1, 3),
        body=st.binary(min_size=1, max_size=64),
        addr=ADDRS,
    )
    def test_crafted_reply_chunks(
        self, eph: bytes, index: int, total: int, body: bytes, addr: tuple[str, int]
    ) -> None:
        # a reply for this request id from a seed address with any ephemeral key, even one
        # whose X25519 exchange fails (low order): dropped, never raised
        head = wire.header(Kind.JOIN_REPLY) + RID + eph
        packets = [(head + struct.pack("!HH", i, total) + body, addr) for i in range(total)]
        packets.append((head + struct.pack("!HH", index, total) + body, addr))
        c = client()
        drive(c, packets)
        assert c.state is JoinState.REQUESTING

    @MEDIUM
    @given(
        payload=st.one_of(
            mutated(GRANT.encode()),
            mutated_map(wire.unpack(GRANT.encode())).map(wire.pack),
            chains().map(
                lambda ch: wire.pack({**wire.unpack(GRANT.encode()), "cert": ch.admission_wire})
            ),
            st.binary(max_size=100),
        ),
        right_secret=st.booleans(),
    )
    def test_genuinely_encrypted_hostile_grants(self, payload: bytes, right_secret: bool) -> None:
        # what a seed that knows the token secret (any member) could send
        secret = SECRET if right_secret else bytes(16)
        packets = join.seal_reply(payload, RID, secret, JOINER_EPH.public, SEED_EPH)
        c = client()
        drive(c, [(p, SEED_ADDR) for p in packets])
        if not right_secret:
            assert c.state is JoinState.REQUESTING

    def test_genuine_grant_joins(self) -> None:
        c = client()
        drive(
            c,
            [
                (p, SEED_ADDR)
                for p in join.seal_reply(GRANT.encode(), RID, SECRET, JOINER_EPH.public, SEED_EPH)
            ],
        )
        assert c.state is JoinState.JOINED

    @FAST
    @given(
        code=st.integers(0, 255),
        tag=st.one_of(st.just(None), st.just(b"right"), st.binary(min_size=16, max_size=16)),
        rid=st.sampled_from([RID, bytes(16)]),
        addr=ADDRS,
    )
    def test_crafted_errors_and_cookies(
        self, code: int, tag: bytes | None, rid: bytes, addr: tuple[str, int]
    ) -> None:
        head = wire.header(Kind.JOIN_ERROR) + rid + bytes([code])
        tail = b"" if tag is None else (mac(SECRET, head)[:16] if tag == b"right" else tag)
        c = client()
        drive(c, [(join.encode_cookie(rid, bytes([code]) * 16), addr), (head + tail, addr)])
        # only an error for this request, from a seed, ends the join, and only if it carries
        # the MAC (or says "bad token", which a seed without the secret must be able to say)
        final = (
            rid == RID
            and addr == SEED_ADDR
            and code in set(join.JoinErrorCode)
            and code < join.JoinErrorCode.TRY_AGAIN
            and (tag == b"right" or code == join.JoinErrorCode.BAD_TOKEN)
        )
        assert c.state is (JoinState.FAILED if final else JoinState.REQUESTING)


# ------------------------------------------------------------------------- node loop


LEADER_ADDR = ("192.0.2.1", 7946)


def addr(i: int) -> tuple[str, int]:
    return (f"192.0.2.{i}", 7946)


@dataclass
class Cluster:
    net: Net
    leader: Node
    n2: Node  # holds block 1 (it admitted n3)
    n3: Node


def cluster() -> Cluster:
    """leader (block 0), n2 joined through it, n3 joined through n2 (so n2 leases block 1)."""
    net = Net()
    leader = net.init("leader", LEADER_ADDR)
    text, _ = mint_token(
        leader.token_key, leader.sign.node_id, leader.ca_public, net.rand(8), net.now, 3600, 0
    )
    n2 = net.join("n2", addr(2), text, [LEADER_ADDR])
    n3 = net.join("n3", addr(3), text, [addr(2)])
    assert isinstance(n2, Node) and isinstance(n3, Node)
    return Cluster(net, leader, n2, n3)


@functools.cache
def shared_cluster() -> Cluster:
    return cluster()


def snapshot_invariants(node: Node, now: float) -> dict[str, int]:
    """What no datagram may break: the node's own record, unique offsets, its view's chains."""
    assert node.store.get(node.sign.node_id) == node.record
    offsets = list(node.allocator.assignments().values())
    assert len(offsets) == len(set(offsets))
    assert not any(node.plan.is_reserved(o) for o in offsets)
    if node.lease_table is not None:
        held = {x.block for x in node.lease_table.held_by(node.sign.node_id.hex())}
        assert held == set(node.allocator.blocks()), "lease table and allocator disagree"
    for rec in node.store:
        check_record(rec, node.ca_public, node.plan, now)
    for lease in node.store.leases():
        check_lease(lease, node.ca_public, node.plan)
    return node.allocator.assignments()


def node_ok(node: Node, now: float, before: dict[str, int], sender: bytes | None) -> None:
    """Invariants after a hostile datagram; only the sender's own address may go."""
    after = snapshot_invariants(node, now)
    for who, off in before.items():
        if sender is None or who != sender.hex():
            assert after.get(who) == off, f"{who} lost or moved its address"
    node.datagrams_to_send()
    node.handle_timer(now)


def cluster_keys(
    c: Cluster, holder: SigningKey, lease: Lease, member: SigningKey, wg: WireGuardKey
) -> ChainKeys:
    """A genuine chain in the cluster: ``member`` admitted by ``holder`` under ``lease``."""
    assert c.leader.ca is not None
    offset = next(o for o in c.leader.plan.offsets(lease.block) if o % 16 == 9)
    adm = issue_admission(holder, lease, member.public, wg.public, offset, c.net.now)
    rec = sign_record(
        member,
        seq=1,
        name="fresh",
        hostname=None,
        wg_key=wg.public,
        endpoints=["192.0.2.77:7946"],
        now=c.net.now,
        version="x",
        admission=adm.blob,
    )
    return ChainKeys(
        c.leader.ca, holder, member, fields_of(lease.blob), fields_of(adm.blob), fields_of(rec)
    )


@functools.cache
def pushed_keys() -> ChainKeys:
    """A new member admitted by the leader from block 0."""
    c = shared_cluster()
    lease = c.leader.store.lease(0)
    assert lease is not None
    return cluster_keys(c, c.leader.sign, lease, SigningKey(seed(60)), WireGuardKey(seed(61)))


@functools.cache
def granted_keys() -> ChainKeys:
    """A CA-signed lease of block 5 to n2, as the leader's answer to its lease request."""
    c = shared_cluster()
    assert c.leader.ca is not None
    lease = sign_lease(c.leader.ca, 5, c.n2.sign.public, c.net.now)
    return cluster_keys(c, c.n2.sign, lease, SigningKey(seed(62)), WireGuardKey(seed(63)))


def seal_for(node: Node, body: Any) -> bytes:
    return node.keyring.seal(wire.pack(body), lambda n: bytes(n))


class TestNodeReceive:
    @FAST
    @given(
        data=st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=300).map(lambda b: b"\x01\x01" + b),
            st.binary(max_size=300).map(lambda b: b"\x01\x10" + b),
            st.sampled_from([SEALED, REQUEST, COOKIE, *REPLY]).flatmap(mutated),
            st.none(),  # stands for: a mutation of this cluster's own traffic
        ),
        draw=st.data(),
    )
    def test_random_and_mutated_packets(self, data: bytes | None, draw: st.DataObject) -> None:
        c = shared_cluster()
        if data is None:
            data = draw.draw(st.sampled_from([d for _, _, d in c.net.sent]).flatmap(mutated))
        for node in (c.leader, c.n2):
            before = snapshot_invariants(node, c.net.now)
            node.receive(data, addr(66), c.net.now)
            node_ok(node, c.net.now, before, None)

    @MEDIUM
    @given(
        body=st.one_of(
            VALUES,
            mutated_map({"t": "push", "recs": [], "leases": [], "ack": True}),
            mutated_map({"t": "ctl", "m": [b"x", bytes(64)]}),
        ),
    )
    def test_sealed_bodies(self, body: Any) -> None:
        c = shared_cluster()
        before = snapshot_invariants(c.leader, c.net.now)
        c.leader.receive(seal_for(c.leader, body), addr(2), c.net.now)
        node_ok(c.leader, c.net.now, before, None)

    @MEDIUM
    @given(data=st.data())
    def test_pushed_hostile_chains(self, data: st.DataObject) -> None:
        c = shared_cluster()
        chain = data.draw(chains(pushed_keys()))
        ack = data.draw(st.booleans())
        body = {"t": "push", "recs": [chain.record_wire], "leases": [chain.lease_wire], "ack": ack}
        for node in (c.leader, c.n3):
            before = snapshot_invariants(node, c.net.now)
            node.receive(seal_for(node, body), addr(2), c.net.now)
            node_ok(node, c.net.now, before, None)

    @SLOW
    @given(data=st.data())
    def test_hostile_control_from_a_member(self, data: st.DataObject) -> None:
        c = cluster()  # fresh: a release really changes the leader's tables
        hexes = [n.sign.node_id.hex() for n in (c.leader, c.n2, c.n3)]
        sender = data.draw(st.sampled_from([c.n2, c.n2, c.n3]))
        op = data.draw(st.sampled_from(["release", "release", "lease", "tok_use", "rsp"]))
        body: dict[str, Any] = {
            "op": op,
            "rid": b"r" * 8,
            "from": sender.sign.node_id,
            "sk": sender.sign.public,
        }
        if op == "release":
            body["off"] = sender.admission.offset
            body["blocks"] = [1]
            body["asg"] = {c.n3.sign.node_id.hex(): c.n3.admission.offset}  # the genuine one
            if data.draw(st.booleans()):
                body["asg"].update(
                    data.draw(
                        st.dictionaries(
                            st.one_of(st.sampled_from(hexes), TEXTS, BINS.map(bytes.hex)),
                            st.one_of(st.integers(14, 34), st.booleans(), VALUES),
                            max_size=3,
                        )
                    )
                )
        elif op == "tok_use":
            _, claims = mint_token(
                c.leader.token_key, c.leader.sign.node_id, c.leader.ca_public, b"t" * 8,
                c.net.now, 3600, 1,
            )  # fmt: skip
            body["claims"] = claims.raw
            body["who"] = bytes(16)
        elif op == "rsp":
            body.update(ok=True, err=None)
        if data.draw(st.integers(0, 2)) == 0:
            body = data.draw(mutated_map(body))
        blob = SignedBlob.sign(sender.sign, CONTROL_DOMAIN, body)
        for target in (c.leader, c.n2):  # the leader serves leases; n2 does not
            before = snapshot_invariants(target, c.net.now)
            packet = seal_for(target, {"t": "ctl", "m": blob.to_wire()})
            target.receive(packet, addr(2), c.net.now)
            node_ok(target, c.net.now, before, sender.sign.node_id)
        assert c.leader.addresses() == ("10.200.0.1", "fd00:200::1")

    @MEDIUM
    @given(
        which=st.sampled_from([Op.LEASE, Op.TOKEN_USE, Op.RELEASE]),
        fields=st.fixed_dictionaries({}, optional={"ok": VALUES, "err": VALUES, "lease": VALUES}),
        lease_chain=st.one_of(st.none(), st.deferred(lambda: chains(granted_keys()))),
        from_target=st.booleans(),
    )
    def test_hostile_responses(
        self, which: Op, fields: dict[str, Any], lease_chain: Chain | None, from_target: bool
    ) -> None:
        c = shared_cluster()
        n2 = c.n2
        extra: dict[str, Any] = (
            {"claims": CLAIMS.raw, "who": bytes(16)} if which is Op.TOKEN_USE else {}
        )
        n2._request(
            c.leader.sign.node_id,
            which,
            extra,
            c.net.now,
            context={"key": (b"k" * 8, b"j" * 16), "exp": c.net.now + 60},
        )
        n2.datagrams_to_send()  # the request itself is not delivered
        rid = list(n2._pending)[-1]
        if lease_chain is not None:
            fields["lease"] = lease_chain.lease_wire
        sender = c.leader.sign if from_target else c.n3.sign
        body = {"op": "rsp", "rid": rid, "from": sender.node_id, "sk": sender.public, **fields}
        blob = SignedBlob.sign(sender, CONTROL_DOMAIN, body)
        before = snapshot_invariants(n2, c.net.now)
        n2.receive(seal_for(n2, {"t": "ctl", "m": blob.to_wire()}), LEADER_ADDR, c.net.now)
        node_ok(n2, c.net.now, before, None)
        n2._pending.clear()
        while n2.next_event() is not None:
            pass

    @MEDIUM
    @given(
        fields=mutated_map(
            {
                "rid": RID,
                "ck": b"",
                "tok": b"",
                "eph": JOINER_EPH.public,
                "sk": b"",
                "wg": MEMBER_WG.public,
                "name": "joiner",
                "host": None,
                "ep": ["192.0.2.50:7946"],
            },
            max_ops=2,
        ),
        eph=st.one_of(st.none(), st.sampled_from(LOW_ORDER), st.binary(min_size=32, max_size=32)),
        joiner=st.integers(70, 90),
        token=st.sampled_from(
            ["valid", "valid", "expired", "foreign", "once", "n2", "mutated", "bad_mac"]
        ),
        data=st.data(),
    )
    def test_authenticated_join_requests_with_hostile_fields(
        self, fields: Any, eph: bytes | None, joiner: int, token: str, data: st.DataObject
    ) -> None:
        # a holder of a token controls every field of its request
        c = shared_cluster()
        leader = c.leader
        issuer = c.n2.sign.node_id if token == "n2" else leader.sign.node_id
        ca_public = STRANGER.public if token == "foreign" else leader.ca_public
        t0 = c.net.now - 7200 if token == "expired" else c.net.now
        uses = 1 if token == "once" else 0
        _, minted = mint_token(leader.token_key, issuer, ca_public, b"t" * 8, t0, 3600, uses)
        raw = minted.raw
        if token == "mutated":
            raw = wire.pack(data.draw(mutated_map(wire.unpack(raw))))
        secret = bytes(16) if token == "bad_mac" else token_secret(leader.token_key, raw)
        key = SigningKey(seed(joiner))
        src = ("198.51.100.7", 7946)

        def request(cookie: bytes) -> bytes:
            m = dict(fields) if isinstance(fields, dict) else fields
            if isinstance(m, dict):
                m["ck"] = cookie
                m["tok"] = raw
                m["sk"] = key.public
                if eph is not None:
                    m["eph"] = eph
            signed = wire.header(Kind.JOIN_REQUEST) + wire.pack(m)
            sig = key.sign(join.REQUEST_DOMAIN, signed)
            return signed + sig + mac(secret, signed + sig)

        before = snapshot_invariants(leader, c.net.now)
        leader.receive(request(b""), src, c.net.now)
        cookies = [
            d for d, _ in leader.datagrams_to_send() if wire.parse_header(d) is Kind.JOIN_COOKIE
        ]
        if cookies:
            leader.receive(request(join.decode_cookie(cookies[0])[1]), src, c.net.now)
        node_ok(leader, c.net.now, before, None)
        events = []
        while (ev := leader.next_event()) is not None:
            events.append(ev)
        if any(isinstance(e, Admitted) for e in events):
            assert token in ("valid", "once", "mutated")
            assert eph not in LOW_ORDER


@pytest.mark.parametrize(
    "asg",
    [
        {"a": 17, "b": 17},  # two members on one address
        {"x": True},
        {"x": 0},  # a reserved offset, outside the block anyway
        {"LEADER": 18},  # would move the leader's own address into block 1
        {"N3": 16, "LEADER": 18},
    ],
)
def test_hostile_release_changes_nothing(asg: dict[str, Any]) -> None:
    """Regression: a member's release with bad assignments escaped ``receive`` or moved
    the leader's own address (which the leader would then hand out again)."""
    c = cluster()
    names = {"LEADER": c.leader.sign.node_id.hex(), "N3": c.n3.sign.node_id.hex()}
    body = {
        "op": "release",
        "rid": b"r" * 8,
        "from": c.n2.sign.node_id,
        "sk": c.n2.sign.public,
        "blocks": [1],
        "asg": {names.get(k, k): v for k, v in asg.items()},
    }
    blob = SignedBlob.sign(c.n2.sign, CONTROL_DOMAIN, body)
    table = c.leader.lease_table
    assert table is not None
    before = snapshot_invariants(c.leader, c.net.now)
    c.leader.receive(seal_for(c.leader, {"t": "ctl", "m": blob.to_wire()}), addr(2), c.net.now)
    node_ok(c.leader, c.net.now, before, c.n2.sign.node_id)
    assert c.leader.allocator.assignment(names["LEADER"]) == 1
    assert table.holder_of(1) in (c.n2.sign.node_id.hex(), None)
    assert 1 not in c.leader.allocator.blocks() or c.leader.allocator.assignment(names["N3"])


def test_genuine_release_is_still_adopted() -> None:
    c = cluster()
    n3 = c.n3.sign.node_id.hex()
    body = {
        "op": "release",
        "rid": b"r" * 8,
        "from": c.n2.sign.node_id,
        "sk": c.n2.sign.public,
        "blocks": [1],
        "asg": {n3: c.n3.admission.offset},
    }
    blob = SignedBlob.sign(c.n2.sign, CONTROL_DOMAIN, body)
    c.leader.receive(seal_for(c.leader, {"t": "ctl", "m": blob.to_wire()}), addr(2), c.net.now)
    assert c.leader.allocator.assignment(n3) == c.n3.admission.offset == 16
    assert 1 in c.leader.allocator.blocks()
    lease = c.leader.store.lease(1)
    assert lease is not None and lease.holder == c.leader.sign.node_id


def test_join_into_a_full_plan_never_raises() -> None:
    """Regression: the leader's ``NoAvailableBlocks`` used to escape ``receive``."""
    net = Net()
    plan = AddressPlan.parse("10.200.0.0/30", "fd00:200::/126", 30)  # offsets 1 and 2 only
    leader = net.init("leader", LEADER_ADDR, plan)
    text, _ = mint_token(
        leader.token_key, leader.sign.node_id, leader.ca_public, net.rand(8), net.now, 3600, 0
    )
    assert isinstance(net.join("n2", addr(2), text, [LEADER_ADDR]), Node)
    failed = net.join("n3", addr(3), text, [LEADER_ADDR])
    assert isinstance(failed, JoinFailed)
    assert "no free overlay addresses" in failed.reason
    assert any(
        isinstance(e, ControlFailed) and "leased" in e.reason for e in net.events[LEADER_ADDR]
    )
    assert sorted(leader.allocator.assignments().values()) == [1, 2]
