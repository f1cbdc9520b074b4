"""Golden vectors (protocols/vectors/): rebuilt byte for byte, and decoded with today's decoders.

``generate.build()`` must reproduce ``vectors.json`` exactly: a change here means the
wire format changed (protocols/wire.md says when to regenerate and bump the version).
The second half reads the *stored* bytes, so an old encoding stays readable even if
someone regenerates the file by mistake; where cheap, it also re-derives values from
the spec text itself (node ids, key ids, signature input, reply key) rather than
only through the code under test.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import random
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshd.core import join, wire
from meshd.core.admission import (
    ADMISSION_DOMAIN,
    LEASE_DOMAIN,
    cluster_id,
    parse_token,
    token_secret,
    verify_admission,
    verify_lease,
)
from meshd.core.crypto import SignedBlob, SigningKey, WireGuardKey, hkdf, node_id
from meshd.core.ipam import AddressPlan
from meshd.core.membership import PROFILES, Membership
from meshd.core.records import RECORD_DOMAIN, verify_record
from meshd.core.wire import DropReason, Keyring, Kind, WireError
from protocols.vectors import generate
from protocols.vectors.generate import seed

STORED_TEXT = generate.PATH.read_text()
STORED: dict[str, Any] = json.loads(STORED_TEXT)

CA = SigningKey(seed(1))
LEADER = SigningKey(seed(2))
MEMBER = SigningKey(seed(3))
WG = WireGuardKey(seed(4))
TOKEN_KEY = seed(7)
TOKEN_ID = seed(8)[:8]
RID = seed(9)[:16]
COOKIE = seed(10)[:16]
JOINER_EPH = WireGuardKey(seed(11))
SEED_EPH = WireGuardKey(seed(12))


@functools.cache
def built() -> dict[str, Any]:
    """``generate.build()`` through a JSON round trip, as the file stores it."""
    result: dict[str, Any] = json.loads(json.dumps(generate.build()))
    return result


def raw(name: str) -> bytes:
    value = STORED[name]
    assert isinstance(value, str)
    return bytes.fromhex(value)


def now() -> float:
    value = STORED["inputs"]["now"]
    assert isinstance(value, float)
    return value


def plan() -> AddressPlan:
    return AddressPlan.from_dict(STORED["inputs"]["plan"])


def ca_public() -> bytes:
    return bytes.fromhex(STORED["ca_public"])


def secret() -> bytes:
    return bytes.fromhex(STORED["token_secret"])


def spec_signature_ok(public: bytes, domain: bytes, blob: SignedBlob) -> bool:
    """Section 4 straight from the spec: Ed25519 over ``domain || 0x00 || body``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            blob.signature, domain + b"\x00" + blob.body
        )
    except InvalidSignature:
        return False
    return True


# ------------------------------------------------------------------ (a) rebuild exactly


class TestRebuild:
    def test_build_reproduces_stored_file_byte_for_byte(self) -> None:
        built = generate.build()
        assert json.dumps(built, indent=2, sort_keys=True) + "\n" == STORED_TEXT

    @pytest.mark.parametrize("name", sorted(STORED))
    def test_each_vector(self, name: str) -> None:
        # the same comparison, one vector at a time, so a failure names what changed
        assert built()[name] == STORED[name]

    def test_seed_helper(self) -> None:
        assert seed(0) == bytes(range(32))
        assert seed(250)[:7] == bytes([250, 251, 252, 253, 254, 255, 0])
        assert len(seed(9)) == 32

    def test_inputs(self) -> None:
        assert now() == generate.NOW
        assert plan() == AddressPlan.parse("10.200.0.0/16", "fd00:200::/48", 28)


# --------------------------------------------------------------- (b) decode stored bytes


class TestIdentities:
    def test_ca_public_and_member_id(self) -> None:
        assert ca_public() == CA.public
        member_id = bytes.fromhex(STORED["member_node_id"])
        assert member_id == MEMBER.node_id == node_id(MEMBER.public)
        assert member_id == hashlib.sha256(b"meshd node id\x00" + MEMBER.public).digest()[:16]

    def test_keyring_key_ids(self) -> None:
        ids = [bytes.fromhex(k) for k in STORED["keyring_key_ids"]]
        expected = [
            hashlib.sha256(b"meshd keyring key id\x00" + k).digest()[:4] for k in (seed(5), seed(6))
        ]
        assert ids == expected
        assert ids == Keyring([seed(5), seed(6)]).key_ids()


class TestSignedObjects:
    def test_lease(self) -> None:
        blob = SignedBlob.decode(raw("lease"), "lease")
        assert wire.unpack(raw("lease")) == [blob.body, blob.signature]
        assert spec_signature_ok(ca_public(), LEASE_DOMAIN, blob)
        lease = verify_lease(blob, ca_public(), plan())
        assert lease.block == 0
        assert lease.seq == 1
        assert lease.holder == LEADER.node_id
        assert lease.holder_key == LEADER.public
        assert lease.granted_by == CA.node_id
        assert lease.granted_at == now()
        assert lease.expires is None
        assert not lease.released
        assert blob.encode() == raw("lease")
        assert set(wire.unpack(blob.body)) == {"blk", "seq", "hold", "hsk", "gby", "iat", "exp"}

    def test_released_lease(self) -> None:
        blob = SignedBlob.decode(raw("lease_released"), "lease")
        lease = verify_lease(blob, ca_public(), plan())
        assert lease.block == 7
        assert lease.seq == 1
        assert lease.released
        assert lease.holder == b"" and lease.holder_key == b""
        assert lease.granted_at == now() + 1
        assert lease.expires is None

    def test_lease_rejects_other_ca(self) -> None:
        blob = SignedBlob.decode(raw("lease"), "lease")
        with pytest.raises(WireError) as err:
            verify_lease(blob, LEADER.public, plan())
        assert err.value.reason is DropReason.BAD_SIGNATURE

    def test_admission(self) -> None:
        blob = SignedBlob.decode(raw("admission"), "admission")
        assert spec_signature_ok(LEADER.public, ADMISSION_DOMAIN, blob)
        adm = verify_admission(blob, ca_public(), plan(), now())
        assert adm.subject == bytes.fromhex(STORED["member_node_id"])
        assert adm.sign_key == MEMBER.public
        assert adm.wg_key == WG.public
        assert adm.offset == 2
        assert adm.issued_at == now()
        assert adm.expires is None
        assert adm.issuer == LEADER.node_id
        assert adm.lease == verify_lease(SignedBlob.decode(raw("lease"), "l"), ca_public(), plan())
        # the embedded lease is the stored lease, byte for byte
        assert wire.pack(wire.unpack(blob.body)["lease"]) == raw("lease")

    def test_record(self) -> None:
        blob = SignedBlob.decode(raw("record"), "record")
        assert spec_signature_ok(MEMBER.public, RECORD_DOMAIN, blob)
        rec = verify_record(blob, ca_public(), plan(), now())
        assert rec.node_id == MEMBER.node_id
        assert rec.seq == 3
        assert rec.name == "node2"
        assert rec.hostname == "db.example"
        assert rec.sign_key == MEMBER.public
        assert rec.wg_key == WG.public
        assert rec.endpoints == ("192.0.2.10:7946",)
        assert rec.wg_port == 51999
        assert wire.unpack(blob.body)["wgp"] == 51999  # the field name the spec gives
        assert rec.issued_at == now()
        assert rec.version == "0.1.0"
        assert rec.admission.blob == SignedBlob.decode(raw("admission"), "admission")
        assert rec.addresses(plan()) == (IPv4Address("10.200.0.2"), IPv6Address("fd00:200::2"))

    def test_record_still_verifies_much_later(self) -> None:
        # no expiry on the admission: the stored record stays valid
        blob = SignedBlob.decode(raw("record"), "record")
        assert verify_record(blob, ca_public(), plan(), now() + 10 * 365 * 86400).seq == 3


class TestSealedPush:
    def test_opens_with_keyring_and_contains_record(self) -> None:
        data = raw("sealed_push")
        assert wire.parse_header(data) is Kind.SEALED
        assert data[2:6] == bytes.fromhex(STORED["keyring_key_ids"][0])
        assert data[6:18] == bytes(range(12))  # the fixed nonce of the generator
        body = Keyring([seed(5), seed(6)]).open(data)
        assert len(data) == len(body) + wire.SEALED_OVERHEAD
        msg = wire.unpack(body)
        assert msg == {
            "t": "push",
            "recs": [list(wire.unpack(raw("record")))],
            "leases": [],
            "ack": False,
        }
        rec = SignedBlob.from_wire(msg["recs"][0], "record")
        assert verify_record(rec, ca_public(), plan(), now()).node_id == MEMBER.node_id

    def test_spec_aead(self) -> None:
        # section 2 from the spec: AES-256-GCM(key, nonce, body, aad = first 6 bytes)
        data = raw("sealed_push")
        body = AESGCM(seed(5)).decrypt(data[6:18], data[18:], data[:6])
        assert body == Keyring([seed(5)]).open(data)

    def test_secondary_key_opens_and_foreign_ring_does_not(self) -> None:
        data = raw("sealed_push")
        assert Keyring([seed(6), seed(5)]).open(data) == Keyring([seed(5)]).open(data)
        with pytest.raises(WireError) as err:
            Keyring([seed(6)]).open(data)
        assert err.value.reason is DropReason.UNKNOWN_KEY


class TestMembership:
    def test_sealed_swim_ping_carries_an_announcement_and_an_alive(self) -> None:
        body = Keyring([seed(5)]).open(raw("sealed_swim_ping"))
        msg = wire.unpack(body)
        assert msg["t"] == "swim" and msg["m"]["k"] == "ping" and msg["m"]["seq"] == 7
        announcement, alive = msg["m"]["g"]
        assert announcement == {"k": "v", "id": MEMBER.node_id, "s": 3}
        assert alive == {"k": "alive", "id": MEMBER.node_id, "inc": 2, "a": "192.0.2.10:7946"}

    def test_push_pull_digest_spec(self) -> None:
        # section 8: one bucket; BLAKE2b-32 over the sorted id || u64 inc || u8 state ||
        # u64 version entries of the bucket.
        msg = wire.unpack(raw("swim_pp_digest"))
        assert (msg["k"], msg["ph"], msg["nb"], msg["from"]) == ("pp", 0, 1, MEMBER.node_id)
        entries = sorted(
            [
                MEMBER.node_id + struct.pack(">QBQ", 2, 0, 3),
                LEADER.node_id + struct.pack(">QBQ", 1, 0, 4),
            ]
        )
        assert msg["h"] == hashlib.blake2b(b"".join(entries), digest_size=4).digest()

    def test_push_pull_answer_is_accepted(self) -> None:
        digest = wire.unpack(raw("swim_pp_digest"))
        answer = wire.unpack(raw("swim_pp_entries"))
        assert answer["sid"] == digest["sid"] and answer["d"] == [0]
        assert [e[0] for e in answer["e"]] == [LEADER.node_id, MEMBER.node_id, bytes(16)]
        m = Membership(MEMBER.node_id, ("192.0.2.10", 7946), PROFILES["lan"],
                       random.Random(1), now(), 2)  # fmt: skip
        m.push_pull(now(), ("192.0.2.1", 7946))
        [(mine, _)] = m.messages_to_send()
        answer["sid"] = mine["sid"]
        m.receive(answer, ("192.0.2.1", 7946), now())
        assert m.drops == {}
        assert m.member(bytes(16)) is not None  # learned from the answer


class TestToken:
    def test_parse(self) -> None:
        claims, sec = parse_token(STORED["token"])
        assert sec == secret()
        assert claims.token_id == TOKEN_ID
        assert claims.issuer == LEADER.node_id
        assert claims.cluster == cluster_id(ca_public()) == node_id(ca_public())[:8]
        assert claims.issued_at == now()
        assert claims.expires == now() + 3600
        assert claims.max_uses == 1
        assert token_secret(TOKEN_KEY, claims.raw) == sec
        spec = hmac.new(TOKEN_KEY, b"meshd token\x00" + claims.raw, hashlib.sha256).digest()
        assert spec[:16] == sec

    def test_format(self) -> None:
        prefix, _, _ = STORED["token"].split(".")
        assert prefix == "meshd1"
        assert "=" not in STORED["token"]


class TestJoinPackets:
    def test_request(self) -> None:
        data = raw("join_request")
        assert wire.parse_header(data) is Kind.JOIN_REQUEST
        assert len(data) <= join.MAX_REQUEST
        req = join.decode_request(data)
        claims, _ = parse_token(STORED["token"])
        assert req.request_id == RID
        assert req.cookie == COOKIE
        assert req.claims_raw == claims.raw
        assert req.reply_key == JOINER_EPH.public
        assert req.sign_key == MEMBER.public
        assert req.joiner == MEMBER.node_id
        assert req.wg_key == WG.public
        assert req.name == "node2"
        assert req.hostname is None
        assert req.endpoints == ("192.0.2.10:7946",)
        assert req.authenticate(secret())
        assert not req.authenticate(bytes(16))
        # layout from the spec: header | body | sig (64) | mac (32)
        assert req.signed_part == data[:-96]
        sig_ok = spec_signature_ok(
            MEMBER.public, join.REQUEST_DOMAIN, SignedBlob(req.signed_part, data[-96:-32])
        )
        assert sig_ok
        assert data[-32:] == hmac.new(secret(), data[:-32], hashlib.sha256).digest()

    def test_cookie(self) -> None:
        data = raw("join_cookie")
        assert len(data) == 34
        assert wire.parse_header(data) is Kind.JOIN_COOKIE
        assert join.decode_cookie(data) == (RID, COOKIE)

    def test_error(self) -> None:
        data = raw("join_error_used_up")
        assert wire.parse_header(data) is Kind.JOIN_ERROR
        assert join.decode_error(data, secret()) == (RID, join.JoinErrorCode.USED_UP, True)
        assert join.decode_error(data, bytes(16)) == (RID, join.JoinErrorCode.USED_UP, False)
        # the unauthenticated form is the same without its MAC
        assert join.decode_error(data[:-16], secret()) == (RID, join.JoinErrorCode.USED_UP, False)

    def test_reply_chunks_reassemble_and_decrypt(self) -> None:
        packets = [bytes.fromhex(p) for p in STORED["join_reply"]]
        chunks = [join.decode_reply_chunk(p) for p in packets]
        assert all(wire.parse_header(p) is Kind.JOIN_REPLY for p in packets)
        assert sorted(c.index for c in chunks) == list(range(len(chunks)))
        assert {c.total for c in chunks} == {len(chunks)}
        assert {c.request_id for c in chunks} == {RID}
        assert {c.seed_eph for c in chunks} == {SEED_EPH.public}
        ct = b"".join(c.data for c in sorted(chunks, key=lambda c: c.index))
        # section 5.3 from the spec text
        key = hkdf(
            JOINER_EPH.exchange(SEED_EPH.public),
            salt=secret(),
            info=b"meshd join reply v1" + RID,
        )
        assert AESGCM(key).decrypt(bytes(12), ct, RID) == b"grant bytes"
        # and with the seed's half of the exchange: both sides derive the same key
        assert SEED_EPH.exchange(JOINER_EPH.public) == JOINER_EPH.exchange(SEED_EPH.public)

    def test_reply_wrong_secret_fails(self) -> None:
        packets = [bytes.fromhex(p) for p in STORED["join_reply"]]
        ct = b"".join(join.decode_reply_chunk(p).data for p in packets)
        key = hkdf(
            JOINER_EPH.exchange(SEED_EPH.public), salt=bytes(16), info=b"meshd join reply v1" + RID
        )
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(bytes(12), ct, RID)
