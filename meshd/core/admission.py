"""The trust chain: cluster CA -> block lease -> admission certificate -> peer record.

* A **block lease** is signed by the cluster CA (held by the leader): "block B of
  the address plan belongs to the node with key K". A lease whose holder is empty
  records a release, so replicas learn that the block is free again.
* An **admission certificate** is signed by a lease holder: "the node with keys
  (sk, wg) is a member and owns address offset O of my block B". It embeds the
  lease, so it verifies with nothing but the CA public key and the address plan.
  The chain has a fixed depth of two, whichever member admitted the node.
* A **join token** is minted by any member from the cluster token key; its secret
  is an HMAC of its claims, so every member can check a token without shared
  state, while the use count lives with the token's issuer (see ``join.py``).

Domain strings separate the signatures so that no signed object can be replayed
as another kind.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshd.core import wire
from meshd.core.crypto import (
    NODE_ID_LEN,
    PUB_LEN,
    SignedBlob,
    SigningKey,
    mac,
    node_id,
)
from meshd.core.ipam import AddressPlan, IpamError
from meshd.core.wire import DropReason, WireError

LEASE_DOMAIN: Final = b"meshd lease v1"
ADMISSION_DOMAIN: Final = b"meshd admission v1"
TOKEN_PREFIX: Final = "meshd1"
TOKEN_ID_LEN: Final = 8
TOKEN_SECRET_LEN: Final = 16
CLUSTER_ID_LEN: Final = 8
MAX_TOKEN_USES: Final = 2**31


def cluster_id(ca_public: bytes) -> bytes:
    """Short public id of a cluster, bound to its CA key."""
    return node_id(ca_public)[:CLUSTER_ID_LEN]


# ----------------------------------------------------------------------------- leases


@dataclass(frozen=True)
class Lease:
    """A verified block lease. ``holder == b""`` means the block was released."""

    block: int
    seq: int
    holder: bytes
    holder_key: bytes
    granted_by: bytes
    granted_at: float
    expires: float | None
    blob: SignedBlob

    @property
    def released(self) -> bool:
        return self.holder == b""

    def newer_than(self, other: Lease) -> bool:
        """Replicas keep the highest ``seq`` per block; ties broken by bytes so all agree.

        A sequence number, not a time: the leader may re-grant a block within one
        clock tick, and the newer grant must still win everywhere."""
        return (self.seq, self.blob.body) > (other.seq, other.blob.body)


def sign_lease(
    ca: SigningKey,
    block: int,
    holder_key: bytes | None,
    now: float,
    seq: int = 1,
    expires: float | None = None,
) -> Lease:
    """Grant ``block`` to the node with Ed25519 key ``holder_key`` (None: record a release).

    ``seq`` must exceed the sequence of every earlier lease record of this block."""
    holder = node_id(holder_key) if holder_key is not None else b""
    blob = SignedBlob.sign(
        ca,
        LEASE_DOMAIN,
        {
            "blk": block,
            "seq": seq,
            "hold": holder,
            "hsk": holder_key or b"",
            "gby": ca.node_id,
            "iat": now,
            "exp": expires,
        },
    )
    return Lease(block, seq, holder, holder_key or b"", ca.node_id, now, expires, blob)


def verify_lease(blob: SignedBlob, ca_public: bytes, plan: AddressPlan) -> Lease:
    """Check a lease against the CA key and the plan; raise WireError if it is not genuine."""
    blob.check(ca_public, LEASE_DOMAIN, "lease")
    m = blob.fields("lease")
    block = wire.int_field(m, "blk", 0, plan.num_blocks - 1)
    holder = wire.bin_field(m, "hold")
    holder_key = wire.bin_field(m, "hsk")
    if holder:
        if len(holder_key) != PUB_LEN or holder != node_id(holder_key):
            raise WireError(DropReason.MALFORMED, "lease holder does not match its key")
    elif holder_key:
        raise WireError(DropReason.MALFORMED, "released lease carries a key")
    return Lease(
        block=block,
        seq=wire.int_field(m, "seq"),
        holder=holder,
        holder_key=holder_key,
        granted_by=wire.bin_field(m, "gby", NODE_ID_LEN),
        granted_at=wire.num_field(m, "iat"),
        expires=None if m.get("exp") is None else wire.num_field(m, "exp"),
        blob=blob,
    )


# ------------------------------------------------------------------------ admissions


@dataclass(frozen=True)
class Admission:
    """A verified admission certificate."""

    subject: bytes
    sign_key: bytes
    wg_key: bytes
    offset: int
    issued_at: float
    expires: float | None
    lease: Lease
    blob: SignedBlob

    @property
    def issuer(self) -> bytes:
        return self.lease.holder


def issue_admission(
    holder: SigningKey,
    lease: Lease,
    sign_key: bytes,
    wg_key: bytes,
    offset: int,
    now: float,
    expires: float | None = None,
) -> Admission:
    """Admit the node with ``sign_key``/``wg_key`` at ``offset`` of ``holder``'s leased block."""
    if lease.holder != holder.node_id:
        raise ValueError("cannot admit from a block this node does not hold")
    blob = SignedBlob.sign(
        holder,
        ADMISSION_DOMAIN,
        {
            "sub": node_id(sign_key),
            "sk": sign_key,
            "wg": wg_key,
            "off": offset,
            "iat": now,
            "exp": expires,
            "lease": lease.blob.to_wire(),
        },
    )
    return Admission(node_id(sign_key), sign_key, wg_key, offset, now, expires, lease, blob)


LeaseVerifier = Callable[[SignedBlob], Lease]


def verify_admission(
    blob: SignedBlob,
    ca_public: bytes,
    plan: AddressPlan,
    now: float,
    lease_verifier: LeaseVerifier | None = None,
) -> Admission:
    """Walk CA -> lease -> admission; raise WireError on any broken link or expiry.

    ``lease_verifier`` (e.g. a caching one) replaces the plain lease check: up to a
    block's worth of admissions embed the same lease, so a cache saves one of the
    three signature checks of a cold record."""
    m = blob.fields("admission")
    embedded = SignedBlob.from_wire(m.get("lease"), "admission lease")
    lease = (
        lease_verifier(embedded)
        if lease_verifier is not None
        else verify_lease(embedded, ca_public, plan)
    )
    if lease.released:
        raise WireError(DropReason.BAD_SIGNATURE, "admission issued under a released lease")
    if lease.expires is not None and lease.expires <= now:
        raise WireError(DropReason.STALE, "admission issued under an expired lease")
    blob.check(lease.holder_key, ADMISSION_DOMAIN, "admission")
    sign_key = wire.bin_field(m, "sk", PUB_LEN)
    subject = wire.bin_field(m, "sub", NODE_ID_LEN)
    if subject != node_id(sign_key):
        raise WireError(DropReason.MALFORMED, "admission subject does not match its key")
    offset = wire.int_field(m, "off", 0, 2**40)
    try:
        in_block = plan.block_of_offset(offset) == lease.block and not plan.is_reserved(offset)
    except IpamError:
        in_block = False
    if not in_block:
        raise WireError(DropReason.MALFORMED, "admitted address is outside the issuer's block")
    expires = None if m.get("exp") is None else wire.num_field(m, "exp")
    if expires is not None and expires <= now:
        raise WireError(DropReason.STALE, "admission certificate has expired")
    return Admission(
        subject=subject,
        sign_key=sign_key,
        wg_key=wire.bin_field(m, "wg", PUB_LEN),
        offset=offset,
        issued_at=wire.num_field(m, "iat"),
        expires=expires,
        lease=lease,
        blob=blob,
    )


# ----------------------------------------------------------------------------- tokens


class TokenError(ValueError):
    """The operator supplied a join token that cannot be used; str() says why."""


@dataclass(frozen=True)
class TokenClaims:
    token_id: bytes
    issuer: bytes
    cluster: bytes
    issued_at: float
    expires: float
    max_uses: int  # 0 = unlimited
    raw: bytes  # exact bytes, as MACed

    @classmethod
    def decode(cls, raw: bytes) -> TokenClaims:
        m = wire.as_map(wire.unpack(raw, max_map=16, max_str=64, max_bin=64), "token claims")
        return cls(
            token_id=wire.bin_field(m, "id", TOKEN_ID_LEN),
            issuer=wire.bin_field(m, "iss", NODE_ID_LEN),
            cluster=wire.bin_field(m, "cl", CLUSTER_ID_LEN),
            issued_at=wire.num_field(m, "iat"),
            expires=wire.num_field(m, "exp"),
            max_uses=wire.int_field(m, "uses", 0, MAX_TOKEN_USES),
            raw=raw,
        )


def token_secret(token_key: bytes, claims_raw: bytes) -> bytes:
    """The secret half of a token, derivable by every member that has the token key."""
    return mac(token_key, b"meshd token\x00" + claims_raw)[:TOKEN_SECRET_LEN]


def mint_token(
    token_key: bytes,
    issuer: bytes,
    ca_public: bytes,
    token_id: bytes,
    now: float,
    ttl: float,
    max_uses: int,
) -> tuple[str, TokenClaims]:
    """Return the token string (``meshd1.<claims>.<secret>``) and its claims."""
    if not 0 < ttl < 100 * 365 * 86400:  # also refuses NaN and infinity
        raise TokenError("a token's time to live must be positive and under 100 years")
    if not 0 <= max_uses <= MAX_TOKEN_USES:
        raise TokenError(f"a token's use count must be between 0 and {MAX_TOKEN_USES}")
    raw = wire.pack(
        {
            "id": token_id,
            "iss": issuer,
            "cl": cluster_id(ca_public),
            "iat": now,
            "exp": now + ttl,
            "uses": max_uses,
        }
    )
    secret = token_secret(token_key, raw)
    text = ".".join((TOKEN_PREFIX, _b64(raw), _b64(secret)))
    return text, TokenClaims.decode(raw)


def parse_token(text: str) -> tuple[TokenClaims, bytes]:
    """Split a token string into its claims and secret; TokenError on anything malformed."""
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError("the join token is malformed: expected meshd1.<claims>.<secret>")
    try:
        raw, secret = _unb64(parts[1]), _unb64(parts[2])
        claims = TokenClaims.decode(raw)
    except (ValueError, binascii.Error, WireError) as exc:
        raise TokenError(f"the join token is malformed: {exc}") from None
    if len(secret) != TOKEN_SECRET_LEN:
        raise TokenError("the join token is malformed: bad secret length")
    return claims, secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if len(text) > 512:
        raise ValueError("token part too long")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenLedger:
    """Use counts for the tokens this node issued: the one place a token's uses are counted.

    A joiner that retries is the same use (keyed by its node id), so a lost reply
    never burns a single-use token.
    """

    def __init__(self, entries: dict[str, Any] | None = None) -> None:
        self._used: dict[bytes, tuple[float, set[bytes]]] = {}
        for tid_hex, entry in (entries or {}).items():
            self._used[bytes.fromhex(tid_hex)] = (
                float(entry["exp"]),
                {bytes.fromhex(j) for j in entry["by"]},
            )

    def consume(self, claims: TokenClaims, joiner: bytes, now: float) -> str | None:
        """Record a use; return None if allowed, else the reason it is refused."""
        if claims.expires <= now:
            return "the join token has expired"
        _, users = self._used.setdefault(claims.token_id, (claims.expires, set()))
        if joiner in users:
            return None
        if claims.max_uses and len(users) >= claims.max_uses:
            return "the join token has been used up"
        users.add(joiner)
        return None

    def prune(self, now: float) -> None:
        for tid in [t for t, (exp, _) in self._used.items() if exp <= now]:
            del self._used[tid]

    def uses(self, token_id: bytes) -> int:
        entry = self._used.get(token_id)
        return len(entry[1]) if entry else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            tid.hex(): {"exp": exp, "by": sorted(j.hex() for j in users)}
            for tid, (exp, users) in sorted(self._used.items())
        }
