"""The trust chain at unit level: CA -> lease -> admission -> record, merges, tokens.

Fixed seeds and fake times only (protocols/wire.md section 4 and "Join tokens").
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshd.core import wire
from meshd.core.admission import (
    ADMISSION_DOMAIN,
    LEASE_DOMAIN,
    Admission,
    Lease,
    TokenClaims,
    TokenError,
    TokenLedger,
    issue_admission,
    mint_token,
    parse_token,
    sign_lease,
    verify_admission,
    verify_lease,
)
from meshd.core.crypto import SignedBlob, SigningKey, WireGuardKey
from meshd.core.ipam import AddressPlan
from meshd.core.join import REQUEST_DOMAIN
from meshd.core.node import CONTROL_DOMAIN
from meshd.core.records import (
    RECORD_DOMAIN,
    Merge,
    RecordStore,
    sign_record,
    verify_record,
)
from meshd.core.wire import DropReason, WireError
from protocols.vectors.generate import seed

NOW = 1_790_000_000.0
PLAN = AddressPlan.parse("10.200.0.0/16", "fd00:200::/48", 28)  # 4096 blocks of 16
CA = SigningKey(seed(1))
HOLDER = SigningKey(seed(2))
MEMBER = SigningKey(seed(3))
MEMBER_WG = WireGuardKey(seed(4))
OTHER = SigningKey(seed(20))
OTHER_WG = WireGuardKey(seed(21))
FAKE_CA = SigningKey(seed(22))
TOKEN_KEY = seed(7)


def lease(block: int = 1, holder: SigningKey = HOLDER, seq: int = 1, at: float = NOW) -> Lease:
    return sign_lease(CA, block, holder.public, at, seq)


def admit(
    who: SigningKey = MEMBER,
    wg: WireGuardKey = MEMBER_WG,
    offset: int = 17,
    expires: float | None = None,
    under: Lease | None = None,
) -> Admission:
    return issue_admission(
        HOLDER, under or lease(), who.public, wg.public, offset, NOW, expires=expires
    )


def record(
    key: SigningKey = MEMBER,
    adm: SignedBlob | None = None,
    *,
    seq: int = 1,
    wg: bytes | None = None,
    endpoints: list[str] | None = None,
) -> SignedBlob:
    return sign_record(
        key,
        seq=seq,
        name="n1",
        hostname=None,
        wg_key=MEMBER_WG.public if wg is None else wg,
        endpoints=["192.0.2.10:7946"] if endpoints is None else endpoints,
        now=NOW,
        version="test",
        admission=admit().blob if adm is None else adm,
    )


def admission_fields(lease_blob: SignedBlob, **over: Any) -> dict[str, Any]:
    """The body of a correct admission of MEMBER at offset 17, with fields overridden."""
    fields: dict[str, Any] = {
        "sub": MEMBER.node_id,
        "sk": MEMBER.public,
        "wg": MEMBER_WG.public,
        "off": 17,
        "iat": NOW,
        "exp": None,
        "lease": lease_blob.to_wire(),
    }
    fields.update(over)
    return fields


def reason(exc: pytest.ExceptionInfo[WireError]) -> DropReason:
    return exc.value.reason


# ----------------------------------------------------------------------------- leases


class TestLease:
    def test_genuine(self) -> None:
        got = verify_lease(lease().blob, CA.public, PLAN)
        assert (got.block, got.seq, got.holder, got.holder_key) == (
            1,
            1,
            HOLDER.node_id,
            HOLDER.public,
        )
        assert got.granted_by == CA.node_id

    def test_signed_by_non_ca_rejected(self) -> None:
        forged = sign_lease(FAKE_CA, 1, HOLDER.public, NOW)
        with pytest.raises(WireError) as err:
            verify_lease(forged.blob, CA.public, PLAN)
        assert reason(err) is DropReason.BAD_SIGNATURE
        # the holder cannot lease itself a block either
        self_signed = sign_lease(HOLDER, 1, HOLDER.public, NOW)
        with pytest.raises(WireError):
            verify_lease(self_signed.blob, CA.public, PLAN)

    def test_holder_must_match_key(self) -> None:
        body = {
            "blk": 1,
            "seq": 1,
            "hold": OTHER.node_id,
            "hsk": HOLDER.public,
            "gby": CA.node_id,
            "iat": NOW,
            "exp": None,
        }
        blob = SignedBlob.sign(CA, LEASE_DOMAIN, body)
        with pytest.raises(WireError) as err:
            verify_lease(blob, CA.public, PLAN)
        assert reason(err) is DropReason.MALFORMED

    def test_released_lease_carries_no_key(self) -> None:
        body = {
            "blk": 1,
            "seq": 2,
            "hold": b"",
            "hsk": HOLDER.public,
            "gby": CA.node_id,
            "iat": NOW,
            "exp": None,
        }
        with pytest.raises(WireError) as err:
            verify_lease(SignedBlob.sign(CA, LEASE_DOMAIN, body), CA.public, PLAN)
        assert reason(err) is DropReason.MALFORMED

    @pytest.mark.parametrize("block", [-1, 4096, 2**40])
    def test_block_outside_plan(self, block: int) -> None:
        with pytest.raises(WireError) as err:
            verify_lease(lease(block).blob, CA.public, PLAN)
        assert reason(err) is DropReason.MALFORMED


# ------------------------------------------------------------------------- admissions


class TestAdmission:
    def test_genuine(self) -> None:
        adm = verify_admission(admit().blob, CA.public, PLAN, NOW)
        assert adm.subject == MEMBER.node_id
        assert adm.offset == 17
        assert adm.issuer == HOLDER.node_id
        assert adm.lease.block == 1

    def test_signed_by_someone_other_than_holder(self) -> None:
        with pytest.raises(ValueError, match="does not hold"):
            issue_admission(OTHER, lease(), MEMBER.public, MEMBER_WG.public, 17, NOW)
        blob = SignedBlob.sign(OTHER, ADMISSION_DOMAIN, admission_fields(lease().blob))
        with pytest.raises(WireError) as err:
            verify_admission(blob, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE
        # nor by the CA itself: only the holder of the block admits into it
        blob = SignedBlob.sign(CA, ADMISSION_DOMAIN, admission_fields(lease().blob))
        with pytest.raises(WireError):
            verify_admission(blob, CA.public, PLAN, NOW)

    def test_lease_from_a_fake_ca(self) -> None:
        fake = sign_lease(FAKE_CA, 1, HOLDER.public, NOW)
        adm = issue_admission(HOLDER, fake, MEMBER.public, MEMBER_WG.public, 17, NOW)
        with pytest.raises(WireError) as err:
            verify_admission(adm.blob, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE
        # and a record under it goes nowhere
        with pytest.raises(WireError):
            verify_record(record(adm=adm.blob), CA.public, PLAN, NOW)

    def test_holder_of_another_block_cannot_admit_into_this_one(self) -> None:
        # HOLDER holds block 1 and signs; the admission embeds OTHER's lease of block 2
        other_lease = lease(2, holder=OTHER)
        fields = admission_fields(other_lease.blob, off=33)
        blob = SignedBlob.sign(HOLDER, ADMISSION_DOMAIN, fields)
        with pytest.raises(WireError) as err:
            verify_admission(blob, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE

    @pytest.mark.parametrize(
        ("block", "offset"),
        [
            (1, 2),  # in block 0, not the lease's block 1
            (1, 15),  # last of block 0
            (1, 32),  # first of block 2
            (1, 65_536),  # past the plan
            (1, 2**40),  # far past the plan
            (0, 0),  # the network address (reserved)
            (4095, 65_535),  # the IPv4 broadcast address (reserved)
        ],
    )
    def test_offset_outside_block_or_reserved(self, block: int, offset: int) -> None:
        adm = admit(offset=offset, under=lease(block))
        with pytest.raises(WireError) as err:
            verify_admission(adm.blob, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.MALFORMED

    @pytest.mark.parametrize(("block", "offset"), [(1, 16), (1, 31), (0, 1), (4095, 65_534)])
    def test_offset_edges_inside_block(self, block: int, offset: int) -> None:
        adm = admit(offset=offset, under=lease(block))
        assert verify_admission(adm.blob, CA.public, PLAN, NOW).offset == offset

    def test_under_released_lease(self) -> None:
        released = sign_lease(CA, 1, None, NOW, seq=2)
        assert verify_lease(released.blob, CA.public, PLAN).released
        with pytest.raises(ValueError):
            issue_admission(HOLDER, released, MEMBER.public, MEMBER_WG.public, 17, NOW)
        for signer in (HOLDER, OTHER, CA):
            blob = SignedBlob.sign(signer, ADMISSION_DOMAIN, admission_fields(released.blob))
            with pytest.raises(WireError) as err:
                verify_admission(blob, CA.public, PLAN, NOW)
            assert reason(err) is DropReason.BAD_SIGNATURE

    def test_subject_must_match_key(self) -> None:
        fields = admission_fields(lease().blob, sub=OTHER.node_id)
        blob = SignedBlob.sign(HOLDER, ADMISSION_DOMAIN, fields)
        with pytest.raises(WireError) as err:
            verify_admission(blob, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.MALFORMED

    def test_expiry(self) -> None:
        adm = admit(expires=NOW + 10)
        assert verify_admission(adm.blob, CA.public, PLAN, NOW + 9.999).expires == NOW + 10
        for t in (NOW + 10, NOW + 11):  # exp <= now is expired
            with pytest.raises(WireError) as err:
                verify_admission(adm.blob, CA.public, PLAN, t)
            assert reason(err) is DropReason.STALE


# ---------------------------------------------------------------------------- records


class TestRecord:
    def test_genuine(self) -> None:
        rec = verify_record(record(), CA.public, PLAN, NOW)
        assert rec.node_id == MEMBER.node_id
        assert rec.admission.offset == 17
        assert [str(a) for a in rec.addresses(PLAN)] == ["10.200.0.17", "fd00:200::11"]

    def test_other_member_carrying_victims_admission(self) -> None:
        victim_adm = admit()  # MEMBER's admission
        admit(OTHER, OTHER_WG, offset=18)  # OTHER is a genuine member too
        # OTHER signs a record with its own key around the victim's admission
        forged = record(OTHER, victim_adm.blob, seq=99)
        with pytest.raises(WireError) as err:
            verify_record(forged, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE
        # ... or claims the victim's id and key but signs with its own key
        m = wire.unpack(record(MEMBER, victim_adm.blob, seq=99).body)
        for body in (m, {**m, "sk": OTHER.public}):
            blob = SignedBlob.sign(OTHER, RECORD_DOMAIN, body)
            with pytest.raises(WireError) as err:
                verify_record(blob, CA.public, PLAN, NOW)
            assert reason(err) is DropReason.BAD_SIGNATURE

    def test_wg_key_must_equal_admissions(self) -> None:
        blob = record(wg=OTHER_WG.public)
        with pytest.raises(WireError) as err:
            verify_record(blob, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE

    def test_expired_admission_rejected_also_from_cache(self) -> None:
        store = RecordStore(CA.public, PLAN)
        blob = record(adm=admit(expires=NOW + 60).blob)
        assert store.verify(blob, NOW).node_id == MEMBER.node_id
        hits = store.cache.hits
        for t in (NOW + 60, NOW + 61):
            with pytest.raises(WireError) as err:
                store.verify(blob, t)
            assert reason(err) is DropReason.STALE
        assert store.cache.hits == hits + 2  # answered by the cache, still refused
        with pytest.raises(WireError):
            store.offer(blob, NOW + 61)
        assert store.get(MEMBER.node_id) is None
        # uncached, it is refused as well
        with pytest.raises(WireError):
            verify_record(blob, CA.public, PLAN, NOW + 60)


class TestVerifyCache:
    def test_second_verify_is_a_hit(self) -> None:
        store = RecordStore(CA.public, PLAN)
        blob = record()
        first = store.verify(blob, NOW)
        # a cold record is two misses: the record, and the lease its admission embeds
        assert (store.cache.hits, store.cache.misses) == (0, 2)
        assert store.verify(blob, NOW) == first
        assert (store.cache.hits, store.cache.misses) == (1, 2)
        # the same bytes in a fresh SignedBlob are the same cache entry
        assert store.verify(SignedBlob(blob.body, blob.signature), NOW) == first
        assert store.cache.hits == 2
        # another record under the same lease: its own miss, but the lease is a hit
        store.verify(record(seq=2), NOW)
        assert (store.cache.hits, store.cache.misses) == (3, 3)

    def test_failures_are_cached_and_still_raise(self) -> None:
        store = RecordStore(CA.public, PLAN)
        bad = record(wg=OTHER_WG.public)
        for expected_hits in (0, 1):
            with pytest.raises(WireError):
                store.verify(bad, NOW)
            assert store.cache.hits == expected_hits

    def test_cached_failure_does_not_grow(self) -> None:
        """Regression: re-raising one cached exception object grew its traceback per hit."""
        store = RecordStore(CA.public, PLAN)
        bad = record(wg=OTHER_WG.public)
        errors = []
        for _ in range(50):
            try:
                store.verify(bad, NOW)
            except WireError as exc:
                errors.append(exc)
        assert len({id(e) for e in errors}) == 50  # a fresh exception every time
        depth = [len(list(_tb_frames(e))) for e in errors]
        assert max(depth) == depth[0]

    def test_lease_cache_hit(self) -> None:
        store = RecordStore(CA.public, PLAN)
        blob = lease().blob
        store.verify_lease(blob)
        store.verify_lease(blob)
        assert store.cache.hits == 1

    def test_kind_is_part_of_the_key(self) -> None:
        # a lease's bytes verified as a lease do not make them pass as a record
        store = RecordStore(CA.public, PLAN)
        blob = lease().blob
        store.verify_lease(blob)
        with pytest.raises(WireError):
            store.verify(blob, NOW)


class TestRecordMerge:
    def test_rules(self) -> None:
        store = RecordStore(CA.public, PLAN)
        adm = admit().blob
        v1, v2 = record(adm=adm, seq=1), record(adm=adm, seq=2)
        v2_other = record(adm=adm, seq=2, endpoints=["192.0.2.99:7946"])
        assert store.offer(v1, NOW)[0] is Merge.NEW
        assert store.offer(v2, NOW)[0] is Merge.UPDATED
        assert store.offer(v1, NOW)[0] is Merge.STALE
        assert store.offer(v2_other, NOW)[0] is Merge.CONFLICT
        assert store.offer(SignedBlob(v2.body, v2.signature), NOW)[0] is Merge.UNCHANGED
        kept = store.get(MEMBER.node_id)
        assert kept is not None and kept.blob == v2 and kept.seq == 2
        assert len(store) == 1

    def test_higher_seq_wins_whatever_the_order(self) -> None:
        adm = admit().blob
        blobs = [record(adm=adm, seq=s) for s in (3, 1, 5, 2, 4)]
        store = RecordStore(CA.public, PLAN)
        for b in blobs:
            store.offer(b, NOW)
        kept = store.get(MEMBER.node_id)
        assert kept is not None and kept.seq == 5

    def test_forgery_never_touches_the_view(self) -> None:
        store = RecordStore(CA.public, PLAN)
        store.offer(record(), NOW)
        before = store.get(MEMBER.node_id)
        forged = record(OTHER, admit().blob, seq=99)
        with pytest.raises(WireError):
            store.offer(forged, NOW)
        assert store.get(MEMBER.node_id) == before
        assert store.get(OTHER.node_id) is None


class TestLeaseMerge:
    def test_regrant_with_higher_seq_wins_even_with_equal_or_older_iat(self) -> None:
        store = RecordStore(CA.public, PLAN)
        first = lease(1, HOLDER, seq=1, at=NOW)
        assert store.offer_lease(first.blob)[0] is Merge.NEW
        same_tick = sign_lease(CA, 1, OTHER.public, NOW, seq=2)  # adopted in the same tick
        assert store.offer_lease(same_tick.blob)[0] is Merge.UPDATED
        older_clock = sign_lease(CA, 1, None, NOW - 100, seq=3)  # leader's clock stepped back
        assert store.offer_lease(older_clock.blob)[0] is Merge.UPDATED
        cur = store.lease(1)
        assert cur is not None and cur.seq == 3 and cur.released
        # lower seq is stale even with a newer iat; identical bytes are unchanged
        late = sign_lease(CA, 1, HOLDER.public, NOW + 1_000, seq=2)
        assert store.offer_lease(late.blob)[0] is Merge.STALE
        assert store.offer_lease(older_clock.blob)[0] is Merge.UNCHANGED
        assert store.lease(1) == cur

    def test_equal_seq_tie_is_broken_the_same_everywhere(self) -> None:
        a = sign_lease(CA, 3, HOLDER.public, NOW, seq=4)
        b = sign_lease(CA, 3, OTHER.public, NOW, seq=4)
        winners = []
        for order in ((a, b), (b, a)):
            store = RecordStore(CA.public, PLAN)
            for x in order:
                store.offer_lease(x.blob)
            cur = store.lease(3)
            assert cur is not None
            winners.append(cur.blob)
        assert winners[0] == winners[1] == max(a, b, key=lambda x: x.blob.body).blob

    def test_forged_lease_never_merged(self) -> None:
        store = RecordStore(CA.public, PLAN)
        store.offer_lease(lease(1).blob)
        with pytest.raises(WireError):
            store.offer_lease(sign_lease(FAKE_CA, 1, OTHER.public, NOW, seq=50).blob)
        cur = store.lease(1)
        assert cur is not None and cur.holder == HOLDER.node_id


# ---------------------------------------------------------------- domain separation


class TestDomainSeparation:
    def test_lease_bytes_presented_as_admission_or_record(self) -> None:
        blob = lease().blob
        with pytest.raises(WireError):
            verify_admission(blob, CA.public, PLAN, NOW)
        with pytest.raises(WireError):
            verify_record(blob, CA.public, PLAN, NOW)

    @pytest.mark.parametrize(
        "domain", [LEASE_DOMAIN, RECORD_DOMAIN, CONTROL_DOMAIN, REQUEST_DOMAIN, b""]
    )
    def test_admission_body_signed_under_another_domain(self, domain: bytes) -> None:
        genuine = admit().blob
        swapped = SignedBlob(genuine.body, HOLDER.sign(domain, genuine.body))
        with pytest.raises(WireError) as err:
            verify_admission(swapped, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE

    @pytest.mark.parametrize(
        "domain", [LEASE_DOMAIN, ADMISSION_DOMAIN, CONTROL_DOMAIN, REQUEST_DOMAIN]
    )
    def test_record_body_signed_under_another_domain(self, domain: bytes) -> None:
        genuine = record()
        swapped = SignedBlob(genuine.body, MEMBER.sign(domain, genuine.body))
        with pytest.raises(WireError) as err:
            verify_record(swapped, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE

    @pytest.mark.parametrize(
        "domain", [ADMISSION_DOMAIN, RECORD_DOMAIN, CONTROL_DOMAIN, REQUEST_DOMAIN]
    )
    def test_lease_body_signed_by_ca_under_another_domain(self, domain: bytes) -> None:
        genuine = lease().blob
        swapped = SignedBlob(genuine.body, CA.sign(domain, genuine.body))
        with pytest.raises(WireError) as err:
            verify_lease(swapped, CA.public, PLAN)
        assert reason(err) is DropReason.BAD_SIGNATURE

    def test_lease_signature_over_admission_shaped_body(self) -> None:
        # the CA's lease signature must not vouch for an admission, even one whose
        # body is a valid admission of a block the CA could lease to itself
        ca_lease = sign_lease(CA, 1, CA.public, NOW)
        fields = admission_fields(ca_lease.blob)
        body = wire.pack(fields)
        blob = SignedBlob(body, CA.sign(LEASE_DOMAIN, body))
        with pytest.raises(WireError) as err:
            verify_admission(blob, CA.public, PLAN, NOW)
        assert reason(err) is DropReason.BAD_SIGNATURE
        # while the same body under the right domain is a genuine admission
        good = SignedBlob(body, CA.sign(ADMISSION_DOMAIN, body))
        assert verify_admission(good, CA.public, PLAN, NOW).issuer == CA.node_id


# ----------------------------------------------------------------------------- tokens


def mint(ttl: float = 60, uses: int = 1, tid: int = 30) -> TokenClaims:
    _, claims = mint_token(TOKEN_KEY, HOLDER.node_id, CA.public, seed(tid)[:8], NOW, ttl, uses)
    return claims


JOINERS = [SigningKey(seed(40 + i)).node_id for i in range(8)]


class TestTokens:
    def test_mint_and_parse(self) -> None:
        text, claims = mint_token(TOKEN_KEY, HOLDER.node_id, CA.public, seed(30)[:8], NOW, 60, 3)
        parsed, secret = parse_token(text)
        assert parsed == claims
        assert (claims.expires, claims.max_uses, claims.issuer) == (NOW + 60, 3, HOLDER.node_id)
        assert len(secret) == 16

    @pytest.mark.parametrize("ttl", [0, -1, -0.001])
    def test_mint_rejects_non_positive_ttl(self, ttl: float) -> None:
        with pytest.raises(TokenError, match="time to live"):
            mint(ttl=ttl)

    def test_mint_rejects_negative_uses(self) -> None:
        with pytest.raises(TokenError, match="use count"):
            mint(uses=-1)
        assert mint(uses=0).max_uses == 0

    def test_expired_token_refused(self) -> None:
        ledger = TokenLedger()
        claims = mint(ttl=60)
        for t in (NOW + 60, NOW + 61):  # exp <= now
            assert ledger.consume(claims, JOINERS[0], t) == "the join token has expired"
        assert ledger.uses(claims.token_id) == 0
        assert ledger.consume(claims, JOINERS[0], NOW + 59.9) is None
        assert ledger.uses(claims.token_id) == 1

    def test_used_up_after_max_uses(self) -> None:
        ledger = TokenLedger()
        claims = mint(uses=2)
        assert ledger.consume(claims, JOINERS[0], NOW) is None
        assert ledger.consume(claims, JOINERS[1], NOW) is None
        assert ledger.consume(claims, JOINERS[2], NOW) == "the join token has been used up"
        assert ledger.uses(claims.token_id) == 2
        # an earlier joiner retrying is not a new use, even once the token is spent
        assert ledger.consume(claims, JOINERS[1], NOW + 1) is None

    def test_same_joiner_twice_counts_once(self) -> None:
        ledger = TokenLedger()
        claims = mint(uses=1)
        for _ in range(3):
            assert ledger.consume(claims, JOINERS[0], NOW) is None
        assert ledger.uses(claims.token_id) == 1
        assert ledger.consume(claims, JOINERS[1], NOW) is not None

    def test_unlimited_never_used_up(self) -> None:
        ledger = TokenLedger()
        claims = mint(uses=0, ttl=3600)
        many = [SigningKey(seed(100 + i)).node_id for i in range(50)]
        assert all(ledger.consume(claims, j, NOW) is None for j in many)
        assert ledger.uses(claims.token_id) == 50

    def test_tokens_counted_separately(self) -> None:
        ledger = TokenLedger()
        a, b = mint(uses=1, tid=30), mint(uses=1, tid=31)
        assert ledger.consume(a, JOINERS[0], NOW) is None
        assert ledger.consume(b, JOINERS[1], NOW) is None
        assert (ledger.uses(a.token_id), ledger.uses(b.token_id)) == (1, 1)

    def test_prune_drops_expired_entries(self) -> None:
        ledger = TokenLedger()
        short, long = mint(ttl=60, tid=30), mint(ttl=600, tid=31)
        ledger.consume(short, JOINERS[0], NOW)
        ledger.consume(long, JOINERS[0], NOW)
        ledger.prune(NOW + 59)
        assert ledger.uses(short.token_id) == 1
        ledger.prune(NOW + 60)  # exp <= now
        assert ledger.uses(short.token_id) == 0
        assert ledger.uses(long.token_id) == 1
        assert list(ledger.to_dict()) == [long.token_id.hex()]
        ledger.prune(NOW + 600)
        assert ledger.to_dict() == {}

    def test_to_dict_round_trip(self) -> None:
        ledger = TokenLedger()
        once, twice, free = mint(uses=1, tid=30), mint(uses=2, tid=31), mint(uses=0, tid=32)
        ledger.consume(once, JOINERS[0], NOW)
        ledger.consume(twice, JOINERS[1], NOW)
        ledger.consume(twice, JOINERS[2], NOW)
        ledger.consume(free, JOINERS[3], NOW)
        saved = json.loads(json.dumps(ledger.to_dict()))  # as the state file stores it
        again = TokenLedger(saved)
        assert again.to_dict() == ledger.to_dict()
        assert saved[twice.token_id.hex()] == {
            "exp": NOW + 60,
            "by": sorted([JOINERS[1].hex(), JOINERS[2].hex()]),
        }
        for claims in (once, twice, free):
            assert again.uses(claims.token_id) == ledger.uses(claims.token_id)
        # the restored ledger keeps refusing and keeps recognising retries
        assert again.consume(once, JOINERS[5], NOW) == "the join token has been used up"
        assert again.consume(once, JOINERS[0], NOW) is None
        assert again.consume(twice, JOINERS[6], NOW) == "the join token has been used up"
        again.prune(NOW + 60)
        assert again.to_dict() == {}
        assert TokenLedger().to_dict() == TokenLedger(None).to_dict() == {}


def _tb_frames(exc: BaseException) -> list[object]:
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames
